"""Atomic writes, temp clean-up and the output folder's life cycle."""
import os
import subprocess
import sys

import pytest

from lesion_fastai.files import atomic_path, atomic_write_text, check_out_folder, output_folder, remove_stale_temps


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = atomic_write_text(tmp_path / 'a.json', 'old')
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('half of the new')
            raise RuntimeError('killed mid-write')
    assert target.read_text() == 'old' and sorted(p.name for p in tmp_path.iterdir()) == ['a.json']


def test_stale_temps_of_dead_writers_go_and_live_ones_stay(tmp_path):
    p = subprocess.Popen([sys.executable, '-c', 'pass']); p.wait()
    dead, live = tmp_path / 'models' / f'.best.pth.{p.pid}.tmp', tmp_path / f'.last.pth.{os.getpid()}.tmp'
    dead.parent.mkdir(); dead.write_text('x'); live.write_text('x')
    (tmp_path / 'notes.tmp').write_text('not ours')
    assert remove_stale_temps(tmp_path) == [dead]
    assert live.exists() and (tmp_path / 'notes.tmp').exists()


def test_output_folder_made_by_a_failed_run_is_removed_unless_it_can_resume(tmp_path):
    with pytest.raises(ValueError):
        with output_folder(tmp_path / 'runs' / 'a') as out:
            (out / 'history.csv').write_text('epoch\n')
            raise ValueError('bad input found late')
    assert not (tmp_path / 'runs').exists()                 # the parents it made too
    with pytest.raises(KeyboardInterrupt):
        with output_folder(tmp_path / 'b') as out:
            (out / 'last.pth').write_text('epoch 0')
            raise KeyboardInterrupt
    assert (tmp_path / 'b' / 'last.pth').exists()           # --resume needs it
    (tmp_path / 'c').mkdir(); (tmp_path / 'c' / 'old.txt').write_text('there before')
    with pytest.raises(ValueError):
        with output_folder(tmp_path / 'c'): raise ValueError
    assert (tmp_path / 'c' / 'old.txt').exists()             # what was there before stays


def test_check_out_folder(tmp_path):
    (tmp_path / 'f').write_text('x')
    with pytest.raises(ValueError, match='is a file, expected a folder'): check_out_folder(tmp_path / 'f')
    with pytest.raises(ValueError, match='f is a file, so no folder can be created below it'): check_out_folder(tmp_path / 'f' / 'sub')
    assert check_out_folder(tmp_path / 'new' / 'deeper') == tmp_path / 'new' / 'deeper'
    assert not (tmp_path / 'new').exists()                  # checking creates nothing
