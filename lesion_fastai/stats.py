"""Small-sample statistics for comparing training regimes over seeds: mean and a t confidence interval."""
from __future__ import annotations

import math

import numpy as np
from scipy.stats import t as student_t

__all__ = ['mean_ci']


def mean_ci(values, level: float = .95) -> tuple[float, float]:
    """Mean and half-width of its `level` confidence interval (Student's t, sample std); the half-width
    is NaN for a single value, where no interval can be given."""
    x = np.asarray(values, np.float64)
    if len(x) == 0: return float('nan'), float('nan')
    if len(x) == 1: return float(x[0]), float('nan')
    q = float(student_t.ppf((1 + level) / 2, len(x) - 1))
    return float(x.mean()), float(q * x.std(ddof=1) / math.sqrt(len(x)))
