"""Prepared slices, each PNG decoded once: windowed and area-averaged to the model size per PNG (a
"plane set", one per window), so that a key slice's channels are stacked from its cached neighbours
(`data.CTSlice`) and a PNG that neighbours five key slices is still decoded once.

Two caches hold them. The in-memory cache (a dict, the default) spares decoding after the first
epoch of one run; the disk cache (`build_slice_cache`, one memory-mapped float16 array) spares it
across runs and for data larger than memory, built once per slice set and settings (a
`data.SliceSpec`: windows, context, size) and read by every later run and every DataLoader worker
(how large DeepLesion's is and how long decoding takes: docs/results.md, `bench throughput` and `bench scale`).

    cache = build_slice_cache(records, SliceSpec('soft', 2, 256), '~/.cache/lesion_fastai')
    CTSlice(SliceSpec('soft', 2, 256), cache)      # stacks cached planes; a PNG not in the cache is decoded as usual

Every run checks the slices it needs before it trains (`prepare_slices`): the memory cache decodes them
all up front (the first epoch's work, done first), the disk cache decodes them while it is built, and
without a cache every file is checked without decoding. A slice that cannot be read stops the run
with one error naming every such file and the DL_info.csv line that needs it; with `skip_unreadable`
(`--skip-unreadable`: NIH's release ships two broken PNGs) such files are left out instead and named
once: a neighbour is replaced by the nearest readable slice of its series, as one DeepLesion did not
ship, and a key slice leaves the run with its lesions. The cache carries those files as `absent`,
which `CTSlice` treats as not shipped.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from . import distributed
from .deeplesion import SliceRecord, check_png, context_paths
from .files import NO_SPACE, DiskFullError, PidLock, atomic_write_text, remove_stale_temps
from .log import log, progress

__all__ = ['SliceCache', 'PlaneDict', 'NoCache', 'BadSlicesError', 'plane_units', 'cache_key', 'decode_all', 'check_files',
           'find_unreadable', 'readable', 'check_memory', 'build_slice_cache', 'prepare_slices', 'drop_near_duplicates', 'DEFAULT_CACHE_DIR']

DEFAULT_CACHE_DIR = Path.home() / '.cache' / 'lesion_fastai'


def _path_and_window(item):
    if isinstance(item, SliceRecord): return str(item.image_path), item.dicom_window
    return str(item), None


def plane_units(items, prep) -> dict:
    """The PNGs `items` need prepared, once each: `plane_key` -> (path, windows, the first item that needs
    it), in the order items need them (each key slice, then its neighbours)."""
    from .data import plane_key
    units = {}
    for item in items:
        path, dw = _path_and_window(item)
        wins = prep.windows_for(dw)
        for p in prep.neighbours(path):
            units.setdefault(plane_key(p, wins), (str(p), wins, item))
    return units


def cache_key(units: dict, spec) -> str:
    """A digest of the settings (a `SliceSpec`) and of every PNG's path, windows, file size and
    modification time: any change of settings, slices or files gives another cache."""
    h = hashlib.sha1(json.dumps({'windows': spec.windows, 'context': spec.context, 'size': spec.size, 'version': 3}).encode())
    for key, (path, _, _) in units.items():
        st = os.stat(path)
        h.update(f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}|{key.rsplit('|', 1)[1]}\n".encode())
    return h.hexdigest()[:16]


class PlaneDict(dict):
    """The in-memory cache: `plane_key` -> (planes [windows, size, size] float32, (width, height)), and the
    slice files the run leaves out as unreadable (`absent`, strings), which `CTSlice` treats as not shipped."""
    absent = frozenset()


class NoCache:
    "No cache (`--cache none`) that carries `absent` all the same: it keeps nothing, so `CTSlice` decodes every PNG."
    def __init__(self, absent=frozenset()): self.absent = frozenset(absent)
    def get(self, key, default=None): return default
    def __setitem__(self, key, value): pass
    def __contains__(self, key): return False


class SliceCache:
    """Dict-like view (`plane_key` -> (planes [windows, size, size] float32, (width, height))) of a built
    disk cache, for `CTSlice(cache=...)`. `index` maps each key to (row, width, height). `get`
    returns None for a PNG that is not in it (CTSlice then decodes it); assignments are ignored, so the
    file is never modified after it is built. Pickles without the mapped array (workers and exported
    learners reopen it lazily). `absent`: as `PlaneDict`'s."""
    absent = frozenset()

    def __init__(self, array_file: Path | str, index: dict[str, list[int]]):
        self.array_file, self.index, self._array = Path(array_file), index, None

    @property
    def array(self) -> np.ndarray:
        if self._array is None: self._array = np.load(self.array_file, mmap_mode='r')
        return self._array

    def get(self, key, default=None):
        entry = self.index.get(str(key))
        if entry is None: return default
        i, w, h = entry
        return torch.from_numpy(self.array[i].astype(np.float32)), (w, h)

    def __setitem__(self, key, value): pass
    def __contains__(self, key): return str(key) in self.index
    def __len__(self): return len(self.index)
    def __getstate__(self): return {**self.__dict__, '_array': None}
    def __repr__(self): return f"SliceCache({self.array_file}, {len(self)} PNGs)"


