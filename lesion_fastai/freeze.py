"""Which parameters train when fine-tuning from a pretrained encoder, and what frozen BatchNorm does.

* `sandwich`: the pretrained encoder frozen; fresh `TransferLayer`s between its stages and a fresh head train
  (`Detector(sandwich='encoder')`), or, as 3FabRec builds it, the pretrained encoder and decoder frozen and
  fresh `TransferLayer`s between the decoder's blocks (`sandwich='decoder'`).
* `encoder`: the whole encoder frozen, only the head trains (a linear probe on pretrained features).
* `full`: every layer trains from the pretrained weights at one rate, as from scratch (with `lr_mult` M, the
  pretrained layers at lr/M; its old name `none` is still accepted). One rate is the default because the
  fixed lr/10 of earlier versions cost an untrained checkpoint half of scratch's FROC (docs/results.md):
  a pretrained start must take the path scratch takes, so that only its weights differ.
* `scratch`: no pretrained weights, everything trains.

BatchNorm policy: frozen layers keep their running statistics and affine weights (fastai's
`train_bn=False` plus `BnFreeze`, which holds frozen BatchNorm layers in eval mode). With
`update_frozen_bn=True` their statistics adapt to the new data while their weights stay frozen; with
`train_frozen_bn` (fastai's default `train_bn=True`) their weights and biases train as well.
"""
from __future__ import annotations

from fastai.callback.training import BnFreeze

__all__ = ['FREEZE_MODES', 'FREEZE_ALIASES', 'detector_splitter', 'apply_freeze', 'freeze_callbacks', 'parameter_counts', 'lr_for']

FREEZE_MODES = ('sandwich', 'encoder', 'full', 'scratch')
FREEZE_ALIASES = {'none': 'full'}     # the old name of 'full', which said what is frozen, not what trains


def detector_splitter(model):
    """Two parameter groups: the pretrained layers (the encoder, and the decoder of the decoder sandwich),
    then everything fresh (transfer layers, neck and head)."""
    decoder = getattr(model, 'decoder', None)
    enc = list(model.encoder.parameters()) + (list(decoder.parameters()) if decoder is not None else [])
    ids = {id(p) for p in enc}
    return [enc, [p for p in model.parameters() if id(p) not in ids]]


def apply_freeze(learn, mode: str) -> None:
    "Freeze the pretrained group for 'sandwich' / 'encoder'; train everything for 'full' / 'scratch'."
    mode = FREEZE_ALIASES.get(mode, mode)
    if mode not in FREEZE_MODES: raise ValueError(f"freeze mode {mode!r}: expected one of {FREEZE_MODES}")
    if mode in ('sandwich', 'encoder'): learn.freeze_to(1)
    else: learn.unfreeze()


def freeze_callbacks(mode: str, update_frozen_bn: bool = False) -> list:
    """BnFreeze keeps frozen BatchNorm layers in eval mode (running statistics unchanged); a BatchNorm that
    trains (`train_bn=True`) it leaves in training mode by itself."""
    return [BnFreeze()] if mode in ('sandwich', 'encoder') and not update_frozen_bn else []


def lr_for(mode: str, lr: float, lr_mult: float = 1.):
    """The rate of a fit in freeze `mode`: with 'full' and `lr_mult` M other than 1, discriminative rates
    (the pretrained layers at lr/M, the rest at lr); one rate otherwise (a frozen group has no rate)."""
    return slice(lr / lr_mult, lr) if FREEZE_ALIASES.get(mode, mode) == 'full' and lr_mult != 1 else lr


def parameter_counts(model) -> dict:
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    return {'trainable': n_train, 'frozen': n_all - n_train}


localizer_splitter = detector_splitter   # its former name, which export.pkl files written before the rename name
