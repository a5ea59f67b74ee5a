"""How sure is the rank map: a bootstrap over calibration units, plain numbers in, plain data out.

No torch (numpy only). With ``aggregation="mean"`` a module's score is a mean over calibration units:

    batch estimator:        s_m = (1/N) sum_n u_nm,   u_nm = mean_j (dL_n/dB_m)_j^2   (N batches)
    per-example estimator:  s_m = (1/E) sum_i u_im,   u_im = mean_j (dl_i/dB_m)_j^2   (E examples, the
                            per-example loss l_i as the estimator defines it, see fimlora.estimators)

so the matrix U (units x modules) of per-unit scores is all a bootstrap needs. One resample draws
N units with replacement (one seeded generator), takes the column means as scores, and allocates
them with the same allocator, budget, bounds and costs as the point allocation. Over B resamples
(default 200) each module gets:

* a score interval and a rank interval: the (1 - level)/2 and (1 + level)/2 quantiles of its
  resampled scores and ranks (level 0.9 by default);
* ``agreement``: the share of resamples that give it its point rank.

``stable_share`` is the share of modules whose agreement is at least ``threshold`` (0.9): the one
number that says how stable the map is. ``max`` and ``l2`` aggregations are not means over units
(the max or norm of a mean is not a mean of per-unit maxima or norms), so resampling them would need
every unit's whole Fisher matrix, not U; they are refused with that reason.

Fewer than ``MIN_UNITS`` (2) units: every resample of one unit is that unit, so every resample gives the point
map and the agreement would read 100% whatever the noise. Such a confidence is *not estimable*: ``estimable`` is
False, ``stable_share`` None, the per-module dicts empty, and a warning says so.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from .config import MIN_AUTO_BATCHES, check_int, check_number

__all__ = ["RankConfidence", "compute_rank_confidence", "SUPPORTED_AGGREGATIONS", "MIN_UNITS", "resampled_ranks",
           "exact_share", "within_one_share", "close_to_point", "AUTO_RULES",
           "WITHIN_ONE_FROM"]

SUPPORTED_AGGREGATIONS = ("mean",)
# A bootstrap of fewer units says nothing: every resample of one unit is that unit. One rule with auto's least
# number of batches (config.MIN_AUTO_BATCHES), which exists so that auto's bootstrap can say something.
MIN_UNITS = MIN_AUTO_BATCHES
_PLURAL = {"batch": "batches", "example": "examples"}

Allocator = Callable[[list[float]], list[int]]


@dataclass
class RankConfidence:
    """Bootstrap summary of a rank map, keyed by module name (the allocation's order).

    ``unit`` is what was resampled (``"batch"`` or ``"example"``) and ``n_units`` how many there were.
    ``estimable`` is False when there were fewer than ``MIN_UNITS`` units: then no resample ran
    (``n_resamples`` 0), the per-module dicts are empty and ``stable_share`` is None, not 1.
    """

    n_resamples: int
    seed: int
    level: float
    threshold: float
    unit: str
    n_units: int
    score_low: dict[str, float]
    score_high: dict[str, float]
    rank_low: dict[str, int]
    rank_high: dict[str, int]
    agreement: dict[str, float]
    stable_share: float | None
    estimable: bool = True

    def unstable(self) -> list[str]:
        """Modules whose point rank comes back in fewer than ``threshold`` of the resamples."""
        return [n for n, a in self.agreement.items() if a < self.threshold]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RankConfidence:
        return cls(**d)


def check_aggregation(aggregation: str) -> None:
    if aggregation not in SUPPORTED_AGGREGATIONS:
        raise ValueError(
            f"aggregation: the bootstrap needs scores that are means over calibration units (aggregation='mean'), "
            f"got {aggregation!r}; a max or norm of the mean Fisher is not a mean of per-unit values"
        )


def _check_inputs(unit_scores: np.ndarray, names: Sequence[str], point_ranks: Sequence[int], n_resamples: int,
                  level: float, threshold: float) -> None:
    if unit_scores.ndim != 2 or unit_scores.shape[1] != len(names):
        raise ValueError(f"unit_scores: must have shape (units, {len(names)} modules), got {unit_scores.shape}")
    if unit_scores.shape[0] < 1:
        raise ValueError("unit_scores: need at least one calibration unit, got 0")
    if not np.isfinite(unit_scores).all() or (unit_scores < 0).any():
        raise ValueError("unit_scores: must be finite and >= 0 (they are mean squared gradients)")
    if len(point_ranks) != len(names):
        raise ValueError(f"point_ranks: need one rank per module ({len(names)}), got {len(point_ranks)}")
    check_int("n_resamples", n_resamples, minimum=1)
    for name, value in (("level", level), ("threshold", threshold)):
        check_number(name, value, minimum=0)
        if value > 1:
            raise ValueError(f"{name}: must be in (0, 1], got {value!r}")


def compute_rank_confidence(
    unit_scores: np.ndarray,
    names: Sequence[str],
    point_ranks: Sequence[int],
    allocate: Allocator,
    n_resamples: int = 200,
    seed: int = 0,
    level: float = 0.9,
    threshold: float = 0.9,
    unit: str = "batch",
) -> RankConfidence:
    """Bootstrap the rank map from per-unit scores U (units, modules); ``allocate`` maps scores to ranks.

    ``allocate`` must be the point allocation's own allocator with its budget, bounds and costs (for
    example ``lambda s: allocate_ranks(s, budget, r_min, r_max, costs)``), so that a resample differs from
    the point allocation only in the scores.
    """
    u = np.asarray(unit_scores, dtype=np.float64)
    _check_inputs(u, names, point_ranks, n_resamples, level, threshold)
    n = u.shape[0]
    if n < MIN_UNITS:
        return not_estimable(n, unit, seed=seed, level=level, threshold=threshold)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n, size=(n_resamples, n))
    scores = u[picks].mean(axis=1)  # (B, M)
    ranks = np.array([allocate(row.tolist()) for row in scores], dtype=np.int64)
    lo, hi = (1 - level) / 2, (1 + level) / 2
    score_q = np.quantile(scores, [lo, hi], axis=0)
    # Ranks are integers: the "lower"/"higher" quantiles keep the interval's ends at ranks that occurred.
    rank_lo = np.quantile(ranks, lo, axis=0, method="lower")
    rank_hi = np.quantile(ranks, hi, axis=0, method="higher")
    agreement = (ranks == np.asarray(point_ranks, dtype=np.int64)[None, :]).mean(axis=0)
    names = list(names)
    return RankConfidence(
        n_resamples=n_resamples, seed=seed, level=float(level), threshold=float(threshold), unit=unit, n_units=n,
        score_low=dict(zip(names, score_q[0].tolist())), score_high=dict(zip(names, score_q[1].tolist())),
        rank_low=dict(zip(names, (int(r) for r in rank_lo))), rank_high=dict(zip(names, (int(r) for r in rank_hi))),
        agreement=dict(zip(names, agreement.tolist())),
        stable_share=float((agreement >= threshold).mean()),
    )


def units_text(n_units: int, unit: str) -> str:
    """``1 calibration batch``, ``3 calibration examples``."""
    return f"{n_units} calibration {unit if n_units == 1 else _PLURAL.get(unit, unit + 's')}"


def not_estimable_text(n_units: int, unit: str) -> str:
    """The one sentence every report of a not-estimable confidence uses."""
    return (f"not estimable from {units_text(n_units, unit)} (a bootstrap needs at least {MIN_UNITS}: every "
            "resample of one unit is that unit)")


def not_estimable(n_units: int, unit: str, seed: int, level: float, threshold: float) -> RankConfidence:
    """The confidence of a map from fewer than ``MIN_UNITS`` units, with a warning that says so."""
    warnings.warn(f"confidence: {not_estimable_text(n_units, unit)}; the rank map's stability is unknown, not 100%: "
                  "calibrate on more batches", UserWarning, stacklevel=3)
    return RankConfidence(n_resamples=0, seed=seed, level=float(level), threshold=float(threshold), unit=unit,
                          n_units=n_units, score_low={}, score_high={}, rank_low={}, rank_high={}, agreement={},
                          stable_share=None, estimable=False)


# ---------------------------------------------------------------------------
# n_batches="auto"'s stop rules: pure functions of the resampled ranks R (B resamples, M modules) and the point
# ranks p, and the share of resamples ``threshold`` (stable_threshold). Each returns a share of modules; auto stops
# once it is >= auto_stable_share.


def resampled_ranks(unit_scores: np.ndarray, allocate: Allocator, n_resamples: int = 200,
                    seed: int = 0) -> np.ndarray:
    """R (B, M) int64: R_b = allocate((1/N) sum_i U[k_bi]), k_b1..k_bN drawn from 0..N-1 with replacement.

    The draws are :func:`compute_rank_confidence`'s (same generator, same order), so a rule on R sees
    exactly the resamples the allocation's confidence reports.
    """
    u = np.asarray(unit_scores, dtype=np.float64)
    if u.ndim != 2 or u.shape[0] < 1:
        raise ValueError(f"unit_scores: must have shape (units >= 1, modules), got {u.shape}")
    check_int("n_resamples", n_resamples, minimum=1)
    n = u.shape[0]
    picks = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    scores = u[picks].mean(axis=1)
    return np.array([allocate(row.tolist()) for row in scores], dtype=np.int64).reshape(n_resamples, -1)


def _check_ranks(ranks: np.ndarray, point: Sequence[int], threshold: float) -> tuple[np.ndarray, np.ndarray]:
    check_number("threshold", threshold, minimum=0)
    if threshold > 1:
        raise ValueError(f"threshold: must be in (0, 1], got {threshold!r}")
    r = np.asarray(ranks, dtype=np.int64)
    p = np.asarray(point, dtype=np.int64)
    if r.ndim != 2 or r.shape[1] != p.shape[0] or r.shape[0] < 1:
        raise ValueError(f"ranks: must have shape (resamples >= 1, {p.shape[0]} modules), got {r.shape}")
    return r, p


def exact_share(ranks: np.ndarray, point: Sequence[int], threshold: float) -> float:
    """Rule ``"exact"``: share_m [ (1/B) sum_b 1{R_bm = p_m} >= threshold ], the modules whose point rank comes
    back in at least ``threshold`` of the resamples (the confidence's ``stable_share``)."""
    r, p = _check_ranks(ranks, point, threshold)
    # A mean of booleans is k/B correctly rounded, so it equals the threshold exactly at the boundary (no
    # k >= threshold * B, whose product can round past k).
    return float(((r == p[None, :]).mean(axis=0) >= threshold).mean())


# Below this rank one unit of rank is more than a quarter of a module's rank (1 -> 2 doubles it, 1 -> 0 drops the
# adapter), so "within_one" asks for the exact rank there; from it on, one rank either way is a small change.
WITHIN_ONE_FROM = 4


def close_to_point(ranks: np.ndarray, point: np.ndarray) -> np.ndarray:
    """close_bm = 1{|R_bm - p_m| <= t(p_m)}, t(p) = 1 if p >= WITHIN_ONE_FROM (4) else 0.

    So a resample never counts as close when it drops a kept module or keeps a dropped one: p = 0 needs R = 0,
    p in 1..3 needs R = p, and p >= 4 allows R >= 3 > 0.
    """
    tolerance = (point >= WITHIN_ONE_FROM).astype(np.int64)
    return np.abs(ranks - point[None, :]) <= tolerance[None, :]


def within_one_share(ranks: np.ndarray, point: Sequence[int], threshold: float) -> float:
    """Rule ``"within_one"``: the share of modules close to the map (:func:`close_to_point`: the exact rank below
    rank 4, within one rank from 4 on) that at least ``threshold`` of the resamples reach. With
    w_b = (1/M) sum_m close_bm (resample b's share), it is w_(k), the k-th largest w_b, k the least integer with
    k/B >= threshold; so ``within_one_share >= s`` iff (1/B) #{b : w_b >= s} >= threshold.

    A rank moving by one changes nothing measurable at r = 8, and the map-level share is what the agreement
    with a 32-batch map measures (docs/benchmarks.md section 7), so this asks for that and no more. At small
    ranks one rank is not small: with "within one" everywhere, rank 0 against 1 (a module kept or dropped)
    counted as close, and unit scores of pure noise at r = 1-2 were called stable after 2 batches (issue 28).
    """
    r, p = _check_ranks(ranks, point, threshold)
    n = r.shape[0]
    w = np.sort(close_to_point(r, p).mean(axis=1))[::-1]
    k = next(k for k in range(1, n + 1) if k / n >= threshold)  # k / n as a mean would compute it
    return float(w[k - 1])


# auto_rule -> (the rule, how the stop reason words it)
AUTO_RULES = {
    "exact": (exact_share, "keep their rank"),
    "within_one": (within_one_share, "stay close to their rank (exact below 4, within one from 4)"),
}