class BadSlicesError(ValueError):
    "Slices that cannot be read, each named with its problem and the DL_info.csv line that needs it."


def _who_needs(item, path) -> str:
    "Which DL_info.csv row needs the file at `path` (None: the item's own): the key slice itself, or a neighbour of it."
    if isinstance(item, SliceRecord):
        if path is None or Path(path) == Path(item.image_path): return f" (key slice of {item.where()})"
        return f" (neighbour slice needed by the key slice {Path(item.image_path).name} of {item.where()})"
    if path is not None and Path(path) != Path(_path_and_window(item)[0]): return f" (neighbour slice needed by {_path_and_window(item)[0]})"
    return ''


def _raise_problems(problems: list[str], n_items: int) -> None:
    if not problems: return
    shown = '\n  '.join(problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ''
    raise BadSlicesError(f"{len(problems)} of {n_items} slice(s) cannot be used; nothing was trained:\n  {shown}{more}")


def _decode_unit(prep, key, unit):
    "(key, (planes, (width, height)), None) for a PNG `prep` (a `CTSlice`) can prepare, else (key, None, the problem)."
    path, wins, item = unit
    try: planes, size = prep.planes(path, wins)
    except (ValueError, FileNotFoundError) as e: return key, None, f"{e}{_who_needs(item, getattr(e, 'path', None))}"
    return key, (planes, size), None


def _check_items(items, prep, sizes: dict) -> list[str]:
    """What the items' prepared PNGs (`sizes`: `plane_key` -> (width, height), those that could be read)
    say about the items: each key slice as large as its Image_size, each neighbour as large as its key."""
    from .data import plane_key
    problems = []
    for item in items:
        path, dw = _path_and_window(item)
        wins = prep.windows_for(dw)
        got = [(p, sizes.get(plane_key(p, wins))) for p in prep.neighbours(path)]
        if any(size is None for _, size in got): continue                # unreadable: named already
        (w, h) = got[0][1]
        if isinstance(item, SliceRecord) and (w, h) != (item.width, item.height):
            problems.append(f"{path}: {w} x {h} pixels, but Image_size in {item.where()} says {item.width} x {item.height} "
                            f"(its boxes are in those pixels)")
        for p, (pw, ph) in got[1:]:
            if (pw, ph) != (w, h): problems.append(f"{p}: size {(ph, pw)} differs from its key slice's {(h, w)}{_who_needs(item, p)}")
    return problems


def decode_all(items, prep, store, what: str = 'checking and preparing', units: dict | None = None) -> None:
    """Decode every PNG `items` need once with `prep` (a `CTSlice`), passing each to
    `store(plane_key, (planes, (width, height)))`; every slice that cannot be read (a key slice or a
    neighbour it needs) or disagrees with its row is collected, and one `BadSlicesError` names them all
    before any training starts. `units`: `plane_units(items, prep)`, where the caller has it."""
    units = plane_units(items, prep) if units is None else units
    problems, sizes = [], {}
    for key, unit in progress(list(units.items()), what):
        key, value, problem = _decode_unit(prep, key, unit)
        if problem: problems.append(problem); continue
        store(key, value)
        sizes[key] = value[1]
    _raise_problems(problems + _check_items(items, prep, sizes), len(units))


def _check_pass(items, context: int, absent: set, checked: set, problems: list, around: bool) -> bool:
    """One pass of `check_png` over the files `items` need that `checked` does not hold yet: each bad one
    joins `absent` and `problems` (with who needs it). With `around`, neighbours are looked up around
    `absent` (and an item whose key slice is in it is passed over). Whether it found a bad file."""
    found = False
    for item in progress(items, 'checking slice files'):
        key = _path_and_window(item)[0]
        if around and key in absent: continue
        for p in context_paths(key, context, absent if around else frozenset()):
            if str(p) in checked: continue
            checked.add(str(p))
            try: check_png(p)
            except (ValueError, OSError) as e:              # OSError: missing, or not readable by this user
                absent.add(str(p)); found = True
                problems.append(f"{e}{_who_needs(item, p)}")
    return found


def check_files(items, context: int) -> None:
    """Without decoding pixels: every key slice and neighbour `items` need is a readable 16-bit PNG
    (`deeplesion.check_png`); one `BadSlicesError` names every bad file."""
    problems, checked = [], set()
    _check_pass(items, context, set(), checked, problems, around=False)
    _raise_problems(problems, len(checked))


def find_unreadable(items, context: int) -> tuple[frozenset, list[str]]:
    """The slice files `items` need (key slices and their `context` neighbours) that are not readable 16-bit
    PNGs (`deeplesion.check_png`, no pixel decoded), as strings, and each one's problem and who needs it. A
    neighbour found unreadable is replaced by the nearest slice of its series not found so (`neighbour_path`),
    which is checked in turn, until every file the items then need reads."""
    absent, problems, checked = set(), [], set()
    while _check_pass(items, context, absent, checked, problems, around=True): pass
    return frozenset(absent), problems


def _denied(path) -> bool:
    "Whether `path` is there but this user may not read it (or may not look into its folder)."
    try: return Path(path).exists() and not os.access(path, os.R_OK)
    except OSError: return True


def _remembered_unreadable(items, context: int, folder) -> tuple[frozenset, list[str]]:
    """`find_unreadable(items, context)`, kept in `folder`/unreadable_<key>.json, whose key digests the items,
    `context` and the size and modification time of every PNG of their series: checking reads every byte of
    every file, opening the record reads their folders' listings."""
    h = hashlib.sha1(json.dumps({'context': context, 'version': 1}).encode())
    for item in items: h.update(f"{_path_and_window(item)[0]}\n".encode())     # as given: `absent` holds them so
    for series in sorted({Path(_path_and_window(item)[0]).parent for item in items}):
        try: entries = sorted((e for e in os.scandir(series) if e.name.endswith('.png')), key=lambda e: e.name)
        except OSError: continue
        for e in entries:
            st = e.stat()
            h.update(f"{e.path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    record = Path(folder).expanduser() / f'unreadable_{h.hexdigest()[:16]}.json'
    if record.is_file():
        found = json.loads(record.read_text())
        return frozenset(found['absent']), found['problems']
    absent, problems = find_unreadable(items, context)
    denied = any(_denied(p) for p in absent)           # this user's lack of rights, not the file's fault: not remembered
    if distributed.is_main() and not denied:
        record.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record, json.dumps({'absent': sorted(absent), 'problems': problems}))
    return absent, problems


def _without(items, absent) -> list:
    return [item for item in items if _path_and_window(item)[0] not in absent] if absent else list(items)


def readable(items, cache) -> list:
    "`items` less those whose key slice `cache` (a run's, `prepare_slices`) holds as unreadable."
    return _without(items, getattr(cache, 'absent', frozenset()))


CHUNK = 256   # PNGs per unit of work of a cache build: what a worker decodes at once and what an interruption loses at most


def _build_chunk(prep, array_file, rows, units):
    """Decode `units` ((key, (path, windows, item)) pairs) into `rows` of the partial array (opened by this
    process); returns ([key, row, width, height] of each, problems)."""
    arr = np.load(array_file, mmap_mode='r+')
    done, problems = [], []
    for r, (key, unit) in zip(rows, units):
        key, value, problem = _decode_unit(prep, key, unit)
        if problem: problems.append(problem); continue
        arr[r] = value[0].numpy().astype(np.float16)
        done.append([key, r, *value[1]])
    arr.flush()
    return done, problems


def build_slice_cache(items, spec, folder: Path | str = DEFAULT_CACHE_DIR, workers: int = 1, absent=frozenset()) -> SliceCache:
    """The cache of the PNGs `items` (`SliceRecord`s or PNG paths) need, prepared as `spec` says (a
    `SliceSpec`), in `folder`: opened if it exists, else built (each PNG decoded once, exactly as
    `CTSlice` prepares it, stored as float16) by `workers` processes, in chunks of `CHUNK` PNGs, with
    its size printed first. The build writes `slices_<key>.partial.npy` and records the finished
    chunks in `slices_<key>.partial.json` as it goes, so an interrupted build resumes where it
    stopped; the array takes its final name only when complete. A slice that cannot be read, or that
    disagrees with its row, stops the build with a `BadSlicesError` naming every such file. `absent`: the
    files to treat as not shipped (`find_unreadable`), in the cache returned."""
    from .data import CTSlice
    prep = CTSlice(spec, NoCache(absent))
    units = plane_units(items, prep)
    if not units: raise ValueError("build_slice_cache: no slices given")
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder, recursive=False)
    key = cache_key(units, spec)
    array_file, index_file = folder / f'slices_{key}.npy', folder / f'slices_{key}.json'
    if array_file.exists() and index_file.exists():
        return _with_absent(SliceCache(array_file, json.loads(index_file.read_text())['index']), absent)
    # one builder per key: a second process (another run sharing the folder) waits, then opens what the first built
    with PidLock(folder / f'slices_{key}.lock', f"the slice cache {array_file.name}", wait=True):
        if array_file.exists() and index_file.exists():
            return _with_absent(SliceCache(array_file, json.loads(index_file.read_text())['index']), absent)
        try: return _with_absent(_build(items, units, prep, spec, folder, key, array_file, index_file, workers), absent)
        except (OSError, DiskFullError) as e:
            if isinstance(e, OSError) and e.errno not in NO_SPACE: raise
            for f in _partial_files(folder, key): f.unlink(missing_ok=True)
            raise ValueError(f"the slice cache {folder}: the disk is full ({getattr(e, 'strerror', None) or 'a file could not be written'}); "
                             f"the partial build was removed to give its space back; {NO_ROOM}") from None


