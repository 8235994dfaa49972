"""python -m lesion_fastai.selftrain: self-training on the slices whose labels a run does not use.

A teacher (trained here with the same settings as the student, or an export given with --teacher)
predicts on every slice of the training patients that carries no label the run uses (the key slices
of the patients outside --label-fraction's subset, every neighbour slice); its boxes scoring at least
the score at which it makes --pseudo-fp false positives per validation slice become pseudo-labels,
written as OUT/round_N/pseudo_labels.csv (DeepLesion-style, one row per box, with its score), and a
student is fine-tuned on the labels and the pseudo-labels (at --pseudo-weight) into OUT/round_N, from
scratch or, with --pretrained, from the autoencoder. With --rounds 2 or more each student teaches
the next round. The student's settings are python -m finetune's flags; the test split is never
looked at before the last student is evaluated on it.

Examples:
    python -m lesion_fastai.selftrain --data data/synthetic --label-fraction 0.1 --out runs/selftrain
    python -m lesion_fastai.selftrain --data data/synthetic --label-fraction 0.1 --teacher runs/scratch10/export.pkl \\
        --pretrained runs/pretrain/pretrained.pth --freeze full --out runs/selftrain_ae
"""
from __future__ import annotations

from .log import hush_third_party
hush_third_party(__name__)       # run as a command: quiet known third-party warnings before fastai loads

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from .config import PSEUDO_FP, FinetuneConfig, check_fields, add_settings, from_args, option
from .files import write_json

__all__ = ['SelftrainSettings', 'pseudo_labels_from', 'self_train', 'parser', 'main']


def pseudo_labels_from(teacher: Path, cfg: FinetuneConfig, out_csv: Path, fp: float) -> dict:
    """The pseudo-labels `teacher` (either export form) gives the slices `cfg`'s run has no labels for,
    at the score where it makes `fp` false positives per validation slice; written to `out_csv`. Both
    passes go through the one inference path (`inference.detect`). Returns the threshold, the slices
    looked at and labelled, and the boxes."""
    from .data import select_patients
    from .cache import prepare_slices, readable
    from .deeplesion import evaluation_records, load_data
    from .evaluation import predict_detections
    from .export import load_model
    from .froc import froc_curve, score_at_fp
    from .log import log
    from .metrics import froc_inputs
    from .unlabelled import pseudo_label, unlabelled_slices, write_pseudo_labels
    model, spec, _ = load_model(teacher, flag='--teacher')
    decoding = model.decoding
    _, records = load_data(cfg.data, missing_ok=cfg.skip_unreadable)
    valid = evaluation_records(records, 'val')
    used = select_patients(evaluation_records(records, 'train'), cfg.label_fraction, cfg.seed)
    paths = unlabelled_slices(cfg.data, records, used)
    # --skip-unreadable: the files the student's run leaves out, left out of the teacher's pass too (named there)
    cache = prepare_slices('none', valid + paths, spec, skip_unreadable=True) if cfg.skip_unreadable else None
    valid, paths = readable(valid, cache), readable(paths, cache)
    dets = predict_detections(model, spec, decoding, valid, cache=cache)
    fps, _, scores = froc_curve(*froc_inputs(dets, valid))
    threshold = score_at_fp(fps, scores, fp)
    labelled = pseudo_label(model, spec, decoding, paths, threshold, cfg.pseudo_weight, records, cache=cache)
    write_pseudo_labels(out_csv, labelled, str(teacher))
    boxes = sum(len(r.boxes) for r, _ in labelled)
    log.info(f"teacher {teacher}: score {threshold:.3f} makes {fp:g} false positive(s) per validation slice; {len(labelled)} of "
             f"{len(paths)} unlabelled slices get {boxes} pseudo-label box(es): {out_csv}")
    summary = {'threshold': threshold, 'unlabelled_slices': len(paths), 'pseudo_labelled_slices': len(labelled), 'boxes': boxes,
               'teacher': str(teacher), 'teacher_file': _identity(teacher), 'fp': fp, 'csv': str(out_csv)}
    write_json(summary, Path(out_csv).with_suffix('.json'))         # after the CSV: what a --resume checks before reusing it
    return summary


