"""Budget-constrained integer rank allocation (two-phase water-filling).

Pure Python, no torch: scores in, integer ranks out.

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
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}: must be an integer, got {value!r} ({type(value).__name__})")
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
    Runs in O(L log L).
    """
    s = [float(v) for v in scores]
    n = len(s)
    lo, hi = float(r_min), float(r_max)
    target = float(budget)
    positive = [i for i in range(n) if s[i] > 0]
    zero = [i for i in range(n) if s[i] == 0]

    if n * lo >= target:  # feasibility makes this equality: everyone at the floor
        return [lo] * n
    if n * hi <= target:  # ... and this one: everyone at the cap
        return [hi] * n
    if not positive:  # all-zero scores: uniform
        return [target / n] * n

    # f(tau) = const + slope * tau between consecutive breakpoints.
    # Event kind 0 (enter linear regime) sorts before kind 1 (leave) at equal tau.
    events = []
    for i in positive:
        events.append((lo / s[i], 0, i))
        events.append((hi / s[i], 1, i))
    events.sort()
    const, slope = n * lo, 0.0
    tau = None
    for t, kind, i in events:
        if const + slope * t >= target and slope > 0:
            tau = (target - const) / slope
            break
        if kind == 0:
            slope += s[i]
            const -= lo
        else:
            slope -= s[i]
            const += hi
    if tau is not None:
        return [min(hi, max(lo, tau * v)) for v in s]

    # Every positive-score module sits at r_max and budget is left: no tau exists.
    x = [0.0] * n
    for i in positive:
        x[i] = hi
    rest = target - hi * len(positive)
    # Feasibility (L*r_max >= R) guarantees zero-score modules exist here and
    # that their equal share lies in [r_min, r_max].
    share = rest / len(zero)
    for i in zero:
        x[i] = min(hi, max(lo, share))
    return x


def _round_to_budget(
    x: Sequence[float], scores: Sequence[float], budget: int, r_min: int, r_max: int
) -> list[int]:
    """Phase 2: floor, then hand leftover units to the largest fractional parts."""
    n = len(x)
    ranks = []
    fracs = []
    for v in x:
        f = math.floor(v)
        frac = v - f
        if frac > 1 - _FRAC_EPS:
            f, frac = f + 1, 0.0
        elif frac < _FRAC_EPS:
            frac = 0.0
        f = min(r_max, max(r_min, int(f)))
        ranks.append(f)
        fracs.append(frac)
    left = budget - sum(ranks)
    order = sorted(range(n), key=lambda i: (-fracs[i], -float(scores[i]), i))
    # Floating-point noise can leave a unit or two more than the fractional parts
    # account for; cycling keeps the budget exact while still respecting r_max.
    while left > 0:
        progressed = False
        for i in order:
            if left == 0:
                break
            if ranks[i] < r_max:
                ranks[i] += 1
                left -= 1
                progressed = True
        if not progressed:  # pragma: no cover - excluded by feasibility check
            raise AssertionError("allocator could not place the remaining budget")
    while left < 0:  # pragma: no cover - sum of floors never exceeds the budget
        for i in reversed(order):
            if left == 0:
                break
            if ranks[i] > r_min:
                ranks[i] -= 1
                left += 1
    return ranks


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
        r_max = budget if isinstance(budget, int) and not isinstance(budget, bool) else r_min
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