def _with_absent(cache, absent):
    if absent: cache.absent = frozenset(absent)
    return cache


def _partial_files(folder: Path, key: str) -> tuple[Path, Path]:
    "An unfinished build's array and its record of the finished chunks."
    return folder / f'slices_{key}.partial.npy', folder / f'slices_{key}.partial.json'


NO_ROOM = 'free space, give --cache-dir on another disk, or use --cache memory'     # what to do when the cache does not fit


def _build(items, units, prep, spec, folder, key, array_file, index_file, workers) -> SliceCache:
    n_windows = len(prep.windows_for(None))
    shape = (len(units), n_windows, spec.size, spec.size)
    partial, record = _partial_files(folder, key)
    state = json.loads(record.read_text()) if partial.exists() and record.exists() else None
    if state is None:
        need, free = np.prod(shape) * 2 + 4096, shutil.disk_usage(folder).free
        if need > free:
            others = [p for p in folder.glob('slices_*.partial.npy') if p != partial]     # builds interrupted under other settings
            held = (f" ({len(others)} unfinished build(s) of other slices or settings hold {sum(p.stat().st_size for p in others) / 1e9:.2f} "
                    f"GB there: {', '.join(p.name for p in others[:3])}{' ...' if len(others) > 3 else ''}; remove them unless you will "
                    f"rerun those settings)") if others else ''
            raise ValueError(f"the slice cache {array_file.name} needs {need / 1e9:.2f} GB in {folder} and {free / 1e9:.2f} GB are free"
                             f"{held}: {NO_ROOM}")
        np.lib.format.open_memmap(partial, mode='w+', dtype=np.float16, shape=shape).flush()
        try:                                     # reserve the blocks now: a full disk under a memory map is a SIGBUS later
            with open(partial, 'r+b') as f: os.posix_fallocate(f.fileno(), 0, os.path.getsize(partial))
        except OSError:
            partial.unlink(missing_ok=True)
            raise
    index = {k: e for k, *e in (state or {}).get('entries', [])}
    chunks = [c for c in range(0, len(units), CHUNK) if c not in set((state or {}).get('chunks', []))]
    finished = sorted(set((state or {}).get('chunks', [])))
    log.info(f"slice cache {array_file.name}: {len(units):,} PNGs x {n_windows} window(s) x {spec.size} x {spec.size} float16 = "
             f"{np.prod(shape) * 2 / 1e9:.2f} GB in {folder}" + (f"; resuming, {len(finished)} of {len(finished) + len(chunks)} chunks built"
                                                                  if finished else '') + f"; {workers} process(es)")
    pairs = list(units.items())
    problems = list((state or {}).get('problems', []))      # those of the chunks built before an interruption
    jobs = ((prep, partial, list(range(c, min(c + CHUNK, len(pairs)))), pairs[c:c + CHUNK]) for c in chunks)
    pool = None
    if workers > 1 and len(chunks) > 1:
        import multiprocessing as mp
        pool = mp.get_context('spawn').Pool(workers)
        results = pool.imap(_build_chunk_args, jobs)
    else: results = map(_build_chunk_args, jobs)
    try:
        for c, (done, bad) in zip(chunks, progress(results, f'building the slice cache ({CHUNK} PNGs a step)', total=len(chunks))):
            problems += bad
            for k, r, w, h in done: index[k] = [r, w, h]
            finished.append(c)
            atomic_write_text(record, json.dumps({'chunks': finished, 'entries': [[k, *e] for k, e in index.items()], 'problems': problems}))
    finally:
        if pool is not None: pool.terminate()
    problems += _check_items(items, prep, {k: (w, h) for k, (_, w, h) in index.items()})
    if not problems and len(index) != len(units):   # a record from before problems were recorded: never a cache with holes
        problems = [f"{units[k][0]}: not in the interrupted build's record{_who_needs(units[k][2], units[k][0])}" for k in units if k not in index]
    if problems:                                 # a fixed file changes the key, so this partial build is of no further use
        partial.unlink(missing_ok=True); record.unlink(missing_ok=True)
        _raise_problems(problems, len(units))
    meta = {'windows': spec.windows, 'context': spec.context, 'size': spec.size, 'n': len(index), 'index': index}
    atomic_write_text(index_file, json.dumps(meta))
    os.replace(partial, array_file)               # renamed last: its presence means the cache is complete
    record.unlink(missing_ok=True)
    return SliceCache(array_file, index)


