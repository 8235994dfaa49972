"""A preprocessed slice cache on disk: windowed, downsampled slices in one memory-mapped float16 array,
built once for a set of slices and settings (a `data.SliceSpec`: windows, context, size) and reused by
every later run and every DataLoader worker.

The in-memory cache (a dict, the default) spares PNG decoding after the first epoch of one run. This
one spares it across runs and for data larger than memory, decoded once instead of once per epoch (how
large DeepLesion's is and how long decoding takes: README, `bench throughput` and `bench scale`).

    cache = build_slice_cache(records, SliceSpec('soft', 0, 256), '~/.cache/lesion_fastai')
    CTSlice(SliceSpec('soft', 0, 256), cache)      # reads the array; items not in the cache are decoded as usual

Every run checks the slices it needs before it trains (`prepare_slices`): the memory cache decodes them
all up front (the first epoch's work, done first), the disk cache decodes them while it is built, and
without a cache every file is checked without decoding. A slice that cannot be read stops the run
with one error naming every such file and the DL_info.csv line that needs it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from . import distributed
from .deeplesion import SliceRecord, check_png, context_paths
from .files import atomic_write_text, remove_stale_temps
from .log import log, progress

__all__ = ['SliceCache', 'BadSlicesError', 'cache_key', 'decode_all', 'check_files', 'build_slice_cache', 'prepare_slices',
           'drop_near_duplicates', 'DEFAULT_CACHE_DIR']

DEFAULT_CACHE_DIR = Path.home() / '.cache' / 'lesion_fastai'


def _path_and_window(item):
    if isinstance(item, SliceRecord): return str(item.image_path), item.dicom_window
    return str(item), None


def cache_key(items, spec) -> str:
    """A digest of the settings (a `SliceSpec`) and of every item's path, file size and modification
    time: any change of settings, slices or files gives another cache."""
    h = hashlib.sha1(json.dumps({'windows': spec.windows, 'context': spec.context, 'size': spec.size, 'version': 2}).encode())
    for item in items:
        path, dw = _path_and_window(item)
        st = os.stat(path)
        h.update(f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}|{dw}\n".encode())
    return h.hexdigest()[:16]


class SliceCache:
    """Dict-like view (path -> `TensorCT` [C, size, size] float32 with the file's `orig_size`) of a built
    cache, for `CTSlice(cache=...)`. `index` maps each path to (row, width, height). `get` returns None
    for a path that is not in it (CTSlice then decodes the PNG); assignments are ignored, so the file
    is never modified after it is built. Pickles without the mapped array (workers and exported
    learners reopen it lazily)."""
    def __init__(self, array_file: Path | str, index: dict[str, list[int]]):
        self.array_file, self.index, self._array = Path(array_file), index, None

    @property
    def array(self) -> np.ndarray:
        if self._array is None: self._array = np.load(self.array_file, mmap_mode='r')
        return self._array

    def get(self, path, default=None):
        from .data import TensorCT
        entry = self.index.get(str(path))
        if entry is None: return default
        i, w, h = entry
        return TensorCT(torch.from_numpy(self.array[i].astype(np.float32)), orig_size=(w, h))

    def __setitem__(self, path, value): pass
    def __contains__(self, path): return str(path) in self.index
    def __len__(self): return len(self.index)
    def __getstate__(self): return {**self.__dict__, '_array': None}
    def __repr__(self): return f"SliceCache({self.array_file}, {len(self)} slices)"


class BadSlicesError(ValueError):
    "Slices that cannot be read, each named with its problem and the DL_info.csv line that needs it."


def _who_needs(item, error) -> str:
    "Which DL_info.csv row needs the file an error names: the key slice itself, or a neighbour of it."
    path = getattr(error, 'path', None)
    if isinstance(item, SliceRecord):
        if path is None or path == Path(item.image_path): return f" (key slice of {item.where()})"
        return f" (neighbour slice needed by the key slice {Path(item.image_path).name} of {item.where()})"
    if path is not None and path != Path(_path_and_window(item)[0]): return f" (neighbour slice needed by {_path_and_window(item)[0]})"
    return ''


def _raise_problems(problems: list[str], n_items: int) -> None:
    if not problems: return
    shown = '\n  '.join(problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ''
    raise BadSlicesError(f"{len(problems)} of {n_items} slice(s) cannot be used; nothing was trained:\n  {shown}{more}")


def _decode(prep, item):
    "(path, tensor, None) for a slice that `prep` (a `CTSlice`) can prepare, else (path, None, the problem)."
    path, dw = _path_and_window(item)
    try: t = prep.load(path, dw)
    except (ValueError, FileNotFoundError) as e: return path, None, f"{e}{_who_needs(item, e)}"
    if isinstance(item, SliceRecord) and tuple(t.orig_size) != (item.width, item.height):
        return path, None, (f"{path}: {t.orig_size[0]} x {t.orig_size[1]} pixels, but Image_size in {item.where()} says "
                            f"{item.width} x {item.height} (its boxes are in those pixels)")
    return path, t, None


def decode_all(items, prep, store, what: str = 'checking and preparing') -> None:
    """Decode every item once with `prep` (a `CTSlice`), passing each result to `store(i, path, tensor)`;
    every slice that cannot be read (the key slice or a neighbour it needs) is collected, and one
    `BadSlicesError` names them all before any training starts."""
    problems = []
    for i, item in enumerate(progress(items, what)):
        path, t, problem = _decode(prep, item)
        if problem: problems.append(problem)
        else: store(i, path, t)
    _raise_problems(problems, len(items))


def check_files(items, context: int) -> None:
    """Without decoding pixels: every key slice and neighbour `items` need is a readable 16-bit PNG
    (`deeplesion.check_png`); one `BadSlicesError` names every bad file."""
    problems, seen = [], set()
    for item in progress(items, 'checking slice files'):
        for p in context_paths(_path_and_window(item)[0], context):
            if p in seen: continue
            seen.add(p)
            try: check_png(p)
            except (ValueError, FileNotFoundError) as e: problems.append(f"{e}{_who_needs(item, e)}")
    _raise_problems(problems, len(seen))


CHUNK = 256   # slices per unit of work of a cache build: what a worker decodes at once and what an interruption loses at most


def _build_chunk(prep, array_file, rows, items):
    "Decode `items` into `rows` of the partial array (opened by this process); returns (row, path, width, height) or problems."
    arr = np.load(array_file, mmap_mode='r+')
    done, problems = [], []
    for r, item in zip(rows, items):
        path, t, problem = _decode(prep, item)
        if problem: problems.append(problem); continue
        arr[r] = t.numpy().astype(np.float16)
        done.append([r, path, *t.orig_size])
    arr.flush()
    return done, problems


def build_slice_cache(items, spec, folder: Path | str = DEFAULT_CACHE_DIR, workers: int = 1) -> SliceCache:
    """The cache of `items` (`SliceRecord`s or PNG paths) prepared as `spec` says (a `SliceSpec`) in `folder`: opened if it
    exists, else built (each slice decoded once, exactly as `CTSlice` prepares it, stored as float16)
    by `workers` processes, in chunks of `CHUNK` slices, with its size printed first. The build writes
    `slices_<key>.partial.npy` and records the finished chunks in `slices_<key>.partial.json` as it
    goes, so an interrupted build resumes where it stopped; the array takes its final name only when
    complete. A slice that cannot be read stops the build with a `BadSlicesError` naming every such file."""
    from .data import CTSlice
    items = list({_path_and_window(i)[0]: i for i in items}.values())      # one entry per slice
    if not items: raise ValueError("build_slice_cache: no slices given")
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder, recursive=False)
    key = cache_key(items, spec)
    array_file, index_file = folder / f'slices_{key}.npy', folder / f'slices_{key}.json'
    if array_file.exists() and index_file.exists():
        return SliceCache(array_file, json.loads(index_file.read_text())['index'])
    prep = CTSlice(spec)
    shape = (len(items), prep.n_channels, spec.size, spec.size)
    partial, record = folder / f'slices_{key}.partial.npy', folder / f'slices_{key}.partial.json'
    state = json.loads(record.read_text()) if partial.exists() and record.exists() else None
    if state is None: np.lib.format.open_memmap(partial, mode='w+', dtype=np.float16, shape=shape).flush()
    index = {p: e for p, *e in (state or {}).get('entries', [])}
    chunks = [c for c in range(0, len(items), CHUNK) if c not in set((state or {}).get('chunks', []))]
    finished = sorted(set((state or {}).get('chunks', [])))
    log.info(f"slice cache {array_file.name}: {len(items):,} slices x {prep.n_channels} channel(s) x {spec.size} x {spec.size} float16 = "
             f"{np.prod(shape) * 2 / 1e9:.2f} GB in {folder}" + (f"; resuming, {len(finished)} of {len(finished) + len(chunks)} chunks built"
                                                                  if finished else '') + f"; {workers} process(es)")
    problems = []
    jobs = ((prep, partial, list(range(c, min(c + CHUNK, len(items)))), items[c:c + CHUNK]) for c in chunks)
    pool = None
    if workers > 1 and len(chunks) > 1:
        import multiprocessing as mp
        pool = mp.get_context('spawn').Pool(workers)
        results = pool.imap(_build_chunk_args, jobs)
    else: results = map(_build_chunk_args, jobs)
    try:
        for c, (done, bad) in zip(chunks, progress(results, f'building the slice cache ({CHUNK} slices a step)', total=len(chunks))):
            problems += bad
            for r, path, w, h in done: index[path] = [r, w, h]
            finished.append(c)
            atomic_write_text(record, json.dumps({'chunks': finished, 'entries': [[p, *e] for p, e in index.items()]}))
    finally:
        if pool is not None: pool.terminate()
    if problems:                                 # a fixed file changes the key, so this partial build is of no further use
        partial.unlink(missing_ok=True); record.unlink(missing_ok=True)
        _raise_problems(problems, len(items))
    meta = {'windows': spec.windows, 'context': spec.context, 'size': spec.size, 'n': len(index), 'index': index}
    atomic_write_text(index_file, json.dumps(meta))
    os.replace(partial, array_file)               # renamed last: its presence means the cache is complete
    record.unlink(missing_ok=True)
    return SliceCache(array_file, index)


def _build_chunk_args(args): return _build_chunk(*args)


def prepare_slices(kind: str, items, spec, folder=None, workers: int = 1):
    """Check every slice a run needs before it trains, and return the `cache` argument of its slice block:
    'memory' decodes every slice now into a dict (the work the first epoch would do, done up front),
    'disk' builds or opens the memory-mapped cache (`build_slice_cache`; rank 0 first, the one that writes), 'none' checks the files
    without decoding (`check_files`) and returns None. A bad slice raises `BadSlicesError`."""
    from .data import CTSlice
    if kind == 'disk':
        with distributed.main_first():     # launched in several processes: rank 0 builds it, the others then open it
            return build_slice_cache(items, spec, folder or DEFAULT_CACHE_DIR, workers)
    if kind == 'none':
        check_files(items, spec.context)
        return None
    if kind != 'memory': raise ValueError(f"cache {kind!r}: expected 'memory', 'disk' or 'none'")
    items = list({_path_and_window(i)[0]: i for i in items}.values())
    cache = {}
    decode_all(items, CTSlice(spec), lambda i, path, t: cache.__setitem__(path, t))
    return cache


def drop_near_duplicates(paths, cache, prep, threshold: float, keep=None) -> tuple[list, int]:
    """`paths` without the slices that barely differ from the slice kept before them in their series:
    the mean absolute difference of their prepared pixels ([0, 1] windows, the training size) under
    `threshold`. Each series' first slice is kept, and so is every path `keep(path)` says to keep (the
    validation slices, say). Prepared slices come from `cache` when it has them, else from `prep`
    (a `CTSlice`). Returns the kept paths, in their order, and how many were dropped."""
    kept, dropped, last = [], 0, {}
    for p in paths:
        folder = Path(p).parent
        t = cache.get(str(p)) if cache is not None else None
        t = (t if t is not None else prep.load(p)).as_subclass(torch.Tensor)
        ref = last.get(folder)
        if ref is not None and (keep is None or not keep(p)) and ref.shape == t.shape and float((t - ref).abs().mean()) < threshold:
            dropped += 1
            continue
        kept.append(p)
        last[folder] = t
    return kept, dropped
