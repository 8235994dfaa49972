"""The slice caches: each PNG decoded once however many key slices use it, the same pixels as decoding
(to float16 on disk), built once, rebuilt when anything changes, never left half-built."""
import os
import pickle

import numpy as np
import pytest
import torch

from lesion_fastai.cache import SliceCache, build_slice_cache, prepare_slices
from lesion_fastai.data import CTSlice, SliceSpec, plane_key
from lesion_fastai.deeplesion import list_slices, load_hu
from lesion_fastai.config import FinetuneConfig
from lesion_fastai.finetuning import finetune


@pytest.mark.parametrize('windows,context', [('soft', 0), ('dicom,lung', 1)])
def test_cached_slices_equal_decoded_ones(tiny_records, tmp_path, windows, context):
    recs = tiny_records[:5]
    cache = build_slice_cache(recs, SliceSpec(windows, context, 32), tmp_path)
    prep, cached = CTSlice(SliceSpec(windows, context, 32)), CTSlice(SliceSpec(windows, context, 32), cache)
    pngs = {(str(p), r.dicom_window if 'dicom' in windows else None) for r in recs for p in prep.neighbours(r.image_path)}
    assert len(cache) == len(pngs) >= len(recs)                 # one entry per PNG (and window), whatever needs it
    for r in recs:
        want = prep(r)
        got = cached(r)
        assert got.shape == want.shape == (prep.n_channels, 32, 32) and got.dtype == torch.float32
        assert torch.allclose(got, want, atol=1e-3)          # float16 storage of values in [0, 1]
    assert cache.get('not/a/cached.png') is None


def test_cache_is_reused_and_rebuilt_when_settings_or_files_change(tiny_data, tmp_path):
    paths = list_slices(tiny_data)[:6]
    a = build_slice_cache(paths, SliceSpec('soft', 0, 32), tmp_path)
    stamp = a.array_file.stat().st_mtime_ns
    assert build_slice_cache(paths, SliceSpec('soft', 0, 32), tmp_path).array_file.stat().st_mtime_ns == stamp
    assert build_slice_cache(paths, SliceSpec('soft', 0, 16), tmp_path).array_file != a.array_file
    assert build_slice_cache(paths, SliceSpec('lung', 0, 32), tmp_path).array_file != a.array_file
    st = os.stat(paths[0])
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))   # the file changed after the cache was built
    try: assert build_slice_cache(paths, SliceSpec('soft', 0, 32), tmp_path).array_file != a.array_file
    finally: os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns))


def test_interrupted_build_resumes_and_never_looks_finished(tiny_data, tmp_path, monkeypatch):
    import lesion_fastai.cache as cache_mod
    paths = list_slices(tiny_data)[:6]
    monkeypatch.setattr(cache_mod, 'CHUNK', 2)                # three chunks of two slices
    calls, interrupted = [], []
    real = CTSlice.planes

    def counting(self, path, wins):
        calls.append(path)
        if len(calls) == 3 and not interrupted:                   # the first slice of the second chunk, once
            interrupted.append(path)
            raise KeyboardInterrupt
        return real(self, path, wins)
    monkeypatch.setattr(CTSlice, 'planes', counting)
    with pytest.raises(KeyboardInterrupt): build_slice_cache(paths, SliceSpec('soft', 0, 32), tmp_path / 'a')
    assert sorted(p.name.split('.', 1)[1] for p in (tmp_path / 'a').iterdir()) == ['partial.json', 'partial.npy']   # nothing final
    calls.clear()
    resumed = build_slice_cache(paths, SliceSpec('soft', 0, 32), tmp_path / 'a')
    assert len(calls) == 4 and len(resumed) == 6                # the first chunk was not decoded again
    assert sorted(p.name.split('.', 1)[1] for p in (tmp_path / 'a').iterdir()) == ['json', 'npy']
    monkeypatch.setattr(CTSlice, 'planes', real)
    fresh = build_slice_cache(paths, SliceSpec('soft', 0, 32), tmp_path / 'b', workers=2)   # in two processes, from scratch
    assert np.array_equal(np.load(resumed.array_file), np.load(fresh.array_file)) and resumed.index == fresh.index


