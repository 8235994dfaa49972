"""Run `python -m pretrain` or `python -m finetune` as torchrun launches it, with a trace for
test_distributed.py: the indices each rank drew per epoch, the gathered validation detections, and
optionally a crash right after an epoch's resume state is written (as a killed run would leave it).

    torchrun --nproc_per_node 2 tests/distributed_run.py TRACE_DIR STOP_AFTER_EPOCH {pretrain,finetune} ARGS...

STOP_AFTER_EPOCH -1: no crash. Not a test module itself (pytest collects test_*.py only).
"""
import json
import runpy
import sys
from pathlib import Path

import numpy as np
from fastai.distributed import DistributedDL

from lesion_fastai import callbacks, distributed, metrics

trace_dir, stop_after, module, args = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]
trace = {'rank': distributed.rank(), 'world_size': distributed.world_size(), 'idxs': []}

get_idxs = DistributedDL.get_idxs
def traced_get_idxs(self):
    idxs = get_idxs(self)
    trace['idxs'].append({'shuffle': bool(self.dl.shuffle), 'n': self.n, 'idxs': [int(i) for i in idxs]})
    return idxs
DistributedDL.get_idxs = traced_get_idxs

gathered = metrics.ValidFROC.gathered
def traced_gathered(self):
    dets = gathered(self)
    if distributed.is_main():
        n = len(list(trace_dir.glob('valid_detections_*.npz')))     # one per validation: per epoch
        np.savez(trace_dir / f'valid_detections_{n}.npz', boxes=dets.boxes, scores=dets.scores)
    return dets
metrics.ValidFROC.gathered = traced_gathered

after_epoch = callbacks.ResumeState.after_epoch
def crashing_after_epoch(self):
    after_epoch(self)
    if self.epoch == stop_after: raise KeyboardInterrupt(f"stopped after epoch {stop_after}, as a killed run would")
callbacks.ResumeState.after_epoch = crashing_after_epoch

trace_dir.mkdir(parents=True, exist_ok=True)
try:
    sys.argv = [module, *args]
    runpy.run_module(module, run_name='__main__', alter_sys=True)
finally:
    (trace_dir / f"rank{trace['rank']}.json").write_text(json.dumps(trace))
