"""How fast: slice loading, training and inference images/s and peak memory, each model measured in a
fresh process of its own (so its peak memory is its own). `throughput` is this machine's report (the
loading paths against scikit-image, the detector against the earlier experiment's localizer);
`gpu` the GPU path's (bf16 against float32, the loaders with workers, an epoch end to end). Both
measure the models with the same `model_rates`.

    python -m lesion_fastai.bench throughput [--quick]
    python -m lesion_fastai.bench gpu            (make gpu-check)
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
import multiprocessing as mp
import queue
import resource
import time
from pathlib import Path

import numpy as np

from ..data import SliceSpec
from ..settings import check_fields, from_args, option
from .common import add_bench_settings, ensure_data, machine, report

__all__ = ['measure', 'model_rates', 'cache_rates', 'loading', 'loader_rate', 'throughput', 'gpu_check', 'add_parser']


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _train_speed(kind: str, size: int, bs: int, steps: int, q, device: str = 'cpu', amp: bool = False):
    """Runs in a fresh process: training images/s of one model (the detector with its whole loss, or
    the earlier experiment's one-box localizer with a box loss), or with kind 'infer' the detector's
    inference slices/s, decoding included; and the process's peak memory."""
    import torch
    from ..heatmap import detections
    from ..losses import BoxLoss, DetectionLoss
    from ..models.detector import create_detector
    from ..models.legacy import LegacyDetector
    torch.manual_seed(0)
    model = (LegacyDetector(size=size) if kind == 'legacy' else create_detector(1)).to(device)
    if device == 'cuda': model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.rand(bs, 1, size, size, device=device)
    box = torch.tensor([[.25, .25, .75, .75]], device=device)
    if kind == 'legacy': loss_fn = lambda out: BoxLoss('giou+l1')((out + 1) / 2, box.repeat(bs, 1))
    else:
        y, flags = (box * 2 - 1).reshape(1, 2, 2).repeat(bs, 1, 1), torch.ones(bs, 1, device=device)
        loss_fn = lambda out: DetectionLoss()(out, y, flags)
    if kind == 'infer': model.eval()
    for i in range(steps + 1):
        if i == 1:
            if device == 'cuda': torch.cuda.synchronize()
            t = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            if kind == 'infer':
                with torch.no_grad(): detections(model(x), 50)
                continue
            loss = loss_fn(model(x))
        opt.zero_grad(); loss.backward(); opt.step()
    if device == 'cuda': torch.cuda.synchronize()
    ips = bs * steps / (time.perf_counter() - t)
    mem = torch.cuda.max_memory_allocated() / 2 ** 20 if device == 'cuda' else _peak_rss_mb()
    q.put((ips, mem))


def measure(kind, size, bs, steps, device='cpu', amp=False) -> tuple[float, float]:
    "(images/s, peak memory in MB) of one measurement (`_train_speed`) in a fresh process."
    ctx = mp.get_context('spawn')
    q = ctx.Queue()
    p = ctx.Process(target=_train_speed, args=(kind, size, bs, steps, q, device, amp))
    p.start()
    while True:                       # a measurement that dies (out of memory, an error) must not leave us waiting
        try: res = q.get(timeout=5); break
        except queue.Empty:
            if not p.is_alive(): raise RuntimeError(f"the {kind} measurement ({device}, batch {bs}) died with exit code {p.exitcode}")
    p.join()
    return res


def _precision_speeds(size: int, channels: int, bs: int, steps: int, rounds: int, q):
    """Runs in a fresh process: the detector's training images/s in float32 and in bfloat16 autocast
    with channels_last on the CPU, measured in alternating rounds (so that a change of the machine's
    load falls on both), each the median of its rounds."""
    import statistics
    import torch
    from ..losses import DetectionLoss
    from ..models.detector import create_detector
    torch.manual_seed(0)
    x = torch.rand(bs, channels, size, size)
    box = torch.tensor([[.25, .25, .75, .75]])
    y, flags = (box * 2 - 1).reshape(1, 2, 2).repeat(bs, 1, 1), torch.ones(bs, 1)
    loss_fn = DetectionLoss()
    runs = {}
    for name, bf16 in (('fp32', False), ('bf16', True)):
        model = create_detector(channels)
        if bf16: model = model.to(memory_format=torch.channels_last)
        runs[name] = (model, torch.optim.AdamW(model.parameters(), 1e-3), bf16, [])
    for r in range(rounds + 1):
        for name, (model, opt, bf16, rates) in runs.items():
            xx = x.to(memory_format=torch.channels_last) if bf16 else x
            t = time.perf_counter()
            for _ in range(steps):
                with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16): loss = loss_fn(model(xx), y, flags)
                opt.zero_grad(); loss.backward(); opt.step()
            if r: rates.append(bs * steps / (time.perf_counter() - t))      # round 0 warms up
    q.put({name: statistics.median(rates) for name, (*_, rates) in runs.items()})