def _identity(teacher) -> list:
    "The teacher's file as a --resume recognises it: its absolute path, size and modification time (a retrained teacher differs)."
    path = Path(teacher).resolve()
    model = path / 'model.safetensors' if path.is_dir() else path
    st = model.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def _made_as_asked(csv: Path, teacher: Path, fp: float) -> dict | None:
    """The summary of the pseudo-labels in `csv` when a --resume may reuse them: made by `teacher` at `fp`;
    None when there are none yet. Made otherwise, they are an error naming both."""
    if not csv.exists(): return None
    made = csv.with_suffix('.json')
    if not made.exists(): return {'csv': str(csv)}                  # made before their summary was kept: reused as they are
    then = json.loads(made.read_text())
    if then.get('teacher_file', _identity(teacher)) != _identity(teacher) or not math.isclose(then.get('fp', fp), fp):
        raise ValueError(f"--resume: {csv} was made by the teacher {then['teacher']} at --pseudo-fp {then.get('fp')} (that file, "
                         f"as it was then), this run asks for {teacher} at {fp:g}; resume with those, or start over in another --out")
    return then


def self_train(cfg: FinetuneConfig, rounds: int = 1, fp: float = PSEUDO_FP, teacher: Path | None = None) -> dict:
    """`rounds` of self-training (module docstring) into `cfg.out`: the teacher (trained into
    OUT/teacher with `cfg`'s settings unless given), then per round the pseudo-labels and the
    student. Returns the last student's metrics with each round's pseudo-label summary."""
    from .finetuning import finetune
    from .files import check_out_folder
    out = check_out_folder(cfg.out)
    if teacher is None:
        finetune(dataclasses.replace(cfg, out=out / 'teacher', pseudo_labels=None))
        teacher = out / 'teacher' / 'export.pkl'
    summary = []
    for k in range(1, rounds + 1):
        folder = out / f'round_{k}'
        csv = folder / 'pseudo_labels.csv'
        made = _made_as_asked(csv, Path(teacher), fp) if cfg.resume else None
        summary.append(made if made is not None else pseudo_labels_from(Path(teacher), cfg, csv, fp))
        metrics = finetune(dataclasses.replace(cfg, out=folder, pseudo_labels=csv))
        teacher = folder / 'export.pkl'
    return {**metrics, 'self_training': summary}


@dataclass(kw_only=True)
class SelftrainSettings:
    "Self-training's own settings; the student's (and those of a teacher trained here) are `FinetuneConfig`'s."
    teacher: Path | None = option(None, "a trained detector as the first teacher: finetune's export.pkl or model.safetensors", metavar='MODEL',
                                  default_help='trained into OUT/teacher with the same settings as the student', group='self-training')
    rounds: int = option(1, 'rounds of pseudo-labelling, each student the next teacher', at_least=1, group='self-training')
    pseudo_fp: float = option(PSEUDO_FP, "the threshold of the teacher's boxes: the score at which it makes FP false positives per "
                              'validation slice', above=0, metavar='FP', group='self-training')

    def __post_init__(self):
        if self.teacher is not None: self.teacher = Path(self.teacher)
        check_fields(self)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog='python -m lesion_fastai.selftrain', description=__doc__.split('\n\n')[0],
                                 epilog=__doc__.split('\n\n', 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings(ap, SelftrainSettings)
    add_settings(ap, FinetuneConfig, defaults={'out': Path('runs/selftrain')}, names=[
        f.name for f in dataclasses.fields(FinetuneConfig) if f.name != 'pseudo_labels'])     # the pseudo-labels are made here
    return ap


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    st = from_args(SelftrainSettings, ap, args)
    cfg = from_args(FinetuneConfig, ap, args)
    try: self_train(cfg, st.rounds, st.pseudo_fp, st.teacher)
    except (FileNotFoundError, ValueError, FloatingPointError) as e: sys.exit(f"error: {e}")


if __name__ == '__main__':
    main()
