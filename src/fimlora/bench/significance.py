"""Paired significance of the difference between two methods, from their per-example correctness.

Every result of a classification or multiple-choice task records ``correct`` (1 where the prediction equals the
reference, test-set order; see :func:`fimlora.app.train.evaluate`). Two methods run with the same seeds on
the same test examples give, for seed s and example i, a_si and b_si in {0, 1}.

:func:`paired_bootstrap` pools the seeds: d_i = (1/S) sum_s (a_si - b_si), the difference in accuracy is
delta = (1/n) sum_i d_i, and the bootstrap resamples *examples* (the same indices for both methods and every
seed, so the pairing and the seed-to-seed correlation are kept): delta*_k = (1/n) sum_j d_{i_kj} with i_kj drawn
uniformly with replacement from 1..n, k = 1..K. The interval is the percentile interval of delta*; the two-sided
p-value is that of the bootstrap shifted to the null (delta*_k - delta centred on 0):
p = (1 + #{k : |delta*_k - delta| >= |delta|}) / (1 + K). Pure numpy, plain data out.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..config import check_int, check_number

__all__ = ["paired_bootstrap", "pooled_differences"]

# Resamples drawn per block: bounds memory at about CHUNK * n indices whatever K is.
CHUNK = 256


def pooled_differences(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> np.ndarray:
    """d_i = mean over seeds of a_si - b_si, shape (n,); a and b are (seeds, examples) of 0/1, same shape."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.ndim != 2 or x.shape != y.shape or x.size == 0:
        raise ValueError(f"a, b: must be (seeds, examples) lists of the same, non-empty shape (same seeds, same "
                         f"test examples), got {x.shape} and {y.shape}")
    for name, v in (("a", x), ("b", y)):
        if not np.isin(v, (0.0, 1.0)).all():
            values = sorted({float(x) for x in v.ravel()})[:5]
            raise ValueError(f"{name}: per-example correctness must be 0 or 1, got values {values}")
    return (x - y).mean(axis=0)


def paired_bootstrap(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]], n_resamples: int = 10_000,
                     seed: int = 0, confidence: float = 0.95) -> dict:
    """Accuracy of a minus accuracy of b over the pooled seeds, its bootstrap CI and two-sided p-value.

    Returns {"difference", "ci_low", "ci_high", "p_value", "n_examples", "n_seeds", "n_resamples",
    "confidence"} (floats and ints). Index draws: ``numpy.random.default_rng(seed).integers(0, n, size=n)`` per
    resample, in order.
    """
    check_int("n_resamples", n_resamples, minimum=1)
    check_number("confidence", confidence, minimum=0)
    if confidence >= 1:
        raise ValueError(f"confidence: must be < 1, got {confidence!r}")
    d = pooled_differences(a, b)
    n = d.shape[0]
    delta = float(d.mean())
    rng = np.random.default_rng(seed)
    stats = np.empty(n_resamples)
    for start in range(0, n_resamples, CHUNK):
        k = min(CHUNK, n_resamples - start)
        stats[start : start + k] = d[rng.integers(0, n, size=(k, n))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(stats, [tail, 1 - tail])
    extreme = int(np.count_nonzero(np.abs(stats - delta) >= abs(delta) - 1e-12))
    return {"difference": delta, "ci_low": float(low), "ci_high": float(high),
            "p_value": (1 + extreme) / (1 + n_resamples), "n_examples": int(n), "n_seeds": int(len(a)),
            "n_resamples": int(n_resamples), "confidence": float(confidence)}
