"""Statistics of the comparison: paired bootstrap intervals of a difference of per-image scores."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["paired_bootstrap", "paired_over_seeds"]


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_boot: int = 10000, level: float = 0.95,
                     seed: int = 0) -> dict[str, float]:
    """Mean of ``a - b`` over paired cases (the same test images) and its percentile bootstrap interval.

    The cases are resampled with replacement ``n_boot`` times (the pairs stay together), so the interval says how much
    the mean difference depends on which test images were drawn. Cases where either score is missing (NaN) are left
    out.

    Returns:
        ``{"mean": ..., "low": ..., "high": ..., "n": cases used, "p_le_0": share of resamples with a mean <= 0}``.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired scores differ in length: {x.shape} vs {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    d = x[keep] - y[keep]
    if d.size == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0, "p_le_0": float("nan")}
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(int(n_boot), d.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return {"mean": float(d.mean()), "low": float(low), "high": float(high), "n": int(d.size),
            "p_le_0": float((means <= 0).mean())}


def paired_over_seeds(a: dict[int, dict[str, float]], b: dict[int, dict[str, float]], **kwargs: Any) -> dict[str, float]:
    """:func:`paired_bootstrap` of two methods' per-image scores over several seeds: ``{seed: {image: score}}`` each.

    Each image's score is first averaged over the seeds both methods have (the test images are the same for every
    seed), so the interval is over test images and the seeds' training noise is averaged into each pair.
    """
    seeds = sorted(set(a) & set(b))
    images = sorted(set.intersection(*[set(a[s]) & set(b[s]) for s in seeds])) if seeds else []
    x = [float(np.nanmean([a[s][i] for s in seeds])) for i in images]
    y = [float(np.nanmean([b[s][i] for s in seeds])) for i in images]
    return {**paired_bootstrap(x, y, **kwargs), "seeds": len(seeds)}
