"""The fit machinery both runs share: `fit_one_cycle` that keeps the best epoch and resumes exactly,
the precision it trains in, per-rank seeding, the output folder of a run, and the checks made
before anything trains. `pretraining.py` and `finetuning.py` hold the two runs themselves.
"""
from __future__ import annotations

import os
import re
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from fastai.callback.channelslast import ChannelsLast
from fastai.callback.core import Callback
from fastai.torch_core import set_seed, to_float

from . import distributed
from .callbacks import AtomicSaveModelCallback, ResumableCSVLogger, ResumeState, StopOnNonFinite
from .config import PRECISIONS, unused_settings
from .files import output_folder
from .log import log, speaking

__all__ = ['fit_resumable', 'check_batches', 'native_size', 'cpu_has_bf16', 'check_precision', 'resolved_precision', 'CPUBFloat16',
           'speed_up', 'back_to_fp32', 'run_folder', 'check_resume', 'save_run_settings',
           'seed_rank', 'loader_kwargs']


def check_batches(n_items: int, bs: int, what: str, hint: str) -> None:
    "Training drops the last incomplete batch: fewer items than --bs would train on nothing."
    if n_items < bs:
        raise ValueError(f"{what}: {n_items} training slice(s), fewer than --bs {bs}, so an epoch would have no batch "
                         f"and nothing would train; use --bs {max(1, n_items)} or less{hint}")


# settings a resumed run may change: where slices come from and how fast, not what is trained
RESUME_FREE = ('resume', 'out', 'num_workers', 'cache', 'cache_dir')
RUN_CONFIG = 'run_config.json'
# settings a run resolves from its data or checkpoint (`finetuning.resolve`, `pretraining.resolve`)
RESOLVED = ('windows', 'context', 'size', 'freeze', 'backbone', 'mask_ratio', 'patch', 'noise_std', 'genesis_local', 'genesis_nonlinear',
            'genesis_paint', 'genesis_outpaint')


def _run_settings(cfg) -> dict:
    "What `run_config.json` records: the resolved settings (`config.recorded`) less those a resume may change, the data as an absolute path."
    from .config import recorded
    settings = {k: v for k, v in recorded(cfg).items() if k not in RESUME_FREE}
    if settings.get('data') is not None: settings['data'] = str(Path(settings['data']).resolve())
    return settings


def check_resume(cfg, out: Path) -> None:
    """Before a `--resume` run touches anything: its resume state must load, and its resolved settings
    must be those the run it continues started with (`OUT/run_config.json`, compared by
    `config.settings_diff`); each disagreeing flag is named. The transfer layers' settings count only
    where the run or the resume is a sandwich (a scratch run is the same run whatever they say)."""
    from .config import settings_diff
    state, saved = Path(out) / 'last.pth', Path(out) / RUN_CONFIG
    if not cfg.resume or not state.exists(): return
    try: epoch = torch.load(state, map_location='cpu', weights_only=False)['epoch']
    except Exception as e:
        why = (str(e).splitlines() or ['no message'])[0].split('. ')[0][:160]
        raise ValueError(f"--resume: {state} cannot be read ({type(e).__name__}: {why}), "
                         f"so the run cannot continue; start it over without --resume (or in another --out)") from None
    if not saved.exists(): return                 # a run from before run_config.json: nothing to compare
    import json
    before = json.loads(saved.read_text())
    unresolved = [k for k in RESOLVED if k in before and before[k] is None]   # recorded unresolved by an older version: whatever it chose
    ignore = unresolved + unused_settings(before, cfg)
    changed = [f"--{k.replace('_', '-')} {now!r} (the run has {then!r})"
               for k, (then, now) in settings_diff(before, _run_settings(cfg), ignore=ignore, cls=type(cfg)).items()]
    if changed:
        raise ValueError(f"--resume: {out} was started with other settings than these, after {epoch + 1} epoch(s): "
                         + '; '.join(changed) + ". Resume with the run's settings, or start a new run in another --out")