def precision_rates(size: int, channels: int, bs: int, steps: int = 3, rounds: int = 5) -> dict:
    "`_precision_speeds` in a fresh process: {'fp32': images/s, 'bf16': images/s}."
    ctx = mp.get_context('spawn')
    q = ctx.Queue()
    p = ctx.Process(target=_precision_speeds, args=(size, channels, bs, steps, rounds, q))
    p.start()
    while True:
        try: res = q.get(timeout=5); break
        except queue.Empty:
            if not p.is_alive(): raise RuntimeError(f"the precision measurement died with exit code {p.exitcode}")
    p.join()
    return res


def loader_rates(data: Path, spec, bs: int, folder: Path, workers=(0, 2), epochs: int = 2) -> list[dict]:
    """Slices/s of the detector's training DataLoader (`SliceDL`) over the labelled slices of `data`:
    from the in-memory cache and from the disk cache with each number of `workers`, without
    augmentation (what the loader delivers) and with it (flips, rotation and zoom, lighting, run on
    the batch on its device: here the CPU)."""
    from ..cache import prepare_slices
    from ..data import detection_dls
    from ..deeplesion import evaluation_records, load_data
    from ..log import quiet
    _, records = load_data(data)
    items = evaluation_records(records, 'train') + evaluation_records(records, 'val')
    rows = []
    with quiet():
        memory = prepare_slices('memory', items, spec)
        disk = prepare_slices('disk', items, spec, folder)
    for kind, cache, ws in (('memory', memory, (0,)), ('disk', disk, workers)):
        for w in ws:
            for augment in (False, True):
                dls = detection_dls(items, spec, bs=bs, seed=0, cache=cache, augment=augment, num_workers=w)
                rows.append({'cache': kind, 'workers': w, 'augment': augment, 'slices_per_s': loader_rate(dls.train, epochs)})
    return rows