def _build_chunk_args(args): return _build_chunk(*args)


def prepare_slices(kind: str, items, spec, folder=None, workers: int = 1, skip_unreadable: bool = False):
    """Check every slice a run needs before it trains, and return the `cache` argument of its slice block:
    'memory' decodes every PNG now into a `PlaneDict` (the work the first epoch would do, done up front),
    'disk' builds or opens the memory-mapped cache (`build_slice_cache`; rank 0 first, the one that
    writes), 'none' checks the files without decoding (`check_files`) and returns None. A bad slice
    raises `BadSlicesError`; with `skip_unreadable` the files that cannot be read are named once and left
    out instead (`find_unreadable`), carried as the cache's `absent` (`readable` drops the items whose
    key slice is among them)."""
    absent = frozenset()
    if skip_unreadable:
        if kind == 'disk':                 # remembered beside the cache: a later run over unchanged files reads none of them again
            with distributed.main_first(): absent, problems = _remembered_unreadable(items, spec.context, folder or DEFAULT_CACHE_DIR)
        else: absent, problems = find_unreadable(items, spec.context)
        if problems:
            kept = _without(items, absent)
            rows = [item.where() for item in items if isinstance(item, SliceRecord) and str(item.image_path) in absent]
            listed = lambda xs: '\n  '.join(xs[:20]) + (f"\n  ... and {len(xs) - 20} more" if len(xs) > 20 else '')
            log.warning(f"--skip-unreadable: {len(problems)} slice file(s) cannot be read and are left out, {len(items) - len(kept)} of "
                        f"the run's {len(items)} slices with them (a neighbour is replaced by the nearest readable slice of its "
                        f"series):\n  {listed(problems)}" + (f"\nthe key slices left out, with their lesions:\n  {listed(rows)}" if rows else ''))
            if not kept: raise BadSlicesError(f"--skip-unreadable: none of the {len(items)} slices can be read")
            items = kept
    try: return _prepare(kind, items, spec, folder, workers, absent, check=not skip_unreadable)
    except BadSlicesError as e:
        if skip_unreadable: raise
        raise BadSlicesError(f"{e}\n  (--skip-unreadable, of pretrain and finetune, leaves out the slice files that cannot be read)") from None


