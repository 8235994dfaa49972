"""A trained detector as a file, written by every `finetune` run and read by `lesion_fastai.evaluate`,
`lesion_fastai.predict`, self-training and users, in two forms:

* `model.safetensors` + `model.json`, the form to share: the weights as plain tensors and, as JSON
  (with its `version`), what rebuilds the detector around them (its construction arguments, windows,
  context, size, decoding and operating point, the mean box and the resolved settings it was trained
  with). `load_detector` reads it without unpickling anything.
* `export.pkl`, fastai's (the whole `Learner`, for `load_learner` and `learn.show_results`): a pickle,
  so loading one runs whatever code it holds. Load only your own. It carries `export_version`.

`load_model` reads either; both are written atomically and read back with errors that name the file.

Both are written atomically and read back with errors that name the file.
"""
from __future__ import annotations

from pathlib import Path

from fastai.learner import Learner, load_learner

from .files import atomic_path

__all__ = ['save_export', 'load_export', 'detector_settings', 'save_safe', 'load_detector', 'is_safe', 'load_model', 'at_operating_point',
           'SAFE_WEIGHTS', 'SAFE_SETTINGS', 'EXPORT_VERSION']

SAFE_WEIGHTS, SAFE_SETTINGS, SAFE_FORMAT = 'model.safetensors', 'model.json', 'lesion_fastai detector'
# the version of export.pkl's contents, stored in the learner as `export_version` (exports before it have none: version 1);
# a version above this one was written by a newer lesion_fastai and is refused by name rather than half read
EXPORT_VERSION = 2


def save_export(learn, path: Path | str) -> Path:
    "`learn.export` to `path` through a temp file and a rename, without metrics (the validation FROC keeps records)."
    path = Path(path)
    learn.metrics, learn.export_version = [], EXPORT_VERSION
    with atomic_path(path) as tmp:
        old, learn.path = learn.path, tmp.parent
        try: learn.export(tmp.name)
        finally: learn.path = old
    return path


def load_export(path: Path | str, cpu: bool = True, flag: str = '') -> Learner:
    """The learner `finetune` exported to `path` (on the CPU unless `cpu=False`); a missing file or one
    that is not such a learner is an error naming it (and the command-line `flag` it came from)."""
    path, name = Path(path), f"{flag} {path}" if flag else str(path)
    if not path.is_file(): raise FileNotFoundError(f"{name}: no such exported model")
    try: learn = load_learner(path, cpu=cpu)
    except Exception as e: raise ValueError(f"{name}: not a learner exported by finetune ({type(e).__name__}: {e})") from None
    if not isinstance(learn, Learner) or not hasattr(learn.loss_func, 'decoding'):
        raise ValueError(f"{name}: not a learner exported by finetune")
    if getattr(learn, 'export_version', 1) > EXPORT_VERSION:
        raise ValueError(f"{name}: export version {learn.export_version}, written by a newer lesion_fastai than this one (which reads up to "
                         f"{EXPORT_VERSION}); update lesion_fastai, or share the model as {SAFE_WEIGHTS} + {SAFE_SETTINGS}")
    if not hasattr(learn.model, 'decoding'): learn.model.decoding = learn.loss_func.decoding   # exported before it travelled with the model
    return learn


def detector_settings(learn):
    "(`SliceSpec`, `Decoding`) of a detector's learner: how it prepares slices, how it decodes its maps."
    from .data import slice_transform
    return slice_transform(learn.dls).spec, learn.model.decoding


def save_safe(learn, folder: Path | str) -> tuple[Path, Path]:
    "`folder/model.safetensors` and `folder/model.json` of a trained detector's learner (module docstring)."
    from dataclasses import asdict
    from safetensors.torch import save_file
    from .files import write_json
    folder = Path(folder)
    spec, decoding = detector_settings(learn)
    model = learn.model
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(folder / SAFE_WEIGHTS) as tmp: save_file(weights, str(tmp), metadata={'format': SAFE_FORMAT})
    settings = {'format': SAFE_FORMAT, 'version': 1, 'detector': model.init_args, 'spec': asdict(spec),
                'target': getattr(learn.loss_func, 'target', 'points'), 'decoding': asdict(decoding),
                'train_info': getattr(learn, 'train_info', None)}
    return folder / SAFE_WEIGHTS, write_json(settings, folder / SAFE_SETTINGS)


def is_safe(path: Path | str) -> bool:
    "Whether `path` names the safe form: its `.safetensors`, its `.json`, or a folder holding both."
    path = Path(path)
    return path.suffix in ('.safetensors', '.json') or (path.is_dir() and (path / SAFE_WEIGHTS).is_file())


def load_detector(path: Path | str, device: str = 'cpu'):
    """(detector in eval mode, `SliceSpec`, settings dict) from the safe form at `path` (the
    `.safetensors`, the `.json` beside it, or their folder), unpickling nothing; errors name the file."""
    import json
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from .data import SliceSpec
    from .heatmap import Decoding
    from .models.detector import Detector
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    weights, settings_file = folder / (path.name if path.suffix == '.safetensors' else SAFE_WEIGHTS), folder / SAFE_SETTINGS
    if path.suffix == '.json': settings_file = path
    for f in (weights, settings_file):
        if not f.is_file(): raise FileNotFoundError(f"{f}: missing; the safe model is {SAFE_WEIGHTS} and {SAFE_SETTINGS} side by side")
    try: settings = json.loads(settings_file.read_text())
    except (ValueError, UnicodeDecodeError) as e: raise ValueError(f"{settings_file}: not JSON ({e})") from None
    if not isinstance(settings, dict) or settings.get('format') != SAFE_FORMAT:
        raise ValueError(f"{settings_file}: not the settings of a lesion_fastai detector (expected format {SAFE_FORMAT!r})")
    try:
        # a model written before the transfer layers' gate has no adapter_gate: its layers are ungated
        model = Detector(**{'adapter_gate': False, **settings['detector']}, decoding=Decoding(**settings['decoding']))
        state = load_file(str(weights), device='cpu')
        model.load_state_dict(state)
    except (SafetensorError, OSError) as e: raise ValueError(f"{weights}: not a safetensors file ({e})") from None
    except (KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"{weights} does not fit {settings_file} ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return model.to(device).eval(), SliceSpec(**settings['spec']), settings


def load_model(path: Path | str, device: str = 'cpu', flag: str = ''):
    """(detector in eval mode on `device`, `SliceSpec`, what it was trained with: `train_info` or None)
    from either form at `path`: the safe pair (`is_safe`) or an `export.pkl`. Its `decoding`, with the
    operating point, travels with the model. Used by evaluation, `predict` and self-training."""
    if is_safe(path):
        model, spec, settings = load_detector(path, device)
        return model, spec, settings.get('train_info')
    learn = load_export(path, cpu=device == 'cpu', flag=flag)
    spec, _ = detector_settings(learn)
    return learn.model.to(device).eval(), spec, getattr(learn, 'train_info', None)


def at_operating_point(learn, op: dict) -> None:
    """Store the operating point `evaluation.report` returned (validation's score at `op['fp_per_slice']`
    false positives per slice) with the model, so both export forms carry it as the default threshold
    of every figure and overlay."""
    import dataclasses
    decoding = dataclasses.replace(learn.model.decoding, operating_score=op['score'], operating_fp=op['fp_per_slice'])
    learn.model.decoding = decoding
    if hasattr(learn.loss_func, 'decoding'): learn.loss_func.decoding = decoding
