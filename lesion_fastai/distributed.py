"""Data-parallel training in several processes: `torchrun --nproc_per_node N -m pretrain ...` (or
`-m finetune`, or `accelerate launch`) trains one model with DistributedDataParallel through fastai's
`Learner.distrib_ctx`; without a launcher (no WORLD_SIZE) everything here does nothing.

What fastai 2.8 leaves to its user, and where this project does it:
* the process group: `setup` (gloo on CPUs, nccl with one GPU per process: LOCAL_RANK);
* `DistributedDL` broadcasts each epoch's shuffled order as a CUDA tensor: on gloo a CPU one (`_broadcast`);
* SyncBatchNorm needs GPUs: `data_parallel` converts BatchNorm only on CUDA (on CPUs each process
  normalises with its own batch statistics; DDP broadcasts rank 0's running statistics every step);
* files: only rank 0 writes (`is_main`) history, checkpoints, resume state, figures, metrics and the
  cache; the others wait at a `barrier` where they read what rank 0 wrote;
* metrics of the validation split, which each process sees a contiguous part of: `gather`
  (the validation FROC puts the parts back in order); evaluation after the fit runs in rank 0 `alone`;
* decisions that end a fit (time budget, a non-finite loss) are taken together: `agree`.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager

import torch
import torch.distributed as dist
from fastai.distributed import DistributedDL
from fastai.torch_core import rank_distrib

__all__ = ['world_size', 'rank', 'is_main', 'setup', 'barrier', 'main_first', 'gather', 'agree', 'data_parallel', 'alone', 'unwrap_loader',
           'quiet_other_ranks']


def world_size() -> int:
    "How many processes train this model (1 without a launcher)."
    return int(os.environ.get('WORLD_SIZE', 1))


def rank() -> int:
    return rank_distrib()


def is_main() -> bool:
    "Whether this process writes files and prints results (rank 0, or the only process)."
    return rank() == 0


def _active() -> bool:
    return world_size() > 1 and dist.is_available() and dist.is_initialized()


def setup() -> None:
    """Join the launcher's process group (environment from torchrun or accelerate): nccl with this
    process's GPU (LOCAL_RANK) when CUDA is available, gloo on CPUs. Called before data and model are
    built, so that every DataLoader lands on this process's device. A second call does nothing."""
    if world_size() <= 1 or dist.is_initialized(): return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', 0)))
        dist.init_process_group('nccl')
    else: dist.init_process_group('gloo')


def barrier() -> None:
    if _active(): dist.barrier()


@contextmanager
def main_first():
    "Rank 0 runs the block first (building a shared cache, say), then the other ranks, which read its files."
    if not is_main(): barrier()
    try: yield
    finally:
        if is_main(): barrier()


def gather(obj) -> list:
    "Every rank's `obj`, in rank order ([obj] in one process)."
    if not _active(): return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def agree(flag: bool) -> bool:
    "True on every rank when any rank says True (a stop that one process alone took would hang the others)."
    if not _active(): return bool(flag)
    t = torch.tensor([int(bool(flag))], device='cuda' if dist.get_backend() == 'nccl' else 'cpu')
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _broadcast(self, t, rank):
    "`DistributedDL._broadcast` for any backend: fastai's moves the indices to CUDA, which gloo on CPUs cannot."
    t = torch.tensor(t, dtype=torch.long, device='cuda' if dist.get_backend() == 'nccl' else 'cpu')
    dist.broadcast(t, rank)
    return t.cpu().tolist()


DistributedDL._broadcast = _broadcast


@contextmanager
def alone():
    """Work rank 0 does by itself in a launched group (evaluation, lr_find): fastai gathers every loss and
    prediction across the ranks while WORLD_SIZE says there are several, and would wait for the
    others forever; inside this block it (and this module) sees one process."""
    if world_size() <= 1:
        yield
        return
    launched, os.environ['WORLD_SIZE'] = os.environ['WORLD_SIZE'], '1'
    try: yield
    finally: os.environ['WORLD_SIZE'] = launched


def unwrap_loader(dl):
    "The DataLoader a `DistributedDL` wraps (its random state is the one that shuffles), or `dl` itself."
    return dl.dl if isinstance(dl, DistributedDL) else dl


@contextmanager
def data_parallel(learn):
    """Around a fit: in a launched process group, fastai's `distrib_ctx` (DistributedDataParallel, each
    rank a disjoint part of every epoch; SyncBatchNorm on GPUs only); in one process, nothing."""
    if not _active():
        yield learn
        return
    with learn.distrib_ctx(sync_bn=torch.cuda.is_available(), cpu=not torch.cuda.is_available()): yield learn


def quiet_other_ranks() -> None:
    "Launched in several processes, only rank 0 prints (progress bars, results); every rank's errors still reach stderr."
    if world_size() > 1 and not is_main(): sys.stdout = open(os.devnull, 'w')
