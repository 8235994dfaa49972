"""Checkpoints written atomically (temp file + rename) and read back with their construction
arguments, so `finetune` rebuilds the encoder from the checkpoint rather than from flags."""
from __future__ import annotations

from pathlib import Path

import torch

from .files import atomic_path

__all__ = ['atomic_save', 'save_pretrained', 'load_pretrained', 'load_encoder', 'load_decoder', 'decoder_args', 'scale_only',
           'PRETRAINED_FORMAT', 'INITS']

PRETRAINED_FORMAT = 'lesion_fastai.autoencoder/1'
# what a pretrained start takes from its checkpoint: the weights, only their scale, or only the architecture (the weights
# scratch draws with the run's seed: the control whose only difference from scratch is the mode's path)
INITS = ('weights', 'scale', 'scratch')


def atomic_save(obj, path: Path | str, **kwargs) -> Path:
    """`torch.save` to a temporary file beside `path`, then rename: an interrupted save never leaves a
    truncated checkpoint where a good one was."""
    with atomic_path(path) as tmp: torch.save(obj, tmp, **kwargs)
    return Path(path)


def save_pretrained(path: Path | str, autoencoder, config: dict, **extra) -> Path:
    "Save an autoencoder with its `model_args` and the resolved run config (windows, context, size, ...)."
    return atomic_save({'format': PRETRAINED_FORMAT, 'model_args': autoencoder.model_args, 'config': dict(config),
                        'encoder': autoencoder.encoder.state_dict(), 'decoder': autoencoder.decoder.state_dict(), **extra}, path)


def load_pretrained(path: Path | str) -> dict:
    "Read a checkpoint written by `save_pretrained`; a missing file or another format is a clear error."
    path = Path(path)
    if not path.is_file(): raise FileNotFoundError(f"{path}: no such pretrained checkpoint")
    try: ckpt = torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e: raise ValueError(f"{path}: not a readable checkpoint ({e})") from None
    if not isinstance(ckpt, dict) or ckpt.get('format') != PRETRAINED_FORMAT:
        raise ValueError(f"{path}: not a lesion_fastai pretrained checkpoint (expected format {PRETRAINED_FORMAT!r})")
    return ckpt


def load_encoder(encoder: torch.nn.Module, ckpt: dict, source='checkpoint', stages: int | None = None, init: str = 'weights',
                 seed: int = 0) -> None:
    """Load the checkpoint's encoder weights into `encoder` with strict=True, after checking that the
    architectures agree; a mismatch raises naming the differing arguments, keys or shapes. With
    `stages` K, only the stem and the first K stages come from the checkpoint, the later stages keep
    their fresh initialisation (what transfers is mostly in the lowest layers: Raghu et al. 2019).
    With `init` 'scale', what would be loaded is drawn fresh with each pretrained tensor's mean and
    std instead (`scale_only`); with 'scratch' nothing loads once the architectures agree: the encoder keeps
    the draw it was built with."""
    want = ckpt['model_args']['encoder_args']
    have = getattr(encoder, 'encoder_args', None) or {}
    diff = {k: (want.get(k), have.get(k)) for k in set(want) | set(have) if _norm(want.get(k)) != _norm(have.get(k))}
    if have and diff:
        raise ValueError(f"{source}: encoder architecture differs from the model's: "
                         + ', '.join(f"{k}: checkpoint {a} vs model {b}" for k, (a, b) in sorted(diff.items())))
    sd = ckpt['encoder']
    n = len(getattr(encoder, 'stages', ()))
    if stages is not None and not 0 <= stages <= n:
        raise ValueError(f"--transfer-stages {stages}: the encoder has {n} stages after its stem (0 to {n}: how many come from {source})")
    if init == 'scratch': return
    if init == 'scale': sd = scale_only(encoder, sd, seed)
    if stages is not None:
        fresh = encoder.state_dict()
        later = lambda k: k.startswith('stages.') and int(k.split('.')[1]) >= stages
        sd = {k: fresh[k] if later(k) and k in fresh else v for k, v in sd.items()}
    _load_strict(encoder, sd, f"{source}: encoder")


def scale_only(module: torch.nn.Module, sd: dict, seed: int = 0) -> dict:
    """`sd` with every parameter of `module` drawn fresh from a normal distribution with the mean and std
    of the pretrained tensor (Raghu et al. 2019's "Mean Var" init: the control that tells the weights'
    scale from what they learned), and the buffers (BatchNorm's running statistics) the module's own
    fresh ones: the statistics are learned too."""
    g = torch.Generator().manual_seed(seed)
    params, own = dict(module.named_parameters()), module.state_dict()
    out = {}
    for k, v in sd.items():
        if k not in params: out[k] = own.get(k, v); continue
        w = v.float()
        out[k] = (torch.randn(v.shape, generator=g) * w.std(unbiased=False) + w.mean()).to(v.dtype)
    return out


def decoder_args(ckpt: dict) -> dict:
    "The decoder's construction arguments in a checkpoint's `model_args` (all but the encoder's)."
    return {k: v for k, v in ckpt['model_args'].items() if k != 'encoder_args'}


def load_decoder(decoder: torch.nn.Module, ckpt: dict, source='checkpoint', init: str = 'weights', seed: int = 0) -> None:
    """Load the checkpoint's decoder weights into `decoder` (built from `decoder_args(ckpt)`) with
    strict=True; a mismatch raises naming the keys or shapes. `init` 'scale': `scale_only` draws; 'scratch':
    the decoder keeps the draw it was built with."""
    sd = ckpt['decoder']
    if init == 'scratch': return
    _load_strict(decoder, scale_only(decoder, sd, seed + 1) if init == 'scale' else sd, f"{source}: decoder")


def _load_strict(module: torch.nn.Module, sd: dict, what: str) -> None:
    "`load_state_dict(strict=True)`, with a mismatch named by its keys and shapes first."
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{what} weights do not match (missing {missing[:5]}, unexpected {unexpected[:5]}, shapes {shapes[:5]})")
    result = module.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys, result


def _norm(v): return tuple(v) if isinstance(v, (list, tuple)) else v