def test_cache_pickles_without_its_pixels(tiny_data, tmp_path):
    paths = list_slices(tiny_data)[:3]
    cache = build_slice_cache(paths, SliceSpec('soft', 0, 32), tmp_path)
    key = plane_key(paths[0], CTSlice(SliceSpec('soft', 0, 32)).windows_for(None))
    first, size = cache.get(key)
    blob = pickle.dumps(cache)
    assert len(blob) < 2_000                                  # the index and file name, not 3 x 32 x 32 floats
    again = pickle.loads(blob)
    assert isinstance(again, SliceCache) and torch.equal(again.get(key)[0], first) and again.get(key)[1] == size == (64, 64)


@pytest.mark.slow
def test_finetune_with_the_disk_cache_builds_it_once(tiny_data, tmp_path):
    cfg = dict(data=tiny_data, epochs=1, bs=2, size=32, cache='disk', cache_dir=tmp_path / 'cache')
    m = finetune(FinetuneConfig(out=tmp_path / 'a', **cfg))
    (built,) = (tmp_path / 'cache').glob('slices_*.npy')
    assert np.load(built, mmap_mode='r').shape[1:] == (1, 32, 32) and np.isfinite(m['test']['top1']['mean_iou'])
    stamp = built.stat().st_mtime_ns
    finetune(FinetuneConfig(out=tmp_path / 'b', label_fraction=.5, **cfg))   # another label subset, same slices
    assert [p.stat().st_mtime_ns for p in (tmp_path / 'cache').glob('slices_*.npy')] == [stamp]
    with pytest.raises(ValueError, match="cache 'ram'"):
        finetune(FinetuneConfig(out=tmp_path / 'c', **{**cfg, 'cache': 'ram'}))


def test_near_duplicate_neighbours_are_dropped_and_the_rest_kept(tiny_data, tmp_path):
    import shutil
    from lesion_fastai.cache import drop_near_duplicates
    folder = sorted((tiny_data / 'Images_png').iterdir())[0]
    series = tmp_path / 'Images_png' / folder.name
    shutil.copytree(folder, series)
    paths = sorted(series.glob('*.png'))
    assert len(paths) >= 3
    shutil.copyfile(paths[0], paths[1])                          # slice 2 repeats slice 1 exactly
    prep = CTSlice(SliceSpec('soft', 0, 32))
    kept, dropped = drop_near_duplicates(paths, prep, 1e-6)
    assert dropped == 1 and kept == [p for p in paths if p != paths[1]]
    assert drop_near_duplicates(paths, prep, 1e-6, keep=lambda p: True) == (paths, 0)     # kept whatever they are
    kept, dropped = drop_near_duplicates(paths, prep, 1.01)                               # everything is "close"
    assert kept == paths[:1] and dropped == len(paths) - 1
    wins = prep.windows_for(None)
    cache = {plane_key(paths[2], wins): prep.planes(paths[0], wins)}      # from the cache, slice 3 looks like slice 1 too
    cached = CTSlice(SliceSpec('soft', 0, 32), cache)
    assert drop_near_duplicates(paths, cached, 1e-6) == ([p for p in paths if p not in paths[1:3]], 2)


@pytest.mark.parametrize('windows,context', [('soft', 2), ('dicom,lung', 1)])
def test_each_png_is_decoded_once_and_stacked_as_decoding_every_channel_would(tiny_records, monkeypatch, windows, context):
    """With --context 2 a neighbour PNG serves up to five key slices: the memory cache decodes it once,
    and the stacked channels equal those of the one preprocessing, `CTSlice.from_hu`, bit for bit."""
    import lesion_fastai.data as data_mod
    recs = [r for r in tiny_records if r.split == 'train']
    spec = SliceSpec(windows, context, 32)
    prep = CTSlice(spec)
    reference = {r.image_path: prep.from_hu([load_hu(p) for p in prep.neighbours(r.image_path)], r.dicom_window) for r in recs}
    decoded = []
    real = data_mod.load_hu
    monkeypatch.setattr(data_mod, 'load_hu', lambda p: (decoded.append(str(p)), real(p))[1])
    cache = prepare_slices('memory', recs, spec)
    needed = {str(p) for r in recs for p in prep.neighbours(r.image_path)}
    assert sorted(decoded) == sorted(needed)                     # each PNG once (`needed` is a set)
    if context == 2: assert len(needed) < len(recs) * 5          # the neighbours are shared: fewer PNGs than channels
    decoded.clear()
    cached = CTSlice(spec, cache)
    for r in recs:
        got = cached(r)
        assert torch.equal(got, reference[r.image_path]) and got.orig_size == reference[r.image_path].orig_size
    assert decoded == []                                         # every epoch after: nothing decoded


