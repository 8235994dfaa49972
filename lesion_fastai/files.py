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

__all__ = ['atomic_path', 'atomic_write_text', 'write_json', 'write_csv', 'remove_stale_temps', 'check_out_folder', 'output_folder',
           'PidLock', 'LockedError', 'DiskFullError', 'disk_full', 'pid_alive', 'NO_SPACE']

_TEMP_RE = re.compile(r'^\..+\.(\d+)\.tmp$')
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)       # the errnos of a write that found no room


@contextmanager
def atomic_path(path: Path | str):
    """Yield a temp path beside `path` to write to; on success it is flushed to the disk and renamed to
    `path` (atomic on one file system, and the rename itself flushed), on any error it is removed, so
    `path` is either the old file or the complete new one, after a lost machine too."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent, strict=False)
    except (OSError, RuntimeError) as e:
        if not _disk_full(e, path.parent): raise
        if tmp.exists(): tmp.unlink()
        raise disk_full(path) from None
    finally:
        if tmp.exists(): tmp.unlink()


def _fsync(path: Path, strict: bool = True) -> None:
    """Flush a file's (or a folder's entries') writes to the disk, where the file system allows it; a full disk
    raises where `strict` (a file not yet renamed into place: it was not written)."""
    try: fd = os.open(path, os.O_RDONLY)
    except OSError: return
    try: os.fsync(fd)
    except OSError as e:
        if strict and e.errno in NO_SPACE: raise
    finally: os.close(fd)


class DiskFullError(ValueError):
    "A file could not be written for want of space; the message names it."


def disk_full(path: Path) -> DiskFullError:
    "The error for `path`, not written for want of space: how much is free, and that a run can resume."
    free = shutil.disk_usage(path.parent).free
    return DiskFullError(f"{path}: the disk is full ({free / 1e6:.1f} MB free in {path.parent}), so it was not written; the files "
                         f"written before it are intact (an interrupted run continues from its last.pth with --resume once there "
                         f"is space)")


def _disk_full(e: BaseException, folder: Path) -> bool:
    """ENOSPC / EDQUOT, or a writer that says less (torch's zip writer raises a RuntimeError from
    inline_container.cc) on a disk with less than 1 MB left for this user."""
    if isinstance(e, OSError) and e.errno in NO_SPACE: return True
    try: return shutil.disk_usage(folder).free < 2 ** 20
    except OSError: return False


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


def pid_alive(pid: int) -> bool:
    "Whether process `pid` runs on this machine (this process counts; one of another user's too)."
    if pid == os.getpid(): return True
    try: os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError): return False      # no such process (or no pid at all)
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
        if m and p.is_file() and not pid_alive(int(m[1])):
            p.unlink()
            removed.append(p)
    return removed


class LockedError(ValueError):
    "Another live process holds the lock; `pid` is its process id."
    def __init__(self, message: str, pid: int):
        super().__init__(message)
        self.pid = pid


def _lock_owner(path: Path) -> int | None:
    try: return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError): return None


class PidLock:
    """The lock file `path`, taken with `acquire` (or `with`): an exclusive `flock` on it, which the
    kernel lets go of when its process ends however it ends, so a killed owner leaves no lock to take
    over by hand (two processes that found one stale lock at once could both have taken it). The file
    holds its owner's pid, for the message. Held by another process: `acquire` raises `LockedError`
    naming `what` and the pid, or with `wait`, waits until it is released."""

    def __init__(self, path: Path | str, what: str, wait: bool = False, poll_s: float = 1.):
        self.path, self.what, self.wait, self.poll_s = Path(path), what, wait, poll_s
        self.fd = None

    def acquire(self) -> 'PidLock':
        import fcntl
        import time
        said = False
        while True:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                owner = _lock_owner(self.path)
                if not self.wait: raise LockedError(f"{self.what} is in use by another process (pid {owner}, lock {self.path})", owner) from None
                if not said:
                    from .log import log
                    log.info(f"waiting for process {owner}, which holds {self.path} ({self.what})")
                    said = True
                time.sleep(self.poll_s)
                continue
            try: current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError: current = False
            if not current:                              # locked a file its owner removed on release: take the new one
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f'{os.getpid()}\n'.encode())
            self.fd = fd
            return self

    def release(self) -> None:
        if self.fd is None: return
        self.path.unlink(missing_ok=True)                # while still held: a waiter that locks the old file sees it gone
        os.close(self.fd)
        self.fd = None

    def __enter__(self): return self.acquire()

    def __exit__(self, *exc): self.release()


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
    are removed first. While the run writes, it holds `OUT/.run.lock`: a second run given the same
    folder at the same time is refused with a `LockedError` and touches nothing of the first's."""
    out = Path(out)
    top = None                                   # the outermost folder this call creates, if any
    for p in (out, *out.parents):
        if p.exists(): break
        top = p
    out.mkdir(parents=True, exist_ok=True)
    lock = PidLock(out / '.run.lock', f"--out {out}")
    try: lock.acquire()
    except LockedError as e:                      # another run writes there: its folder is left alone
        raise LockedError(f"--out {out} is being written by another run (pid {e.pid}): wait for it to finish, "
                          f"or give this run another --out", e.pid) from None
    try:
        remove_stale_temps(out)
        yield out
    except BaseException:
        if top is not None and not (out / keep_if).exists(): shutil.rmtree(top, ignore_errors=True)
        raise
    finally: lock.release()