def save_run_settings(cfg, out: Path) -> None:
    """What `check_resume` compares a later `--resume` with. A run that continues one (`--resume` and its
    last.pth) keeps the file that run started with; a run that starts over writes its own, and first moves
    a previous run's last.pth and models/best.pth into OUT/previous/ (nothing is lost if this run then
    fails), so that a `--resume` after it is killed cannot continue the other run's weights under this
    run's settings."""
    from .files import write_json
    out = Path(out)
    state = out / 'last.pth'
    if cfg.resume and state.exists():                # continues a run: its record stays (a run from before records: this one)
        if not (out / RUN_CONFIG).exists(): write_json(_run_settings(cfg), out / RUN_CONFIG)
        return
    stale = [p for p in (state, out / 'models' / 'best.pth') if p.exists()]
    for p in stale:
        (out / 'previous').mkdir(exist_ok=True)
        os.replace(p, out / 'previous' / p.name)
    if stale: log.info(f"{out}: this run starts over; the previous run's {' and '.join(p.name for p in stale)} moved to {out / 'previous'}")
    write_json(_run_settings(cfg), out / RUN_CONFIG)


def native_size(records) -> int:
    "The slices' usual width in pixels (the median): a run's default input is half of it."
    return int(np.median([r.width for r in records]))


def fit_resumable(learn, out: Path, epochs: int, lr, monitor: str, resume: bool, cbs=(), unfreeze_after: int = 0,
                  lr_mult: float = 1., unfreeze=None, unfrozen_div: float = 1.) -> None:
    """`fit_one_cycle` with the best epoch kept by `monitor` (models/best.pth), history.csv, and the
    resume state last.pth after every epoch; with `resume`, continue from last.pth where it stopped.
    Launched in several processes (torchrun), the fit is data parallel and only rank 0 writes.

    With `unfreeze_after` K, fastai's `fine_tune` recipe in `epochs` epochs: K epochs as the model is
    (its pretrained layers frozen) at `lr` with the one cycle's peak at the end (pct_start 0.99), then
    `unfreeze()` and the other epochs with every layer training at discriminative rates, the
    pretrained ones at lr / D / `lr_mult`, the rest at lr / D, D = `unfrozen_div` (pct_start 0.3, div 5;
    fastai halves the rate, D 2, which cost the untrained control 0.03 validation FROC). Two fits, one
    run: history.csv counts epochs over both, the best epoch is the best of both (and loaded only at
    the end), and a run killed in either resumes where it stopped."""
    best = AtomicSaveModelCallback(monitor=monitor, fname='best')
    csv = ResumableCSVLogger('history.csv') if distributed.is_main() else None  # relative to learn.path (= out)
    state = ResumeState(out / 'last.pth', best, csv)
    done = state.finished() if resume and state.file.exists() else 0          # epochs finished before
    if unfreeze_after and done >= unfreeze_after: unfreeze()          # before the optimizer state is put back: unfreezing clears it
    if done:
        state.restore(learn)
        log.info(f"resuming from {state.file} at epoch {done}")
    if done >= epochs:  # finished before: the best epoch is the result, as after an uninterrupted fit
        if (out / 'models' / 'best.pth').exists(): learn.load('best')
        return
    phases = [(0, epochs, lr, {})]
    if unfreeze_after:
        later = lr / unfrozen_div
        phases = [(0, unfreeze_after, lr, dict(pct_start=.99)), (unfreeze_after, epochs - unfreeze_after, slice(later / lr_mult, later),
                                                                 dict(pct_start=.3, div=5.))]
    finite = StopOnNonFinite()
    for i, (offset, n, phase_lr, kw) in enumerate(phases):
        if done >= offset + n: continue                                          # this fit finished before
        if offset and done < offset: unfreeze()                              # fastai's fine_tune: unfreeze, a fresh optimizer state
        start = max(0, done - offset)
        for cb in (best, state, csv):
            if cb is not None: cb.offset, cb.start_epoch = offset, start
        best.load_at_end = i == len(phases) - 1
        if i: best.reset_on_fit = False                                          # the best so far is the first fit's
        fit = lambda: learn.fit_one_cycle(n, phase_lr, start_epoch=start, cbs=[best, state, *([csv] if csv else []), finite, *cbs], **kw)
        with _named_errors(), distributed.data_parallel(learn):
            if speaking(): fit()
            else:
                with learn.no_bar(), learn.no_logging(): fit()
        if finite.problem: raise FloatingPointError(finite.problem)


_CALLBACK_PREFIX = re.compile(r'^(?:Exception occured in `\w+` when calling event `\w+`:\n\t)+')