def _prepare(kind, items, spec, folder, workers, absent, check):
    from .data import CTSlice
    if kind == 'disk':
        with distributed.main_first():     # launched in several processes: rank 0 builds it, the others then open it
            return build_slice_cache(items, spec, folder or DEFAULT_CACHE_DIR, workers, absent)
    if kind == 'none':
        if check: check_files(items, spec.context)             # else find_unreadable has checked them
        return NoCache(absent) if absent else None
    if kind != 'memory': raise ValueError(f"cache {kind!r}: expected 'memory', 'disk' or 'none'")
    prep, cache = CTSlice(spec, NoCache(absent)), _with_absent(PlaneDict(), absent)
    units = plane_units(items, prep)
    check_memory(len(units) * len(prep.windows_for(None)) * spec.size ** 2 * 4, len(units))
    decode_all(items, prep, cache.__setitem__, units=units)
    return cache


def available_memory() -> int | None:
    """Bytes of memory this machine can give a process without swapping: Linux's MemAvailable, or less where a
    cgroup (a container, a Slurm job) limits the process to less; None where unknown."""
    try:
        with open('/proc/meminfo') as f: fields = dict(line.split(':', 1) for line in f)
        free = int(fields['MemAvailable'].split()[0]) * 1024
    except (OSError, KeyError, ValueError): return None
    try:
        limit = Path('/sys/fs/cgroup/memory.max').read_text().strip()
        if limit != 'max': free = min(free, int(limit) - int(Path('/sys/fs/cgroup/memory.current').read_text()))
    except (OSError, ValueError): pass
    return free