def model_rates(size: int, bs: int, steps: int, device: str = 'cpu', amp: bool = False, legacy_bs: int | None = None,
                legacy_steps: int | None = None, infer_bs: int | None = None, infer_steps: int | None = None) -> dict:
    """Training images/s of the detector in float32 (and, with `amp`, bf16 autocast), of the earlier
    experiment's localizer (in bf16 with `amp`; its activations are four times the detector's, so it
    runs at `legacy_bs`), the detector's inference slices/s with decoding, and each one's peak memory."""
    train = {'ours_fp32': measure('detector', size, bs, steps, device)}
    if amp: train['ours_bf16'] = measure('detector', size, bs, steps, device, amp=True)
    legacy = 'legacy_bf16' if amp else 'legacy_fp32'
    train[legacy] = measure('legacy', size, legacy_bs or max(2, bs // 4), legacy_steps or max(1, steps // 4), device, amp)
    inf = measure('infer', size, infer_bs or bs, infer_steps or steps, device, amp)
    return {'train_images_per_s': {k: v[0] for k, v in train.items()},
            'peak_memory_mb': {**{k: v[1] for k, v in train.items()}, 'inference': inf[1]}, 'inference_slices_per_s': inf[0]}


def cache_rates(paths, size: int, folder: Path, workers: int = 1):
    "Building the disk cache of `paths` fresh in `folder` (slices/s), and the cache."
    import shutil
    from ..cache import build_slice_cache
    from ..log import quiet
    shutil.rmtree(folder, ignore_errors=True)
    t = time.perf_counter()
    with quiet(): cache = build_slice_cache(paths, SliceSpec('soft', 0, size), folder, workers=workers)
    return len(paths) / (time.perf_counter() - t), cache


def loading(paths, size: int, cache_dir: Path) -> dict:
    """Slices/s of our loader against a naive scikit-image path (imread + resize), same files, same run;
    then from the in-memory cache (a later epoch of the same run) and from the disk cache (building it,
    and reading it from a fresh process's view, as a later run or a DataLoader worker does)."""
    import pickle
    from skimage.io import imread
    from skimage.transform import resize
    from ..data import CTSlice
    from ..deeplesion import WINDOWS, window
    rate = lambda t, n=len(paths): n / (time.perf_counter() - t)
    ours = CTSlice(SliceSpec('soft', 0, size))
    t = time.perf_counter()
    for p in paths: ours(p)
    res = {'ours': rate(t)}
    t = time.perf_counter()
    for p in paths:
        hu = imread(p).astype(np.float32) - 32768
        resize(window(hu, *WINDOWS['soft']), (size, size), anti_aliasing=True)
    res['skimage'] = rate(t)
    cached = CTSlice(SliceSpec('soft', 0, size), {})
    for p in paths: cached(p)
    t = time.perf_counter()
    for p in paths: cached(p)
    res['ours_cached'] = rate(t)
    res['disk_cache_build'], disk = cache_rates(paths, size, cache_dir)
    disk = pickle.loads(pickle.dumps(disk))          # unmapped, as a worker or a later run receives it
    from_disk = CTSlice(SliceSpec('soft', 0, size), disk)
    t = time.perf_counter()
    for _ in range(5):
        for p in paths: from_disk(p)
    res['ours_disk_cache'] = rate(t, 5 * len(paths))
    return res


def throughput(out: Path, quick: bool = False) -> dict:
    """On this machine's CPU (`gpu` measures the GPU path): slice loading (PNG -> HU -> window -> half
    resolution) against scikit-image; training images/s and peak memory of our detector against the
    earlier experiment's localizer (same input and batch) and its inference slices/s, decoding into
    scored boxes included; the detector's training step in float32 and in bfloat16 at the
    benchmarks' input (128 px, two neighbour slices a side), side by side in one process; and the
    training DataLoader's slices/s (memory and disk cache, 0 and 2 workers, with and without
    augmentation) against that model's rate."""
    from ..deeplesion import list_slices
    from ..fit import cpu_has_bf16
    data = ensure_data(out / 'slices512', patients=4, native=512, seed=5)
    paths = list_slices(data)[:20 if quick else 60]
    load = loading(paths, 256, out / 'slice_cache')
    size, bs = 256, 8
    rates = model_rates(size, bs, 2 if quick else 5, legacy_bs=2 if quick else 4, legacy_steps=1 if quick else 2, infer_bs=16,
                        infer_steps=2 if quick else 8)
    spec = SliceSpec('soft', 2, 128)
    precision = precision_rates(spec.size, spec.n_channels, 16, steps=2 if quick else 3, rounds=2 if quick else 5)
    loader_data = ensure_data(out / 'data_250p_256px', patients=40 if quick else 250, native=256, seed=0, workers=2)   # the demo's data
    loaders = loader_rates(loader_data, spec, 16, out / 'loader_cache', epochs=1 if quick else 2)
    res = {'machine': machine(), 'size': size, 'bs': bs, 'loading_slices_per_s': load, **rates, 'bf16_units': cpu_has_bf16(),
           'precision_images_per_s': precision, 'precision_input': {'size': spec.size, 'channels': spec.n_channels, 'bs': 16},
           'loader_slices_per_s': loaders}
    ours, naive, cached, disk = load['ours'], load['skimage'], load['ours_cached'], load['ours_disk_cache']
    tr, mem = rates['train_images_per_s'], rates['peak_memory_mb']
    fast = max(precision.values())
    lines = ['| measure | ours | baseline | ratio |', '|---|---|---|---|',
             f"| slice loading, 512 px PNG -> 256 px windowed, slices/s per process | {ours:.0f} | {naive:.0f} (scikit-image imread + resize) | {ours / naive:.1f}x |",
             f"| same, from the in-memory slice cache (later epochs of a run) | {cached:.0f} | {naive:.0f} | {cached / naive:.0f}x |",
             f"| building the disk slice cache (once per slices and settings) | {load['disk_cache_build']:.0f} | {naive:.0f} | {load['disk_cache_build'] / naive:.1f}x |",
             f"| same, from the disk cache (memory-mapped float16; later runs, workers) | {disk:.0f} | {naive:.0f} | {disk / naive:.0f}x |",
             f"| training images/s at {size} px, one slice (CPU, float32) | {tr['ours_fp32']:.1f} | {tr['legacy_fp32']:.2f} (earlier experiment's localizer) | {tr['ours_fp32'] / tr['legacy_fp32']:.0f}x |",
             f"| peak memory of the training process, MB | {mem['ours_fp32']:.0f} | {mem['legacy_fp32']:.0f} | {mem['legacy_fp32'] / mem['ours_fp32']:.1f}x less |",
             f"| detector inference at {size} px, slices/s (batch 16, up to 50 scored boxes each) | {rates['inference_slices_per_s']:.1f} | | |",
             f"| training images/s at {spec.size} px, {spec.n_channels} channels (context 2), batch 16: bfloat16 autocast + channels_last "
             f"| {precision['bf16']:.0f} | {precision['fp32']:.0f} (float32) | {precision['bf16'] / precision['fp32']:.2f}x |"]
    for r in loaders:
        what = (f"training DataLoader, {r['cache']} cache, {r['workers']} workers, slices/s"
                + (', with augmentation on the CPU' if r['augment'] else ' (what it delivers; no augmentation)'))
        lines.append(f"| {what} | {r['slices_per_s']:.0f} | {fast:.0f} (the model's training images/s, the faster precision) | "
                     f"{r['slices_per_s'] / fast:.1f}x |")
    report(out, 'throughput', res, '\n'.join(lines), [f"bfloat16 units (AVX512-BF16 / AMX-BF16): {'yes' if res['bf16_units'] else 'no'}"])
    return res


def loader_rate(dl, epochs: int = 2) -> float:
    "Slices/s of a DataLoader: the first epoch starts the workers, the later ones are timed."
    for _ in dl: pass
    t, n = time.perf_counter(), 0
    for _ in range(epochs):
        for b in dl: n += len(b[0])
    return n / (time.perf_counter() - t)


def _end_to_end(dls, device: str, amp: bool) -> float:
    "Training images/s of one fastai epoch of the autoencoder on these loaders, loading included."
    import torch
    from fastai.callback.channelslast import ChannelsLast  # noqa: F401 (Learner.to_channelslast)
    from fastai.learner import Learner
    from ..models.autoencoder import create_autoencoder
    learn = Learner(dls, create_autoencoder(dls.one_batch()[0].shape[1]).to(device), loss_func=torch.nn.L1Loss())
    if amp: learn.to_channelslast(amp_mode='bf16')
    with learn.no_bar(), learn.no_logging():
        learn.fit(1)                                   # warm-up: workers, cudnn autotuning
        if device == 'cuda': torch.cuda.synchronize()
        t = time.perf_counter()
        learn.fit(1)
        if device == 'cuda': torch.cuda.synchronize()
    return len(dls.train) * dls.train.bs / (time.perf_counter() - t)


def gpu_check(out: Path, device: str = 'cuda', size: int = 256, bs: int = 64, steps: int = 20, workers: int | None = None,
              patients: int = 100) -> dict:
    """The GPU path in figures, on the built-in data: `model_rates` at `size` px (float32 and bf16 +
    channels_last, the earlier localizer in bf16, inference, peak GPU memory); then the loaders:
    building the disk cache in `workers` processes, a fastai DataLoader over it with and without
    workers and pinned memory (slices/s), and one fastai epoch of the autoencoder end to end
    (loading included). Loading keeps up when it is faster than bf16 training. `device='cpu'` runs the
    same steps in float32 (for tests and for comparison)."""
    import torch
    from ..data import autoencoder_dls
    from ..deeplesion import list_slices, patient_of
    if device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA GPU here (torch.cuda.is_available() is False); "
                         "`python -m lesion_fastai.bench gpu --device cpu` runs the same steps on the CPU")
    workers = max(1, mp.cpu_count() - 1) if workers is None else workers
    amp = device == 'cuda'
    t0 = time.perf_counter()
    data = ensure_data(out / f'data_{patients}p_{2 * size}px', patients, 2 * size, seed=7, workers=max(1, workers))
    res = {'machine': machine(), 'device': torch.cuda.get_device_name() if device == 'cuda' else 'cpu',
           'size': size, 'bs': bs, 'workers': workers, **model_rates(size, bs, steps, device, amp)}
    paths = list_slices(data)
    build, cache = cache_rates(paths, size, out / 'slice_cache', max(1, workers))
    res['slices'] = len(paths)
    res['loading_slices_per_s'] = {'disk_cache_build': build}
    patient_ids = sorted({patient_of(Path(p).parent.name) for p in paths})
    valid = set(patient_ids[-max(1, len(patient_ids) // 7):])          # a few patients' slices: the validation set
    for n in sorted({0, workers}):
        dls = autoencoder_dls(paths, valid, SliceSpec('soft', 0, size), bs=bs, num_workers=n, seed=0, cache=cache, pin_memory=amp,
                              device=device)
        res['loading_slices_per_s'][f'{n}_workers'] = loader_rate(dls.train)
    res['end_to_end_images_per_s'] = _end_to_end(dls, device, amp)
    best = res['train_images_per_s'].get('ours_bf16', res['train_images_per_s']['ours_fp32'])
    res['loader_keeps_up'] = res['loading_slices_per_s'][f'{workers}_workers'] >= best
    res['time_s'] = round(time.perf_counter() - t0, 1)
    tr, mem, ld = res['train_images_per_s'], res['peak_memory_mb'], res['loading_slices_per_s']
    leg = next(k for k in tr if k.startswith('legacy'))
    rows = [('| measure | value | baseline |', '|---|---|---|'),
            [f"| training images/s at {size} px, float32, batch {bs} | {tr['ours_fp32']:.0f} | |"],
            [f"| training images/s, bf16 autocast + channels_last | {tr['ours_bf16']:.0f} | {tr[leg]:.0f} (earlier experiment's localizer, bf16) |"] if amp
            else [f"| training images/s of the earlier experiment's localizer, float32 | {tr[leg]:.1f} | |"],
            [f"| inference slices/s at {size} px, batch {bs}, scored boxes decoded | {res['inference_slices_per_s']:.0f} | |",
             f"| peak {'GPU ' if amp else ''}memory, MB: training {'bf16' if amp else 'fp32'} / inference | "
             f"{mem['ours_bf16' if amp else 'ours_fp32']:.0f} / {mem['inference']:.0f} | {mem[leg]:.0f} (earlier localizer, training) |",
             f"| building the disk cache, slices/s ({len(paths)} slices, {2 * size} px PNG, {max(1, workers)} processes) | {ld['disk_cache_build']:.0f} | |",
             f"| DataLoader from the disk cache, {workers} workers, slices/s | {ld[f'{workers}_workers']:.0f} | {ld['0_workers']:.0f} (no workers) |",
             f"| one fastai epoch of the autoencoder end to end, images/s | {res['end_to_end_images_per_s']:.0f} | |",
             f"| loading keeps up with training | {'yes' if res['loader_keeps_up'] else 'no'} | |"]]
    report(out, 'gpu', res, '\n'.join(line for group in rows for line in group), [f"{res['device']}, {res['time_s']:.0f} s"])
    return res


@dataclass(kw_only=True)
class ThroughputSettings:
    "Settings of `bench throughput`."
    out: Path = option(Path('runs/bench/throughput'), 'output folder', group='benchmark')
    quick: bool = option(False, 'fewer slices and steps', group='benchmark')

    def __post_init__(self): check_fields(self)


@dataclass(kw_only=True)
class GpuSettings:
    "Settings of `bench gpu`."
    out: Path = option(Path('runs/bench/gpu'), 'output folder (generated data, disk cache, gpu.json, gpu.md)', group='benchmark')
    device: str = option('cuda', 'cpu runs the same steps in float32', choices=('cuda', 'cpu'), group='benchmark')
    size: int = option(256, 'input size in pixels (the data is generated at twice this)', at_least=32, group='benchmark')
    bs: int = option(64, 'batch size', at_least=1, group='benchmark')
    steps: int = option(20, 'timed training steps per model', at_least=1, group='benchmark')
    workers: int | None = option(None, 'DataLoader workers (None: CPU cores - 1)', at_least=0, group='benchmark')
    patients: int = option(100, 'synthetic patients to generate for the loaders', at_least=3, group='benchmark')

    def __post_init__(self): check_fields(self)


def add_parser(sub) -> None:
    t = sub.add_parser('throughput', help='loading and training speed, peak memory', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_bench_settings(t, ThroughputSettings)
    t.set_defaults(run=lambda ap, args: throughput(**vars(from_args(ThroughputSettings, ap, args))))
    g = sub.add_parser('gpu', help='the GPU path: bf16 training, inference, loaders with workers, peak GPU memory (make gpu-check)',
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_bench_settings(g, GpuSettings)
    g.set_defaults(run=lambda ap, args: gpu_check(**vars(from_args(GpuSettings, ap, args))))