@contextmanager
def _named_errors():
    """fastai puts "Exception occured in `ResumeState` when calling event `after_epoch`:" before an error
    raised in a callback; a named error of ours (a full disk while a checkpoint is written) reads as itself,
    so the command line prints the one `error:` line it promises."""
    try: yield
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        if e.args and isinstance(e.args[0], str): e.args = (_CALLBACK_PREFIX.sub('', e.args[0]), *e.args[1:])
        raise


def cpu_has_bf16() -> bool:
    "Whether this CPU has bfloat16 matrix units (AVX512-BF16 or AMX-BF16, the /proc/cpuinfo flags), which CPU autocast uses."
    try: flags = Path('/proc/cpuinfo').read_text()
    except OSError: return False
    return any(f in flags.split() for f in ('avx512_bf16', 'amx_bf16'))


# --precision auto on a CPU with bfloat16 units: float32, since bf16, twice as fast, scored a little lower on validation
# at the demo's budget (docs/results.md, "bfloat16 on the CPU"); --precision bf16 asks for it
CPU_AUTO_BF16 = False


def check_precision(precision: str) -> None:
    "A precision this machine can train in: bf16 needs a CUDA GPU or a CPU with bfloat16 units."
    if precision not in PRECISIONS: raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == 'bf16' and not torch.cuda.is_available() and not cpu_has_bf16():
        raise ValueError("--precision bf16 needs a CUDA GPU or a CPU with bfloat16 units (AVX512-BF16 or AMX-BF16), "
                         "and this machine has neither; use auto or fp32")


def resolved_precision(precision: str) -> str:
    """What a run with this --precision trains in here: 'auto' is bf16 on a CUDA GPU, and on a CPU with
    bfloat16 units only while `CPU_AUTO_BF16` says so (it does not: float32); 'bf16' is bf16."""
    if precision == 'fp32': return 'fp32'
    if torch.cuda.is_available() or precision == 'bf16': return 'bf16'
    return 'bf16' if CPU_AUTO_BF16 and cpu_has_bf16() else 'fp32'


class CPUBFloat16(Callback):
    """bfloat16 autocast on the CPU, as fastai's `MixedPrecision` does it on CUDA (which it hard-codes):
    the forward pass and the loss in autocast, the backward pass outside it, predictions handed on as
    float32 (the validation FROC decodes them); the weights, their gradients and the optimizer stay
    float32, so checkpoints and exports are float32. No loss scaling: bfloat16 has float32's range."""
    order = 10

    def before_fit(self): self.autocast, self.inside = torch.autocast('cpu', dtype=torch.bfloat16), False
    def before_batch(self): self.autocast.__enter__(); self.inside = True
    def after_pred(self): self.learn.pred = to_float(self.pred)
    def after_loss(self): self._leave()
    def after_batch(self): self._leave()              # a batch cancelled before its loss must not leave autocast on
    def after_fit(self): self._leave()

    def _leave(self):
        if self.inside: self.autocast.__exit__(None, None, None); self.inside = False


def speed_up(learn, precision: str) -> str:
    """bfloat16 and channels_last where `resolved_precision` says so: on a CUDA GPU fastai's
    `MixedPrecision` (bf16, no loss scaling), on the CPU `CPUBFloat16`. Returns the precision the fit
    runs in; `back_to_fp32` undoes it for evaluation and the export."""
    if resolved_precision(precision) == 'fp32': return 'fp32'
    if learn.dls.device is not None and learn.dls.device.type == 'cuda': learn.to_channelslast(amp_mode='bf16')
    else: learn.add_cbs([ChannelsLast(), CPUBFloat16()])
    return 'bf16'


def back_to_fp32(learn) -> None:
    "After a fit in bf16: the model contiguous, no autocast (evaluation, checkpoint and export are float32)."
    learn.to_contiguous(to_fp32=True)
    learn.remove_cbs([cb for cb in learn.cbs if isinstance(cb, CPUBFloat16)])


def run_folder(out: Path):
    "Rank 0 (or the only process) makes the output folder and cleans it up after a failure; other ranks write nothing."
    return output_folder(out) if distributed.is_main() else nullcontext(out)


def seed_rank(seed: int) -> None:
    """In several processes, after the model is built (the same on every rank): each rank its own
    augmentation and masking draws (rank 0 keeps the single-process ones; shuffling comes from rank 0)."""
    if distributed.rank(): set_seed(seed + 7919 * distributed.rank(), reproducible=True)


def loader_kwargs() -> dict:
    "Pinned host memory makes the copies to a GPU asynchronous."
    return {'pin_memory': torch.cuda.is_available()}
