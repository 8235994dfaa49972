"""The fastai behaviour that this project's overrides rely on, pinned: an upgrade that changes any of it
fails here, by name, instead of silently writing non-atomic checkpoints, a doubled history or hanging
a distributed run."""
import socket

import pytest
from fastai.callback.core import Callback
from fastai.callback.progress import CSVLogger
from fastai.learner import Learner
from fastai.test_utils import synth_learner

from lesion_fastai import distributed
from lesion_fastai.callbacks import AtomicSaveModelCallback


def test_save_model_callback_saves_through_its_save_method(tmp_path, monkeypatch):
    "AtomicSaveModelCallback overrides `_save(name)`: fastai must save every best epoch through it, never through Learner.save."
    learn = synth_learner(path=tmp_path)
    saved = []
    monkeypatch.setattr(Learner, 'save', lambda *a, **k: pytest.fail('SaveModelCallback saved through Learner.save, not _save'))
    cb = AtomicSaveModelCallback(monitor='valid_loss', fname='best', comp=lambda a, b: True)   # every epoch is the best
    real = AtomicSaveModelCallback._save
    monkeypatch.setattr(AtomicSaveModelCallback, '_save', lambda self, name: (saved.append(name), real(self, name)))
    monkeypatch.setattr(Learner, 'load', lambda self, *a, **k: self)       # after_fit reloads the best; not what is pinned here
    with learn.no_bar(), learn.no_logging(): learn.fit(2, cbs=[cb])
    assert saved == ['best', 'best'] and (tmp_path / 'models' / 'best.pth').exists()


class _SeeLogger(Callback):
    "Records which function is the learner's logger while the fit runs."
    def before_epoch(self): self.during = self.learn.logger


def test_csv_logger_swaps_the_learners_logger_for_its_write_line_and_back(tmp_path):
    "ResumableCSVLogger overrides `_write_line` and uses `old_logger`: fastai's before_fit must install both, after_fit restore."
    learn = synth_learner(path=tmp_path)
    before = learn.logger
    csv, seen = CSVLogger('history.csv'), _SeeLogger()
    with learn.no_bar(): learn.fit(1, cbs=[csv, seen])
    assert seen.during == csv._write_line and csv.old_logger == before and learn.logger == before
    assert len((tmp_path / 'history.csv').read_text().splitlines()) == 2      # header + one epoch, written by _write_line


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_distributed_dl_draws_each_epochs_order_through_broadcast(monkeypatch):
    "distributed.py replaces `DistributedDL._broadcast(t, rank)`: fastai must send each epoch's order through it."
    import torch.distributed as dist
    from fastai.data.core import DataLoader
    from fastai.distributed import DistributedDL
    if dist.is_initialized(): pytest.skip('a process group is already set up in this process')
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{_free_port()}', rank=0, world_size=1)
    try:
        calls = []
        ours = DistributedDL._broadcast
        assert ours is distributed._broadcast                               # the replacement is installed
        monkeypatch.setattr(DistributedDL, '_broadcast', lambda self, t, rank: (calls.append(rank), ours(self, t, rank))[1])
        dl = DistributedDL(DataLoader(list(range(10)), bs=2, shuffle=True), rank=0, world_size=1)
        seen = [int(i) for b in dl for i in b]
        assert calls == [0] and sorted(seen) == list(range(10))
    finally: dist.destroy_process_group()