def test_the_memory_cache_is_refused_where_it_would_not_fit_counting_every_local_process(monkeypatch):
    import lesion_fastai.cache as cache
    from lesion_fastai.cache import check_memory
    monkeypatch.setattr(cache, 'available_memory', lambda: 10 * 10 ** 9)
    monkeypatch.delenv('LOCAL_WORLD_SIZE', raising=False)
    check_memory(7 * 10 ** 9, 1000)                                      # under 80% of what is available
    with pytest.raises(ValueError, match=r'the 1,000 slices .* about 9.0 GB of memory and 10.0 GB are available: use --cache disk'):
        check_memory(9 * 10 ** 9, 1000)
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '2')                          # torchrun: each process decodes its own copy
    with pytest.raises(ValueError, match='in each of 2 processes'): check_memory(5 * 10 ** 9, 1000)
    monkeypatch.setattr(cache, 'available_memory', lambda: None)         # not Linux: no check
    check_memory(10 ** 15, 1000)


def test_skip_unreadable_with_the_disk_cache_checks_the_files_once_until_one_changes(tiny_data, tmp_path, monkeypatch):
    import shutil
    import lesion_fastai.cache as cache
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data)
    paths = list_slices(data)[:12]
    paths[3].write_bytes(paths[3].read_bytes()[:200])                   # truncated
    spec = SliceSpec('soft', 1, 32)
    first = prepare_slices('disk', paths, spec, tmp_path / 'cache', skip_unreadable=True)
    assert first.absent == {str(paths[3])}
    checked, real = [], cache.check_png
    monkeypatch.setattr(cache, 'check_png', lambda p: (checked.append(p), real(p))[1])
    again = prepare_slices('disk', paths, spec, tmp_path / 'cache', skip_unreadable=True)
    assert again.absent == first.absent and again.array_file == first.array_file and checked == []    # from the record
    paths[3].write_bytes(np.zeros(10, np.uint8).tobytes())              # the file changed: checked again
    assert prepare_slices('disk', paths, spec, tmp_path / 'cache', skip_unreadable=True).absent == first.absent and checked


def test_a_bad_slice_found_before_an_interruption_is_still_named_after_it(tiny_data, tmp_path, monkeypatch):
    import shutil
    import lesion_fastai.cache as cache_mod
    from lesion_fastai.cache import BadSlicesError
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data)
    paths = list_slices(data)[:6]
    paths[1].write_bytes(paths[1].read_bytes()[:200])                   # in the first chunk, which finishes
    monkeypatch.setattr(cache_mod, 'CHUNK', 2)
    real, calls = CTSlice.planes, []

    def interrupt_third(self, path, wins):
        calls.append(path)
        if len(calls) == 3: raise KeyboardInterrupt                     # in the second chunk
        return real(self, path, wins)
    monkeypatch.setattr(CTSlice, 'planes', interrupt_third)
    with pytest.raises(KeyboardInterrupt): build_slice_cache(paths, SliceSpec('soft', 0, 32), tmp_path / 'c')
    with pytest.raises(BadSlicesError, match=str(paths[1])): build_slice_cache(paths, SliceSpec('soft', 0, 32), tmp_path / 'c')
    assert not list((tmp_path / 'c').glob('slices_*[0-9a-f].npy'))        # no cache with a hole in it
