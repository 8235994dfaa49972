"""Files a run writes: atomic writes (temp file + rename) for checkpoints, JSON, CSV, figures and exports,
clean-up of temp files left by a killed run, and the output-folder checks made before any work starts.

Every temp file is named `.<name>.<pid>.tmp` beside its target, so a killed writer leaves a file that
`remove_stale_temps` recognises (its process is gone) and no half-written file under the real name.
"""
from __future__ import annotations

import csv
import errno
import io
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

__all__ = ['atomic_path', 'atomic_write_text', 'write_json', 'write_csv', 'remove_stale_temps', 'check_out_folder', 'output_folder']

_TEMP_RE = re.compile(r'^\..+\.(\d+)\.tmp$')


@contextmanager
def atomic_path(path: Path | str):
    """Yield a temp path beside `path` to write to; on success it is renamed to `path` (atomic on one
    file system), on any error it is removed, so `path` is either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists(): tmp.unlink()


def atomic_write_text(path: Path | str, text: str) -> Path:
    "Write `text` to `path` atomically."
    with atomic_path(path) as tmp: tmp.write_text(text)
    return Path(path)


def write_json(obj, path: Path | str) -> Path:
    "Write `obj` as indented JSON atomically (values JSON does not know are written as strings)."
    return atomic_write_text(path, json.dumps(obj, indent=2, default=str))


def write_csv(path: Path | str, header, rows) -> Path:
    "Write a CSV file (`header`, then `rows`, '\\n' line ends) atomically."
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator='\n')
    w.writerow(header)
    w.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def _alive(pid: int) -> bool:
    if pid == os.getpid(): return True
    try: os.kill(pid, 0)
    except ProcessLookupError: return False
    except PermissionError: return True
    return True


def remove_stale_temps(folder: Path | str, recursive: bool = True) -> list[Path]:
    """Remove temp files of `atomic_path` under `folder` whose writing process no longer runs (a run
    killed mid-write); returns what was removed. Temp files of running processes are left alone."""
    folder = Path(folder)
    if not folder.is_dir(): return []
    removed = []
    for p in (folder.rglob('.*.tmp') if recursive else folder.glob('.*.tmp')):
        m = _TEMP_RE.match(p.name)
        if m and p.is_file() and not _alive(int(m[1])):
            p.unlink()
            removed.append(p)
    return removed


def check_out_folder(out: Path | str, flag: str = '--out') -> Path:
    """Fail before any work when `out` cannot be a writable output folder: an existing file, a path
    below a file, or a folder (or the nearest existing parent) this process cannot write to."""
    out = Path(out)
    if out.exists() and not out.is_dir(): raise ValueError(f"{flag} {out} is a file, expected a folder (or a path to create one)")
    parent = out
    while not parent.exists(): parent = parent.parent
    if not parent.is_dir(): raise ValueError(f"{flag} {out}: {parent} is a file, so no folder can be created below it")
    if not _writable(parent):
        raise ValueError(f"{flag} {out}: {parent} is not writable by this user; choose another {flag}")
    return out


def _writable(folder: Path) -> bool:
    "Whether a file can really be created in `folder` (os.access says yes to root on read-only mounts)."
    if not os.access(folder, os.W_OK | os.X_OK): return False
    probe = folder / f'.write-probe.{os.getpid()}.tmp'
    try: probe.touch(); probe.unlink()
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT): return False
        raise
    return True


@contextmanager
def output_folder(out: Path | str, keep_if: str = 'last.pth'):
    """Create `out` for a run. If the run fails and this call created the folder, the folder is removed
    unless it holds `keep_if` (a resume state: a run that finished epochs keeps what `--resume` needs),
    so a run that fails before training leaves nothing behind. Stale temp files of killed runs in it
    are removed first."""
    out = Path(out)
    top = None                                   # the outermost folder this call creates, if any
    for p in (out, *out.parents):
        if p.exists(): break
        top = p
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    try: yield out
    except BaseException:
        if top is not None and not (out / keep_if).exists(): shutil.rmtree(top, ignore_errors=True)
        raise
