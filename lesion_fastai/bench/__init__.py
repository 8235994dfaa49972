"""Benchmarks: figures printed beside their baselines, results written as JSON, Markdown and plots. One
module per kind of benchmark; `python -m lesion_fastai.bench NAME --help` lists each one's flags.

    python -m lesion_fastai.bench efficiency [--quick]   # label fractions x {scratch, pretrained modes, carried labels, self-training} x seeds
    python -m lesion_fastai.bench budget                 # what pretraining buys: against its epochs and its unlabelled slices
    python -m lesion_fastai.bench study [--quick]        # why the sandwich does (not) match: one change at a time
    python -m lesion_fastai.bench select --setting adapter_ratio --values 0.25,1   # a default, chosen on validation
    python -m lesion_fastai.bench select --setting genesis_paint --values 0.9,0 --mode full --pretext genesis   # a pretext's
    python -m lesion_fastai.bench throughput [--quick]   # slice loading and training images/s, peak memory (this machine)
    python -m lesion_fastai.bench gpu                    # the GPU path: bf16 training, inference, loaders (make gpu-check)
    python -m lesion_fastai.bench scale                  # the disk slice cache from 5,000 to 50,000 slices, extrapolated to 930k
    python -m lesion_fastai.bench stats                  # the built-in data's lesion statistics beside DeepLesion's
    python -m lesion_fastai.bench lesions --pretrained CKPT --data DATA   # does the autoencoder keep the lesions?
    python -m lesion_fastai.bench probe --models CKPT RUN --data DATA     # what each encoder stage knows about lesions

The training benchmarks (efficiency, budget, study, select) each build a grid of runs from their
settings (a dataclass whose fields are the subcommand's flags), hand it to `grid.run_grid`, which
pretrains once per set of pretraining settings and trains a self-trained student after its teacher,
and build their table from the metrics. They resume: finished runs are kept (their metrics.json) and
skipped when the command is run again. Their figures go to docs/results.md, with the command, the machine
and the commit.
"""
