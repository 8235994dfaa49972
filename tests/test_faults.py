"""Faults around a run: two processes on one slice cache, two runs on one --out, a resume with other
settings or a broken resume state, a full disk."""
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import finetune.__main__ as finetune_cli
from lesion_fastai.config import FinetuneConfig, from_args
from lesion_fastai.files import PidLock, LockedError
from lesion_fastai.fit import save_run_settings

BUILD = textwrap.dedent("""
    import hashlib, sys
    import numpy as np
    from lesion_fastai.cache import build_slice_cache
    from lesion_fastai.data import SliceSpec
    from lesion_fastai.deeplesion import load_data
    _, records = load_data(sys.argv[1])
    cache = build_slice_cache(records, SliceSpec(size=32, context=1), sys.argv[2])
    print(cache.file.name if hasattr(cache, 'file') else '', hashlib.sha1(np.ascontiguousarray(np.load(sorted(__import__('pathlib').Path(sys.argv[2]).glob('slices_*.npy'))[0])).tobytes()).hexdigest())
""")


def test_two_processes_building_one_cache_end_with_the_same_complete_cache(tiny_data, tmp_path):
    folder = tmp_path / 'cache'
    runs = [subprocess.Popen([sys.executable, '-c', BUILD, str(tiny_data), str(folder)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outs = [r.communicate(timeout=600) for r in runs]
    assert [r.returncode for r in runs] == [0, 0], [e[-2000:] for _, e in outs]
    digests = {o.split()[-1] for o, _ in outs}
    assert len(digests) == 1                                            # the same array for both
    names = sorted(p.name for p in folder.iterdir())
    assert len([n for n in names if n.endswith('.npy')]) == 1 and not [n for n in names if 'partial' in n or n.endswith('.lock')], names


HOLD = "import sys, time; from lesion_fastai.files import PidLock; PidLock(sys.argv[1], 'x').acquire(); print('held', flush=True); time.sleep(60)"


def _holder(lock):
    "A process that holds the lock file `lock` until it is killed."
    p = subprocess.Popen([sys.executable, '-c', HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == 'held'
    return p


def test_a_lock_of_a_live_process_refuses_and_a_killed_owners_is_taken_over(tmp_path):
    holder = _holder(tmp_path / 'a.lock')
    try:
        with pytest.raises(LockedError, match=rf'pid {holder.pid}'): PidLock(tmp_path / 'a.lock', 'the thing').acquire()
    finally: holder.kill(); holder.wait()
    assert (tmp_path / 'a.lock').read_text().split()[0] == str(holder.pid)        # killed: its file stays behind
    with PidLock(tmp_path / 'a.lock', 'the thing'):
        assert (tmp_path / 'a.lock').read_text().split()[0] == str(os.getpid())
    assert not (tmp_path / 'a.lock').exists()


CONTEND = """
import os, sys, time
from pathlib import Path
from lesion_fastai.files import PidLock
lock, inside = Path(sys.argv[1]), Path(sys.argv[2])
while not Path(sys.argv[3]).exists(): time.sleep(.001)          # every process starts at once
for _ in range(30):
    with PidLock(lock, 'x', wait=True, poll_s=.001):
        fd = os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # fails if another process is inside too
        time.sleep(.001)
        os.close(fd); os.unlink(inside)
"""


@pytest.mark.slow
def test_processes_that_find_one_stale_lock_at_once_take_it_one_at_a_time(tmp_path):
    (tmp_path / 'a.lock').write_text('999999999\n')                   # left by a process long gone
    go = tmp_path / 'go'
    runs = [subprocess.Popen([sys.executable, '-c', CONTEND, str(tmp_path / 'a.lock'), str(tmp_path / 'inside'), str(go)],
                             stderr=subprocess.PIPE, text=True) for _ in range(4)]
    time.sleep(2)
    go.touch()
    errs = [r.communicate(timeout=120)[1] for r in runs]
    assert [r.returncode for r in runs] == [0] * 4, [e[-500:] for e in errs]
    assert not (tmp_path / 'a.lock').exists() and not (tmp_path / 'inside').exists()


def test_a_second_run_on_the_same_out_is_refused_and_leaves_the_first_runs_folder_alone(tiny_data, tmp_path):
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'history.csv').write_text('the first run\n')
    first = _holder(out / '.run.lock')
    try:
        with pytest.raises(SystemExit) as e:
            finetune_cli.main(['--data', str(tiny_data), '--out', str(out), '--epochs', '1', '--bs', '2', '--size', '32'])
    finally: first.kill(); first.wait()
    assert f'is being written by another run (pid {first.pid})' in e.value.code and 'another --out' in e.value.code
    assert sorted(p.name for p in out.iterdir()) == ['.run.lock', 'history.csv'] and (out / 'history.csv').read_text() == 'the first run\n'


def _started(tiny_data, out, argv):
    "The folder of a run started with `argv` that finished one epoch (its run_config.json and a last.pth)."
    ap = finetune_cli.parser()
    cfg = from_args(FinetuneConfig, ap, ap.parse_args(['--data', str(tiny_data), '--out', str(out), *argv]), out=out)
    out.mkdir()
    save_run_settings(cfg, out)
    torch.save({'epoch': 0, 'model': {}}, out / 'last.pth')
    return sorted(p.name for p in out.iterdir())


def test_resume_with_other_settings_names_every_flag_that_differs(tiny_data, tmp_path):
    out = tmp_path / 'run'
    before = _started(tiny_data, out, ['--epochs', '3', '--bs', '2', '--size', '32'])
    with pytest.raises(SystemExit) as e:
        finetune_cli.main(['--data', str(tiny_data), '--out', str(out), '--resume', '--epochs', '1', '--bs', '2', '--size', '32',
                           '--lr', '0.01', '--head', 'gaussian', '--workers', '0'])
    msg = e.value.code
    assert msg.startswith('error: --resume:') and 'after 1 epoch(s)' in msg
    for flag in ("--epochs 1 (the run has 3)", "--lr 0.01 (the run has 0.003)", "--head 'gaussian' (the run has 'direct')"): assert flag in msg, msg
    assert '--num-workers' not in msg and '--workers' not in msg and '--bs' not in msg and '--size' not in msg
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.parametrize('flag, value, said', [('--bs', '4', '--bs 4 (the run has 2)'), ('--seed', '7', '--seed 7 (the run has 0)'),
                                               ('--size', '64', '--size 64 (the run has 32)'), ('--context', '1', '--context 1 (the run has 0)'),
                                               ('--data', 'OTHER', "--data 'OTHER' (the run has 'DATA')")])
def test_resume_names_each_other_setting(tiny_data, tmp_path, flag, value, said):
    other = tmp_path / 'other'
    shutil.copytree(tiny_data, other)
    out = tmp_path / 'run'
    base = {'--epochs': '3', '--bs': '2', '--size': '32', '--context': '0', '--seed': '0', '--data': str(tiny_data)}
    _started(tiny_data, out, [x for k, v in base.items() if k != '--data' for x in (k, v)])
    argv = {**base, flag: str(other) if value == 'OTHER' else value}
    with pytest.raises(SystemExit) as e: finetune_cli.main(['--out', str(out), '--resume', *[x for kv in argv.items() for x in kv]])
    assert said.replace('OTHER', str(other)).replace('DATA', str(tiny_data)) in e.value.code, e.value.code


@pytest.mark.parametrize('cut', [0, .5])
def test_an_unreadable_resume_state_is_a_named_error_saying_how_to_start_over(tiny_data, tmp_path, cut):
    out = tmp_path / 'run'
    _started(tiny_data, out, ['--epochs', '3', '--bs', '2', '--size', '32'])
    data = (out / 'last.pth').read_bytes()
    (out / 'last.pth').write_bytes(data[:int(len(data) * cut)])
    with pytest.raises(SystemExit) as e:
        finetune_cli.main(['--data', str(tiny_data), '--out', str(out), '--resume', '--epochs', '3', '--bs', '2', '--size', '32'])
    assert f'{out / "last.pth"} cannot be read' in e.value.code and 'start it over without --resume' in e.value.code


@pytest.fixture
def small_disk(tmp_path):
    "A 32 MB tmpfs (root can mount one; elsewhere the test skips)."
    mnt = tmp_path / 'disk'
    mnt.mkdir()
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=32m', 'tmpfs', str(mnt)], capture_output=True, text=True)
    if r.returncode: pytest.skip(f"cannot mount a small tmpfs here ({(r.stderr or r.stdout).strip()[:100]})")
    yield mnt
    subprocess.run(['umount', '-l', str(mnt)], capture_output=True)        # lazily: a failed run's frames may hold a file open


def _fill(mnt, leave: int = 0):
    "Fill the disk to `leave` bytes free."
    free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
    with open(mnt / f'filler{len(list(mnt.glob("filler*")))}', 'wb') as f:
        try: f.write(b'\0' * max(0, free - leave))
        except OSError: pass


def test_a_cache_on_a_full_disk_is_a_named_error_that_leaves_no_partial_array(tiny_data, small_disk):
    from lesion_fastai.cache import build_slice_cache
    from lesion_fastai.data import SliceSpec
    from lesion_fastai.deeplesion import load_data
    (small_disk / 'cache').mkdir()
    (small_disk / 'cache' / 'slices_0123456789abcdef.partial.npy').write_bytes(b'\0' * 4096)   # another build, interrupted
    _fill(small_disk, leave=64 * 1024)
    with pytest.raises(ValueError, match=r'needs .* GB in .* are free \(1 unfinished build\(s\) of other slices or settings hold 0.00 GB '
                                         r'there: slices_0123456789abcdef.partial.npy; .*\): free space, give --cache-dir on another disk'):
        build_slice_cache(load_data(tiny_data)[1], SliceSpec(size=64, context=1), small_disk / 'cache')
    assert [p.name for p in (small_disk / 'cache').glob('*partial*')] == ['slices_0123456789abcdef.partial.npy']


def test_a_named_error_raised_in_a_callback_reads_as_itself():
    "fastai puts the callback and event before an error raised in a callback; the command line's one error line must not carry it."
    from fastai.callback.core import Callback
    from lesion_fastai.files import DiskFullError
    from lesion_fastai.fit import _named_errors

    class Full(Callback):
        def after_epoch(self): raise DiskFullError('/runs/x/last.pth: the disk is full')
    with pytest.raises(DiskFullError) as e, _named_errors(): Full()('after_epoch')
    assert str(e.value) == '/runs/x/last.pth: the disk is full'
    with pytest.raises(DiskFullError, match='^Exception occured in `Full`'): Full()('after_epoch')     # what fastai alone says


def test_a_disk_that_fills_during_a_cache_build_is_a_named_error_that_gives_the_space_back(tiny_data, small_disk, monkeypatch):
    import lesion_fastai.cache as cache
    from lesion_fastai.data import SliceSpec
    from lesion_fastai.deeplesion import load_data
    real = cache.atomic_write_text

    def fill_then_write(path, text):                      # the disk fills after the array's blocks were reserved
        _fill(small_disk)
        return real(path, text)
    monkeypatch.setattr(cache, 'atomic_write_text', fill_then_write)
    with pytest.raises(ValueError, match=r'the disk is full .* the partial build was removed .* give --cache-dir on another disk'):
        cache.build_slice_cache(load_data(tiny_data)[1], SliceSpec(size=64, context=1), small_disk / 'cache')
    assert sorted(p.name for p in (small_disk / 'cache').iterdir()) == []


def test_a_full_disk_while_a_history_row_is_written_is_the_named_error(tmp_path):
    import errno
    from types import SimpleNamespace
    from lesion_fastai.callbacks import ResumableCSVLogger
    from lesion_fastai.files import DiskFullError

    class FullFile:
        def write(self, text): raise OSError(errno.ENOSPC, 'No space left on device')
    csv = ResumableCSVLogger('history.csv')
    csv.learn, csv.file, csv.old_logger = SimpleNamespace(path=tmp_path, epoch=1), FullFile(), lambda log: None
    with pytest.raises(DiskFullError, match=rf'^{re.escape(str(tmp_path / "history.csv"))}: the disk is full'): csv._write_line([1, .5])


@pytest.mark.slow
def test_a_full_disk_mid_run_is_a_named_error_and_the_last_epochs_checkpoints_stay_intact(tiny_data, small_disk):
    from fastai.callback.core import Callback
    from lesion_fastai.finetuning import finetune

    class FillAfterFirstEpoch(Callback):
        order = 99                                        # after the epoch's checkpoints are written
        def after_epoch(self):
            if self.epoch == 0: _fill(small_disk)
    out = small_disk / 'run'
    cfg = FinetuneConfig(data=tiny_data, out=out, epochs=3, bs=2, size=32, context=0)
    with pytest.raises(ValueError, match=rf'^{re.escape(str(out))}/\S+: the disk is full .* so it was not written; the files written '
                                         'before it are intact'):       # the named error as itself, not behind fastai's callback prefix
        finetune(cfg, cbs=[FillAfterFirstEpoch()])
    for f in small_disk.glob('filler*'): f.unlink()
    assert torch.load(out / 'last.pth', map_location='cpu', weights_only=False)['epoch'] == 0
    assert torch.load(out / 'models' / 'best.pth', map_location='cpu', weights_only=False)
    assert not [p for p in out.rglob('*.tmp')]
    assert json.loads((out / 'run_config.json').read_text())['epochs'] == 3


def test_a_run_started_before_a_setting_existed_resumes_with_what_it_was_made_with(tiny_data, tmp_path):
    "A run_config.json without adapter_gate was a run with ungated transfer layers: --no-adapter-gate resumes it, the default is named."
    from lesion_fastai.fit import check_resume
    out = tmp_path / 'run'
    _started(tiny_data, out, ['--epochs', '3', '--bs', '2', '--size', '32', '--freeze', 'sandwich', '--no-adapter-gate'])
    saved = json.loads((out / 'run_config.json').read_text())
    (out / 'run_config.json').write_text(json.dumps({k: v for k, v in saved.items() if k != 'adapter_gate'}))
    ap = finetune_cli.parser()
    args = lambda *extra: from_args(FinetuneConfig, ap, ap.parse_args(['--data', str(tiny_data), '--out', str(out), '--resume', '--epochs', '3',
                                                                        '--bs', '2', '--size', '32', '--freeze', 'sandwich', *extra]), out=out)
    check_resume(args('--no-adapter-gate'), out)
    with pytest.raises(ValueError, match=r'--adapter-gate True \(the run has False\)'): check_resume(args(), out)


def test_the_decoder_skips_count_only_in_a_decoder_sandwich(tiny_data, tmp_path):
    """An encoder sandwich recorded before --decoder-skips existed resumes with the default (it has no decoder to skip
    around); read as a decoder sandwich, the same record had no skips, and the default is named."""
    from lesion_fastai.fit import check_resume
    out = tmp_path / 'run'
    _started(tiny_data, out, ['--epochs', '3', '--bs', '2', '--size', '32', '--freeze', 'sandwich'])
    saved = {k: v for k, v in json.loads((out / 'run_config.json').read_text()).items() if k != 'decoder_skips'}
    (out / 'run_config.json').write_text(json.dumps(saved))
    ap = finetune_cli.parser()
    args = lambda *extra: from_args(FinetuneConfig, ap, ap.parse_args(['--data', str(tiny_data), '--out', str(out), '--resume', '--epochs', '3',
                                                                        '--bs', '2', '--size', '32', '--freeze', 'sandwich', *extra]), out=out)
    check_resume(args(), out)
    (out / 'run_config.json').write_text(json.dumps({**saved, 'sandwich': 'decoder'}))
    check_resume(args('--sandwich', 'decoder', '--no-decoder-skips'), out)
    with pytest.raises(ValueError, match=r'--decoder-skips True \(the run has False\)'): check_resume(args('--sandwich', 'decoder'), out)


def test_a_run_without_transfer_layers_resumes_whatever_their_settings_say(tiny_data, tmp_path):
    "A scratch run started with --no-adapter-gate and another --adapter-ratio resumes with the defaults: it has no transfer layer to differ."
    from lesion_fastai.fit import check_resume
    out = tmp_path / 'run'
    _started(tiny_data, out, ['--epochs', '3', '--bs', '2', '--size', '32', '--freeze', 'scratch', '--no-adapter-gate', '--adapter-ratio', '.5'])
    ap = finetune_cli.parser()
    args = lambda *extra: from_args(FinetuneConfig, ap, ap.parse_args(['--data', str(tiny_data), '--out', str(out), '--resume', '--epochs', '3',
                                                                        '--bs', '2', '--size', '32', *extra]), out=out)
    check_resume(args('--freeze', 'scratch'), out)
    with pytest.raises(ValueError) as e: check_resume(args('--freeze', 'sandwich'), out)     # as a sandwich, they are what differs
    assert "--adapter-gate True (the run has False)" in str(e.value) and "--adapter-ratio 1.0 (the run has 0.5)" in str(e.value)


def test_a_run_that_starts_over_in_a_run_folder_leaves_nothing_of_the_other_run_to_resume(tiny_data, tmp_path):
    ap = finetune_cli.parser()
    cfg = lambda *argv: from_args(FinetuneConfig, ap, ap.parse_args(['--data', str(tiny_data), '--out', str(tmp_path / 'run'), *argv]),
                                  out=tmp_path / 'run')
    out = tmp_path / 'run'
    _started(tiny_data, out, ['--epochs', '3', '--bs', '2', '--size', '32'])
    (out / 'models').mkdir()
    torch.save({}, out / 'models' / 'best.pth')
    save_run_settings(cfg('--epochs', '5', '--bs', '2', '--size', '32', '--resume'), out)      # continues: the run's own record kept
    assert json.loads((out / 'run_config.json').read_text())['epochs'] == 3 and (out / 'last.pth').exists()
    save_run_settings(cfg('--epochs', '5', '--bs', '2', '--size', '32'), out)                   # starts over in the same folder
    assert json.loads((out / 'run_config.json').read_text())['epochs'] == 5
    assert not (out / 'last.pth').exists() and not (out / 'models' / 'best.pth').exists()
    assert sorted(p.name for p in (out / 'previous').iterdir()) == ['best.pth', 'last.pth']     # aside, not lost
    # a run killed before its first epoch left only its record: a --resume with other settings starts over, recorded as itself
    save_run_settings(cfg('--epochs', '2', '--bs', '2', '--size', '32', '--resume'), out)
    assert json.loads((out / 'run_config.json').read_text())['epochs'] == 2
