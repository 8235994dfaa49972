"""Small-sample statistics for comparing training regimes over seeds: mean and a t confidence interval."""
from __future__ import annotations

import math

import numpy as np

__all__ = ['mean_ci', 'T95']

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond: 1.96).
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def mean_ci(values) -> tuple[float, float]:
    """Mean and half-width of its 95% confidence interval (Student's t, sample std); the half-width is
    NaN for a single value, where no interval can be given."""
    x = np.asarray(values, np.float64)
    if len(x) == 0: return float('nan'), float('nan')
    if len(x) == 1: return float(x[0]), float('nan')
    t = T95[len(x) - 2] if len(x) - 1 <= len(T95) else 1.96
    return float(x.mean()), float(t * x.std(ddof=1) / math.sqrt(len(x)))
