"""Checkpoints written atomically (temp file + rename) and read back with their construction
arguments, so `finetune` rebuilds the encoder from the checkpoint rather than from flags."""
from __future__ import annotations

from pathlib import Path

import torch

from .files import atomic_path

__all__ = ['atomic_save', 'save_pretrained', 'load_pretrained', 'load_encoder', 'load_decoder', 'decoder_args', 'PRETRAINED_FORMAT']

PRETRAINED_FORMAT = 'lesion_fastai.autoencoder/1'


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


def load_encoder(encoder: torch.nn.Module, ckpt: dict, source='checkpoint') -> None:
    """Load the checkpoint's encoder weights into `encoder` with strict=True, after checking that the
    architectures agree; a mismatch raises naming the differing arguments, keys or shapes."""
    want = ckpt['model_args']['encoder_args']
    have = getattr(encoder, 'encoder_args', None) or {}
    diff = {k: (want.get(k), have.get(k)) for k in set(want) | set(have) if _norm(want.get(k)) != _norm(have.get(k))}
    if have and diff:
        raise ValueError(f"{source}: encoder architecture differs from the model's: "
                         + ', '.join(f"{k}: checkpoint {a} vs model {b}" for k, (a, b) in sorted(diff.items())))
    _load_strict(encoder, ckpt['encoder'], f"{source}: encoder")


def decoder_args(ckpt: dict) -> dict:
    "The decoder's construction arguments in a checkpoint's `model_args` (all but the encoder's)."
    return {k: v for k, v in ckpt['model_args'].items() if k != 'encoder_args'}


def load_decoder(decoder: torch.nn.Module, ckpt: dict, source='checkpoint') -> None:
    """Load the checkpoint's decoder weights into `decoder` (built from `decoder_args(ckpt)`) with
    strict=True; a mismatch raises naming the keys or shapes."""
    _load_strict(decoder, ckpt['decoder'], f"{source}: decoder")


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
