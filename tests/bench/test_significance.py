"""The paired bootstrap over test examples pooled over seeds (issue 22, 5), against a slow, obvious loop."""

from __future__ import annotations

import numpy as np
import pytest

from fimlora.bench.significance import paired_bootstrap


def slow_paired_bootstrap(a, b, n_resamples, seed, confidence):
    """One resample at a time, every sum written out."""
    seeds, n = len(a), len(a[0])
    d = [sum(a[s][i] - b[s][i] for s in range(seeds)) / seeds for i in range(n)]
    delta = sum(d) / n
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n_resamples):
        idx = rng.integers(0, n, size=n)
        stats.append(sum(d[j] for j in idx) / n)
    extreme = sum(1 for x in stats if abs(x - delta) >= abs(delta) - 1e-12)
    tail = (1 - confidence) / 2
    low, high = np.quantile(stats, [tail, 1 - tail])
    return delta, low, high, (1 + extreme) / (1 + n_resamples)


def correctness(p, seeds, n, seed):
    g = np.random.default_rng(seed)
    return (g.random((seeds, n)) < p).astype(int).tolist()


def test_paired_bootstrap_matches_a_slow_loop():
    a, b = correctness(0.7, 3, 40, 1), correctness(0.55, 3, 40, 2)
    got = paired_bootstrap(a, b, n_resamples=600, seed=5, confidence=0.9)  # 600 > one 256-resample block
    delta, low, high, p = slow_paired_bootstrap(a, b, 600, 5, 0.9)
    assert got["difference"] == pytest.approx(delta) == pytest.approx(np.mean(a) - np.mean(b))
    assert (got["ci_low"], got["ci_high"]) == (pytest.approx(low), pytest.approx(high))
    assert got["p_value"] == pytest.approx(p)
    assert got["n_examples"] == 40 and got["n_seeds"] == 3 and got["n_resamples"] == 600


def test_paired_bootstrap_on_hand_checkable_cases():
    same = [[1, 0, 1, 1], [0, 0, 1, 1]]
    tie = paired_bootstrap(same, same, n_resamples=200)
    assert tie["difference"] == 0 and tie["ci_low"] == tie["ci_high"] == 0 and tie["p_value"] == 1.0
    # a right on every example, b wrong on every one: difference 1 with no spread, p at its floor 1/(1+K)
    sure = paired_bootstrap([[1] * 5] * 2, [[0] * 5] * 2, n_resamples=99)
    assert sure["difference"] == 1 and sure["ci_low"] == sure["ci_high"] == 1
    assert sure["p_value"] == pytest.approx(1 / 100)


@pytest.mark.parametrize("a, b, needle", [
    ([[1, 0]], [[1, 0, 1]], r"a, b: must be \(seeds, examples\) lists of the same, non-empty shape"),
    ([[1, 2]], [[1, 0]], r"a: per-example correctness must be 0 or 1, got values \[1.0, 2.0\]"),
])
def test_paired_bootstrap_refuses_unpaired_or_non_binary_input(a, b, needle):
    with pytest.raises(ValueError, match=needle):
        paired_bootstrap(a, b, n_resamples=10)


def test_paired_bootstrap_agrees_with_scipys_bootstrap_and_a_sign_flip_permutation_test():
    """Against library routines: SciPy's percentile bootstrap of the mean pooled difference gives the same interval
    up to resampling noise, and SciPy's paired permutation test (signs of d_i flipped) the same verdict."""
    from scipy.stats import bootstrap, permutation_test

    a, b = correctness(0.72, 3, 300, 11), correctness(0.62, 3, 300, 12)
    got = paired_bootstrap(a, b, n_resamples=20_000, seed=3)
    d = (np.asarray(a, float) - np.asarray(b, float)).mean(axis=0)
    ref = bootstrap((d,), np.mean, n_resamples=20_000, method="percentile", confidence_level=0.95,
                    random_state=np.random.default_rng(4))
    assert got["ci_low"] == pytest.approx(ref.confidence_interval.low, abs=0.005)
    assert got["ci_high"] == pytest.approx(ref.confidence_interval.high, abs=0.005)
    perm = permutation_test((d,), np.mean, permutation_type="samples", n_resamples=20_000,
                            random_state=np.random.default_rng(5))
    assert got["p_value"] < 0.01 and perm.pvalue < 0.01  # a 10-point gap over 300 examples
    close_a, close_b = correctness(0.7, 3, 300, 21), correctness(0.69, 3, 300, 22)
    near = paired_bootstrap(close_a, close_b, n_resamples=20_000, seed=3)
    d = (np.asarray(close_a, float) - np.asarray(close_b, float)).mean(axis=0)
    perm = permutation_test((d,), np.mean, permutation_type="samples", n_resamples=20_000,
                            random_state=np.random.default_rng(5))
    assert near["p_value"] == pytest.approx(perm.pvalue, abs=0.08)
