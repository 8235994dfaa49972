"""python -m lesion_fastai.evaluate: score a trained detector on the test patients of a data folder.

DeepLesion's protocol (docs/design.md): sensitivity at 0.5-16 false positives per slice, its mean over
0.5-4, and the top box of each slice, beside the mean box of the labels the model was trained with. MODEL is either form a
finetune run writes: export.pkl, or model.safetensors with model.json beside it (safe to share: nothing
is unpickled). Writes eval_metrics.json, eval_predictions.csv, eval_froc.png, eval_results.png,
eval_errors.png and eval_report.html to --out (default: the folder of MODEL).

Examples:
    python -m lesion_fastai.evaluate runs/demo/scratch/export.pkl --data data/synthetic
    python -m lesion_fastai.evaluate runs/demo/scratch/model.safetensors --data data/synthetic --out runs/eval
"""
from .log import hush_third_party
hush_third_party(__name__)       # run as a command: quiet known third-party warnings before fastai loads

import argparse
import sys
from pathlib import Path

from .config import EvaluateConfig, add_settings, from_args

__all__ = ['parser', 'evaluate', 'main']


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog='python -m lesion_fastai.evaluate', description=__doc__.split('\n\n')[0],
                                 epilog=__doc__.split('\n\n', 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('model', type=Path, help=EvaluateConfig.__dataclass_fields__['model'].metadata['help'])
    add_settings(ap, EvaluateConfig)
    return ap


def evaluate(cfg: EvaluateConfig) -> dict:
    "The test metrics of `cfg.model` on `cfg.data` (`evaluation.evaluate_export`), written to `cfg.out`."
    from .evaluation import evaluate_export
    from .log import log
    from .metrics import summary_line
    metrics = evaluate_export(cfg.model, cfg.data, cfg.out, cfg.bs, cfg.device, cfg.skip_unreadable)
    log.info(f"test: {summary_line(metrics['test'])}")
    return metrics


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    cfg = from_args(EvaluateConfig, ap, args)
    try: evaluate(cfg)
    except (FileNotFoundError, ValueError) as e: sys.exit(f"error: {e}")


if __name__ == '__main__':
    main()
