"""Budget-constrained integer rank allocation (two-phase water-filling).

No torch (numpy only): scores in, integer ranks out.

Given scores s_m >= 0 for L modules, an integer budget R and integer bounds
r_min <= r_max:

Phase 1 (continuous). Find the level tau with

    sum_m clip(tau * s_m, r_min, r_max) = R

and set x_m = clip(tau * s_m, r_min, r_max). f(tau) = sum_m clip(tau*s_m, ...)
is continuous, non-decreasing and piecewise linear with breakpoints r_min/s_m
and r_max/s_m, so tau is found exactly by a sweep over the sorted breakpoints.
If every positive-score module is at r_max and budget is still left, no tau
exists; the zero-score modules then share the rest equally.

Phase 2 (integers). r_m = floor(x_m); the R - sum_m r_m leftover units go one
at a time to the largest fractional parts x_m - r_m, ties broken by higher
score, then by module order, never above r_max.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

import numpy as np

from .config import check_int

__all__ = ["allocate_ranks", "water_fill", "random_scores", "validate_allocation_inputs"]

# Fractional parts closer than this to 0 or 1 are treated as exact integers so
# that floating-point noise in tau*s_m (e.g. 2.9999999999) cannot move a unit.
_FRAC_EPS = 1e-9


def validate_allocation_inputs(
    scores: Sequence[float], budget: int, r_min: int, r_max: int
) -> None:
    """Raise ValueError naming the field, the rule and the values if infeasible."""
    n = len(scores)
    if n == 0:
        raise ValueError("scores: need at least one module to allocate rank to, got 0 scores")
    for name, value in (("budget", budget), ("r_min", r_min), ("r_max", r_max)):
        check_int(name, value)
    if r_min < 1:
        raise ValueError(f"r_min: must be >= 1 (PEFT cannot hold a rank-0 LoRA module), got r_min={r_min}")
    if r_max < r_min:
        raise ValueError(f"r_max: must be >= r_min, got r_max={r_max} < r_min={r_min}")
    if n * r_min > budget:
        raise ValueError(
            f"budget: infeasible, L*r_min > budget: {n} modules * r_min={r_min} = {n * r_min} "
            f"> budget={budget}; lower r_min or raise the budget"
        )
    if n * r_max < budget:
        raise ValueError(
            f"budget: infeasible, L*r_max < budget: {n} modules * r_max={r_max} = {n * r_max} "
            f"< budget={budget}; raise r_max or lower the budget"
        )
    for i, s in enumerate(scores):
        try:
            fs = float(s)
        except (TypeError, ValueError):
            raise ValueError(f"scores[{i}]: must be a real number, got {s!r}") from None
        if not math.isfinite(fs):
            raise ValueError(f"scores[{i}]: must be finite, got {s!r}")
        if fs < 0:
            raise ValueError(f"scores[{i}]: must be >= 0, got {s!r}")


def water_fill(scores: Sequence[float], budget: int, r_min: int, r_max: int) -> list[float]:
    """Phase 1: continuous levels x_m = clip(tau*s_m, r_min, r_max) with sum x_m = budget.

    Inputs must already be valid (see :func:`validate_allocation_inputs`).
    O(L log L), vectorised with numpy (100k modules well under a second).
    """
    s = np.asarray(scores, dtype=np.float64)
    n = s.size
    lo, hi = float(r_min), float(r_max)
    target = float(budget)
    positive = s > 0

    if n * lo >= target:  # feasibility makes this equality: everyone at the floor
        return [lo] * n
    if n * hi <= target:  # ... and this one: everyone at the cap
        return [hi] * n
    if not positive.any():  # all-zero scores: uniform
        return [target / n] * n

    # f(tau) = sum_m clip(tau*s_m, r_min, r_max) is linear between consecutive breakpoints
    # r_min/s_m and r_max/s_m. Bisect over the sorted breakpoints evaluating f directly (a sum
    # of non-negative terms, so no cancellation), then solve the linear piece exactly with
    # slope and offset summed from the modules' regimes inside that piece.
    sp = s[positive]
    k = sp.size
    bps = np.unique(np.concatenate([lo / sp, hi / sp]))

    def f(t: float) -> float:
        return float(np.clip(t * s, lo, hi).sum())

    if f(bps[-1]) >= target:
        a, b = 0, bps.size - 1  # f(bps[0]) = L*r_min < target <= f(bps[b])
        while a + 1 < b:
            mid = (a + b) // 2
            a, b = (mid, b) if f(bps[mid]) < target else (a, mid)
        t_mid = 0.5 * (bps[a] + bps[b])
        level = t_mid * s
        linear = positive & (level > lo) & (level < hi)
        capped = level >= hi
        slope = float(s[linear].sum())
        offset = lo * float(np.count_nonzero(~linear & ~capped)) + hi * float(np.count_nonzero(capped))
        tau = (target - offset) / slope
        return np.clip(tau * s, lo, hi).tolist()

    # Every positive-score module sits at r_max and budget is left: no tau exists.
    # Feasibility (L*r_max >= R) guarantees zero-score modules exist here and that
    # their equal share lies in (r_min, r_max].
    x = np.where(positive, hi, 0.0)
    share = (target - hi * k) / (n - k)
    x[~positive] = min(hi, max(lo, share))
    return x.tolist()


def _round_to_budget(
    x: Sequence[float], scores: Sequence[float], budget: int, r_min: int, r_max: int
) -> list[int]:
    """Phase 2: floor, then hand leftover units to the largest fractional parts."""
    xv = np.asarray(x, dtype=np.float64)
    sv = np.asarray(scores, dtype=np.float64)
    floors = np.floor(xv)
    fracs = xv - floors
    up = fracs > 1 - _FRAC_EPS  # 2.9999999999 is 3
    floors[up] += 1
    fracs[up] = 0.0
    fracs[fracs < _FRAC_EPS] = 0.0
    ranks = np.clip(floors, r_min, r_max).astype(np.int64)
    left = int(budget - ranks.sum())
    # largest fractional part first, then higher score, then module order
    order = np.lexsort((np.arange(xv.size), -sv, -fracs))
    # Floating-point noise can leave a unit or two more than the fractional parts
    # account for; cycling keeps the budget exact while still respecting r_max.
    while left > 0:
        room = order[ranks[order] < r_max]
        if room.size == 0:  # pragma: no cover - excluded by the feasibility check
            raise AssertionError("allocator could not place the remaining budget")
        give = room[:left]
        ranks[give] += 1
        left -= give.size
    if left < 0:  # pragma: no cover - the sum of floors never exceeds the budget
        raise AssertionError("allocator rounding exceeded the budget")
    return ranks.tolist()


def allocate_ranks(
    scores: Mapping[str, float] | Sequence[float],
    budget: int,
    r_min: int = 1,
    r_max: int | None = None,
) -> dict[str, int] | list[int]:
    """Split an integer rank ``budget`` over modules in proportion to their scores.

    Args:
        scores: per-module scores s_m >= 0, a mapping name -> score (order of the
            mapping is the module order used for tie-breaking) or a sequence.
        budget: total rank R; the result sums to exactly R.
        r_min, r_max: integer bounds for every module, 1 <= r_min <= r_max.
            ``r_max=None`` means no upper bound other than the budget.

    Returns:
        ranks in the same form as ``scores`` (dict or list).

    Guarantees: sum == budget; r_min <= r_m <= r_max; s_a > s_b implies
    r_a >= r_b; deterministic; equal (or all-zero) scores give uniform ranks.
    Raises ValueError for infeasible input before doing anything.
    """
    if isinstance(scores, Mapping):
        names = list(scores.keys())
        values = [scores[k] for k in names]
    else:
        names = None
        values = list(scores)
    if r_max is None:
        check_int("budget", budget)
        r_max = budget
    validate_allocation_inputs(values, budget, r_min, r_max)
    values = [float(v) for v in values]
    x = water_fill(values, budget, r_min, r_max)
    ranks = _round_to_budget(x, values, budget, r_min, r_max)
    if names is None:
        return ranks
    return dict(zip(names, ranks))


def random_scores(names: Sequence[str], seed: int) -> dict[str, float]:
    """Scores drawn uniformly from [0, 1) by a seeded generator (the random-rank baseline).

    Fed through :func:`allocate_ranks`, they give a random pattern with exactly
    the same budget and bounds as FIM-LoRA.
    """
    rng = random.Random(seed)
    return {name: rng.random() for name in names}
