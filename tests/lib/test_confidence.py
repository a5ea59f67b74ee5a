"""The bootstrap of the rank map against a slow, obvious resampling loop (issue 15, 1)."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from fimlora.confidence import check_aggregation, compute_rank_confidence
from fimlora.waterfill import allocate_ranks


def reference_bootstrap(u, point, allocate, n_resamples, seed, threshold):
    """One resample at a time with the same draws, Python lists only."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(u), size=(n_resamples, len(u)))
    agree = [0] * len(point)
    all_ranks, all_scores = [], []
    for row in picks:
        scores = [sum(u[i][m] for i in row) / len(row) for m in range(len(point))]
        ranks = allocate(scores)
        all_scores.append(scores)
        all_ranks.append(ranks)
        for m, r in enumerate(ranks):
            agree[m] += r == point[m]
    agreement = [a / n_resamples for a in agree]
    return agreement, sum(a >= threshold for a in agreement) / len(point), all_ranks, all_scores


def case(n_units=8, modules=12, seed=0, noise=0.5):
    rng = np.random.default_rng(seed)
    base = rng.exponential(1.0, modules)
    u = base[None, :] * rng.lognormal(0, noise, (n_units, modules))
    names = [f"layers.{i}.q_proj" for i in range(modules)]
    allocate = functools.partial(allocate_ranks, budget=4 * modules, r_min=1, r_max=8)
    point = allocate(u.mean(axis=0).tolist())
    return u, names, point, allocate


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_slow_reference(seed):
    u, names, point, allocate = case(seed=seed)
    got = compute_rank_confidence(u, names, point, allocate, n_resamples=50, seed=seed)
    agreement, stable, ranks, scores = reference_bootstrap(u.tolist(), point, allocate, 50, seed, 0.9)
    assert list(got.agreement.values()) == agreement
    assert got.stable_share == stable
    ranks, scores = np.array(ranks), np.array(scores)
    for m, name in enumerate(names):
        # 5% / 95% of 50 sorted values, the "lower"/"higher" ends for integers, linear for scores
        column = sorted(ranks[:, m])
        assert (got.rank_low[name], got.rank_high[name]) == (column[2], column[47])
        s = sorted(scores[:, m])
        low, high = s[2] + 0.45 * (s[3] - s[2]), s[46] + 0.55 * (s[47] - s[46])
        assert (got.score_low[name], got.score_high[name]) == pytest.approx((low, high), rel=1e-12)


def test_identical_units_are_perfectly_stable_and_noise_is_not():
    u, names, point, allocate = case(noise=0.0)
    steady = compute_rank_confidence(u, names, point, allocate, n_resamples=30)
    assert steady.stable_share == 1.0 and steady.unstable() == []
    assert steady.rank_low == steady.rank_high == dict(zip(names, point))
    u, names, point, allocate = case(noise=2.0, n_units=2)
    noisy = compute_rank_confidence(u, names, point, allocate, n_resamples=200)
    assert noisy.stable_share < 1.0 and noisy.unstable()


def test_seeded_and_json_round_trip():
    u, names, point, allocate = case()
    a = compute_rank_confidence(u, names, point, allocate, n_resamples=40, seed=7)
    b = compute_rank_confidence(u, names, point, allocate, n_resamples=40, seed=7)
    assert a == b
    assert type(a).from_dict(a.to_dict()) == a


@pytest.mark.parametrize("kw, needle", [
    (dict(unit_scores=np.ones((3, 2))), r"unit_scores: must have shape \(units, 12 modules\), got \(3, 2\)"),
    (dict(unit_scores=np.full((3, 12), np.nan)), "unit_scores: must be finite and >= 0"),
    (dict(n_resamples=0), "n_resamples: must be >= 1, got 0"),
    (dict(level=1.5), r"level: must be in \(0, 1\], got 1.5"),
])
def test_bad_input_names_the_field(kw, needle):
    u, names, point, allocate = case()
    args = dict(unit_scores=u, names=names, point_ranks=point, allocate=allocate) | kw
    with pytest.raises(ValueError, match=needle):
        compute_rank_confidence(**args)


def test_max_and_l2_are_refused_with_the_reason():
    check_aggregation("mean")
    with pytest.raises(ValueError, match="aggregation: the bootstrap needs scores that are means.*got 'max'"):
        check_aggregation("max")


def test_threshold_one_counts_modules_that_agree_in_every_resample():
    """stable means agreement >= threshold: identical units agree in 100% of resamples, so 1.0 is met."""
    u, names, point, allocate = case(noise=0.0)
    conf = compute_rank_confidence(u, names, point, allocate, n_resamples=20, threshold=1.0)
    assert set(conf.agreement.values()) == {1.0}
    assert conf.stable_share == 1.0 and conf.unstable() == []


def test_one_unit_is_not_estimable_not_perfectly_stable():
    u, names, point, allocate = case(n_units=1)
    with pytest.warns(UserWarning, match=r"confidence: not estimable from 1 calibration batch"):
        conf = compute_rank_confidence(u, names, point, allocate, n_resamples=50)
    assert conf.estimable is False and conf.stable_share is None and conf.n_units == 1
    assert conf.agreement == {} and conf.unstable() == []
    assert type(conf).from_dict(conf.to_dict()) == conf