def check_memory(need: int, n_slices: int, share: float = .8) -> None:
    """--cache memory: a ValueError before any slice is decoded when the prepared slices (`need` bytes, float32, in
    each of the processes a launcher started on this machine) would take more than `share` of the memory
    available, saying what fits instead."""
    free, local = available_memory(), int(os.environ.get('LOCAL_WORLD_SIZE', 1))
    if free is None or need * local <= share * free: return
    each = f" in each of {local} processes" if local > 1 else ''
    raise ValueError(f"--cache memory: the {n_slices:,} slices this run prepares take about {need / 1e9:.1f} GB of memory{each} and "
                     f"{free / 1e9:.1f} GB are available: use --cache disk (a float16 array of about {need / 2e9:.1f} GB "
                     f"on disk, built once and shared by later runs and processes; --cache-dir to choose the disk)")


def drop_near_duplicates(paths, prep, threshold: float, keep=None) -> tuple[list, int]:
    """`paths` without the slices that barely differ from the slice kept before them in their series:
    the mean absolute difference of their prepared pixels ([0, 1] windows, the training size) under
    `threshold`. Each series' first slice is kept, and so is every path `keep(path)` says to keep (the
    validation slices, say). `prep` (a `CTSlice`, with the run's cache) prepares them. Returns the
    kept paths, in their order, and how many were dropped."""
    kept, dropped, last = [], 0, {}
    for p in paths:
        folder = Path(p).parent
        t = prep.load(p).as_subclass(torch.Tensor)
        ref = last.get(folder)
        if ref is not None and (keep is None or not keep(p)) and ref.shape == t.shape and float((t - ref).abs().mean()) < threshold:
            dropped += 1
            continue
        kept.append(p)
        last[folder] = t
    return kept, dropped
