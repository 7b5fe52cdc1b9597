"""Statistics for comparing how concentrated two models' updates are (scipy.stats underneath)."""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import numpy as np
from scipy import stats as sps

from .metrics import gini, normalized_entropy, topk_share

Statistic = Callable[[np.ndarray], float | None]


def concentration_statistics(k: int = 3) -> dict[str, Statistic]:
    return {"gini": gini, "entropy": normalized_entropy, f"top{k}": lambda x: topk_share(x, k)}


def _vectorized(stat: Statistic) -> Callable:
    def apply(sample, axis=-1):
        arr = np.moveaxis(np.asarray(sample, dtype=np.float64), axis, -1)
        flat = arr.reshape(-1, arr.shape[-1])
        out = np.array([np.nan if (v := stat(row)) is None else v for row in flat])
        return out.reshape(arr.shape[:-1])
    return apply


def bootstrap_ci(values: Sequence[float], stat: Statistic, n_resamples: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval of a concentration statistic, resampling blocks.

    Resamples where the statistic is undefined (every drawn block unchanged) are left out,
    which scipy's own percentile step would turn into a NaN interval.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2 or stat(x) is None:
        return None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sps.DegenerateDataWarning)
        res = sps.bootstrap((x,), _vectorized(stat), n_resamples=n_resamples, confidence_level=level,
                            method="percentile", random_state=np.random.default_rng(seed))
    dist = res.bootstrap_distribution
    dist = dist[~np.isnan(dist)]
    if dist.size == 0:
        return None, None
    tail = 100 * (1 - level) / 2
    return float(np.percentile(dist, tail)), float(np.percentile(dist, 100 - tail))


def more_concentrated_test(a: Sequence[float], b: Sequence[float], n_resamples: int = 2000,
                           seed: int = 0) -> dict[str, float | None]:
    """One-sided permutation test (scipy.stats.permutation_test) that A's block profile is more
    concentrated (higher Gini) than B's. Each profile is divided by its mean first, so the test
    compares shapes, not the overall amount of change; blocks are the exchangeable units."""
    xa = np.asarray(a, dtype=np.float64)
    xb = np.asarray(b, dtype=np.float64)
    if xa.size < 2 or xb.size < 2 or xa.sum() <= 0 or xb.sum() <= 0:
        return {"statistic": None, "p_value": None}
    xa, xb = xa / xa.mean(), xb / xb.mean()

    def gini_difference(x, y, axis=-1):
        return _vectorized(gini)(x, axis) - _vectorized(gini)(y, axis)

    res = sps.permutation_test((xa, xb), gini_difference, permutation_type="independent",
                               alternative="greater", n_resamples=n_resamples,
                               random_state=np.random.default_rng(seed), vectorized=True)
    return {"statistic": float(res.statistic), "p_value": float(res.pvalue)}


def mean_and_sd(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation over seeds, skipping missing and non-finite values;
    sd 0 for one value, (None, None) for none."""
    xs = [float(v) for v in values if v is not None and np.isfinite(v)]
    if not xs:
        return None, None
    return float(np.mean(xs)), (float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0)
