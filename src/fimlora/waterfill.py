"""Budget-constrained integer rank allocation (two-phase water-filling).

No torch (numpy only): scores in, integer ranks out.

Given scores s_m >= 0 for L modules, an integer budget R and integer bounds
0 <= r_min <= r_max:

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

With costs (a parameter budget). One unit of rank in module m costs c_m
parameters (c_m = d_in + d_out, a positive integer) and the budget B counts
parameters: the ranks must satisfy sum_m c_m r_m <= B. The continuous problem
keeps the paper's rule, rank in proportion to the score with one level tau for
every module, and puts the cost in the constraint only:

    x_m = clip(tau * s_m, r_min, r_max)   with   sum_m c_m x_m = B.

This is the maximiser of sum_m c_m s_m log(x_m) subject to sum_m c_m x_m = B
(and the bounds): a module's score is the *mean* Fisher of its LoRA-B entries
(eq. 4), a per-parameter importance, so one more unit of rank there, c_m new
parameters taken at the module's mean importance s_m, is worth c_m s_m, and
this parameter-weighted log utility gives back rank proportional to score. Why
this and not the alternative, maximise sum_m s_m log(x_m) subject to sum_m c_m
x_m = B, whose answer x_m = clip(tau * s_m / c_m, ...) makes *parameters*
proportional to the score: (1) it is the paper's rule, rank proportional to
score, whatever currency the budget is counted in; only the total moves, so a
parameter budget is a way to state the budget, not a different method, and
results obtained with a rank budget carry over; (2) the alternative would value
a unit of rank in a large module (an MLP projection, c_m about twice an
attention projection in LLaMA) the same as in a small one although it trains
c_m parameters of the same mean importance, i.e. it would cut large modules'
ranks by their cost on top of what the scores say. With equal costs c both
rules reduce to the rank rule above with R = B / c.

The budget is first reduced to what integer ranks can spend: with g the gcd of
the costs, costs c_m / g and budget floor(B / g) (the same integer problem).
When every reduced cost is 1 (equal costs) this *is* the rank problem with
R = floor(B / c), solved by the code above, so the result is exactly its
allocation. Otherwise phase 1 solves sum_m c_m clip(tau*s_m, ...) = B by the
same breakpoint sweep (slope sum_m c_m s_m over the unclipped modules), and
phase 2 is a greedy that never overspends: r_m = floor(x_m), then rounds. Each
round goes through the modules in the order of phase 2 above (largest
fractional part, then higher score, then module order) and gives one unit to
every module below r_max whose cost still fits in what is left; rounds repeat
until one gives nothing. Fractional parts are compared rounded to 9 decimals,
so that parts equal in exact arithmetic (those of 2/3 and 8/3) tie, and the
higher score goes first, despite floating-point noise. The result is maximal:
every module below r_max costs more than the budget left (with costs far
apart, what is left after the first round, less than the largest cost, can go
as several units to cheap modules: maximality asks for that). A budget above
sum_m c_m r_max is not an error (every module gets r_max); sum_m c_m r_min > B
is. r_min may be 0, with or without costs.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

import numpy as np

from .config import check_int

__all__ = ["allocate_ranks", "water_fill", "random_scores", "validate_allocation_inputs", "BudgetAboveCap"]


class BudgetAboveCap(ValueError):
    """A rank budget no allocation can spend: more than L * r_max (every module at its cap)."""

# Fractional parts closer than this to 0 or 1 are treated as exact integers so
# that floating-point noise in tau*s_m (e.g. 2.9999999999) cannot move a unit.
_FRAC_EPS = 1e-9


# Budgets and costs up to 2**53 keep every sum of c_m * r_m that the allocator forms exact in
# int64 and every cost exact in float64.
_MAX_PARAMS = 2**53


def _check_costs(costs, names: Sequence[str] | None, n: int) -> list[int]:
    """Costs in module order as Python ints; ValueError naming ``costs`` unless one positive int per module."""
    if isinstance(costs, Mapping):
        if names is None:
            raise ValueError("costs: a mapping needs the scores as a mapping with the same keys, got a sequence of "
                             f"{n} scores")
        missing = [k for k in names if k not in costs]
        known = set(names)
        extra = [k for k in costs if k not in known]
        if missing or extra:
            raise ValueError(f"costs: keys must be the scores' module names; missing {missing[:3]}"
                             f"{' ...' if len(missing) > 3 else ''}, unexpected {extra[:3]}"
                             f"{' ...' if len(extra) > 3 else ''}")
        values = [costs[k] for k in names]
    else:
        if isinstance(costs, (str, bytes)) or not isinstance(costs, (Sequence, np.ndarray)):
            raise ValueError(f"costs: must be a sequence or a mapping of positive integers, got {costs!r}")
        values = list(costs)
        if len(values) != n:
            raise ValueError(f"costs: need one cost per module, got {len(values)} costs for {n} scores")
    out = []
    for i, c in enumerate(values):
        if type(c) is not int:  # the common case skips the slower checks
            if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, np.integer)):
                label = repr(names[i]) if isinstance(costs, Mapping) else i
                raise ValueError(f"costs[{label}]: must be a positive integer (parameters per unit of rank), "
                                 f"got {c!r}")
            c = int(c)
        if not 0 < c <= _MAX_PARAMS:
            label = repr(names[i]) if isinstance(costs, Mapping) else i
            raise ValueError(f"costs[{label}]: must be in [1, 2**53], got {c!r}")
        out.append(c)
    return out


def _check_bounds(n: int, budget: int, r_min: int, r_max: int) -> None:
    if n == 0:
        raise ValueError("scores: need at least one module to allocate rank to, got 0 scores")
    for name, value in (("budget", budget), ("r_min", r_min), ("r_max", r_max)):
        check_int(name, value)
    if r_min < 0:
        raise ValueError(f"r_min: must be >= 0, got r_min={r_min}")
    if r_max < r_min:
        raise ValueError(f"r_max: must be >= r_min, got r_max={r_max} < r_min={r_min}")


def _check_budget_and_scores(
    values: Sequence[float], budget: int, r_min: int, r_max: int, cost_values: list[int] | None
) -> None:
    n = len(values)
    if cost_values is not None:
        if budget > _MAX_PARAMS:
            raise ValueError(f"budget: must be <= 2**53 parameters, got budget={budget}")
        total = sum(cost_values)
        if r_min * total > budget:
            raise ValueError(
                f"budget: infeasible, sum of r_min*costs > budget: r_min={r_min} * sum(costs)={total} "
                f"= {r_min * total} > budget={budget}; lower r_min or raise the budget"
            )
    elif n * r_min > budget:
        raise ValueError(
            f"budget: infeasible, L*r_min > budget: {n} modules * r_min={r_min} = {n * r_min} "
            f"> budget={budget}; lower r_min or raise the budget"
        )
    elif n * r_max < budget:
        raise BudgetAboveCap(
            f"budget: infeasible, L*r_max < budget: {n} modules * r_max={r_max} = {n * r_max} "
            f"< budget={budget}; raise r_max or lower the budget"
        )
    for i, s in enumerate(values):
        try:
            fs = float(s)
        except (TypeError, ValueError):
            raise ValueError(f"scores[{i}]: must be a real number, got {s!r}") from None
        if not math.isfinite(fs):
            raise ValueError(f"scores[{i}]: must be finite, got {s!r}")
        if fs < 0:
            raise ValueError(f"scores[{i}]: must be >= 0, got {s!r}")


def validate_allocation_inputs(
    scores: Mapping[str, float] | Sequence[float],
    budget: int,
    r_min: int,
    r_max: int,
    costs: Mapping[str, int] | Sequence[int] | None = None,
) -> None:
    """Raise ValueError naming the field, the rule and the values if infeasible.

    Without ``costs`` the budget is in units of rank (L*r_min <= budget <= L*r_max); with
    ``costs`` it is in parameters (sum_m c_m * r_min <= budget). r_min may be 0 (a module allocated 0
    loses its adapter). A budget above L*r_max raises :class:`BudgetAboveCap`, a ValueError callers can tell
    apart by type (the cap may come from a serving limit they want to name).
    """
    names = list(scores.keys()) if isinstance(scores, Mapping) else None
    values = [scores[k] for k in names] if names is not None else scores
    _check_bounds(len(values), budget, r_min, r_max)
    cost_values = _check_costs(costs, names, len(values)) if costs is not None else None
    _check_budget_and_scores(values, budget, r_min, r_max, cost_values)


def water_fill(
    scores: Sequence[float], budget: int, r_min: int, r_max: int, costs: Sequence[int] | None = None
) -> list[float]:
    """Phase 1: continuous levels x_m = clip(tau*s_m, r_min, r_max) with sum x_m = budget.

    With ``costs``: the same levels with sum_m c_m x_m = budget, or every x_m = r_max when
    sum_m c_m r_max <= budget.
    Inputs must already be valid (see :func:`validate_allocation_inputs`).
    O(L log L), vectorised with numpy (100k modules well under a second).
    """
    # A rank budget is a parameter budget in which every unit costs 1: one sweep serves both, and with
    # unit costs every sum it forms is the same float sum as the rank-only formula's.
    unit = costs if costs is not None else np.ones(len(scores), dtype=np.int64)
    return _water_fill_costs(scores, unit, budget, r_min, r_max).tolist()


def _floors_and_order(x: Sequence[float], scores: Sequence[float], r_min: int, r_max: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Phase 2's start: integer floors of the levels (within bounds) and the order leftover units go in.

    The order is largest fractional part first, then higher score, then module order.
    """
    xv = np.asarray(x, dtype=np.float64)
    sv = np.asarray(scores, dtype=np.float64)
    floors = np.floor(xv)
    fracs = xv - floors
    up = fracs > 1 - _FRAC_EPS  # 2.9999999999 is 3
    floors[up] += 1
    fracs[up] = 0.0
    fracs[fracs < _FRAC_EPS] = 0.0
    # Parts equal in exact arithmetic (1/3 of 4/3 and of 16/3) differ in the last bits; rounded, they tie
    # and the documented rule (higher score first) decides, not float noise.
    fracs = np.round(fracs, 9)
    ranks = np.clip(floors, r_min, r_max).astype(np.int64)
    return ranks, np.lexsort((np.arange(xv.size), -sv, -fracs))


def _round_to_budget(
    x: Sequence[float], scores: Sequence[float], budget: int, r_min: int, r_max: int
) -> list[int]:
    """Phase 2: floor, then hand leftover units to the largest fractional parts."""
    ranks, order = _floors_and_order(x, scores, r_min, r_max)
    left = int(budget - ranks.sum())
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


def _water_fill_costs(scores: Sequence[float], costs: Sequence[int], budget: int, r_min: int, r_max: int
                      ) -> np.ndarray:
    """Phase 1 with costs: x_m = clip(tau*s_m, r_min, r_max) with sum_m c_m x_m = budget (same sweep)."""
    s = np.asarray(scores, dtype=np.float64)
    c = np.asarray(costs, dtype=np.float64)  # exact: costs <= 2**53
    n = s.size
    lo, hi = float(r_min), float(r_max)
    target = float(budget)
    positive = s > 0
    # The two ends are decided on exact integers, not on float sums.
    total = sum(int(v) for v in costs)
    if r_min * total >= budget:  # feasibility makes this equality: everyone at the floor
        return np.full(n, lo)
    if r_max * total <= budget:  # everyone at the cap (the budget cannot all be spent)
        return np.full(n, hi)
    if not positive.any():  # all-zero scores: the same rank everywhere
        return np.full(n, min(hi, max(lo, target / c.sum())))

    sp = s[positive]
    bps = np.unique(np.concatenate([lo / sp, hi / sp]))
    cs = c * s

    def f(t: float) -> float:
        return float((c * np.clip(t * s, lo, hi)).sum())

    if f(bps[-1]) >= target:
        a, b = 0, bps.size - 1  # f(bps[0]) = r_min * sum(c) < target <= f(bps[b])
        while a + 1 < b:
            mid = (a + b) // 2
            a, b = (mid, b) if f(bps[mid]) < target else (a, mid)
        level = 0.5 * (bps[a] + bps[b]) * s
        linear = positive & (level > lo) & (level < hi)
        capped = level >= hi
        slope = float(cs[linear].sum())
        offset = lo * float(c[~linear & ~capped].sum()) + hi * float(c[capped].sum())
        tau = (target - offset) / slope
        return np.clip(tau * s, lo, hi)

    # Every positive-score module at r_max with budget left: the zero-score modules (there are
    # some, since sum_m c_m r_max > budget) share the rest at one common rank.
    x = np.where(positive, hi, 0.0)
    share = (target - hi * float(c[positive].sum())) / float(c[~positive].sum())
    x[~positive] = min(hi, max(lo, share))
    return x


def _fill_rounds(ranks: np.ndarray, order: np.ndarray, c: np.ndarray, left: int, r_max: int) -> int:
    """Rounds over ``order``: one unit to every module below r_max whose cost fits what is left.

    Repeats until a round gives nothing; returns what is left (then less than the cost of every
    module below r_max). Vectorised: rounds in which every candidate fits are done several at a
    time, and a round in which some do not is a few cumulative sums (each drops a module for good).
    """
    cand = order[(ranks[order] < r_max) & (c[order] <= left)]
    while cand.size:
        cc = c[cand]
        total = int(cc.sum())
        if total <= left:  # every candidate fits: q whole rounds at once
            q = min(left // total, int((r_max - ranks[cand]).min()))
            ranks[cand] += q
            left -= q * total
        else:  # one round that runs out: give in order, skipping modules that no longer fit
            idx = np.arange(cand.size)
            while idx.size:
                spent = np.cumsum(cc[idx])
                k = int(np.searchsorted(spent, left, side="right"))  # the first k fit in turn
                ranks[cand[idx[:k]]] += 1
                if k:
                    left -= int(spent[k - 1])
                rest = idx[k + 1 :]  # idx[k] does not fit now, nor later (left only shrinks)
                idx = rest[cc[rest] <= left]
        cand = cand[(ranks[cand] < r_max) & (c[cand] <= left)]
    return left


def _round_with_costs(
    x: Sequence[float], scores: Sequence[float], costs: Sequence[int], budget: int, r_min: int, r_max: int
) -> list[int]:
    """Phase 2 with costs: floors, then rounds of single units in phase-2 order while they fit."""
    xv = np.asarray(x, dtype=np.float64)
    c = np.asarray(costs, dtype=np.int64)
    ranks, order = _floors_and_order(xv, scores, r_min, r_max)
    left = budget - int((c * ranks).sum())
    if left < 0:  # rounding 2.9999999999 up spent more than the budget: plain floors instead
        ranks = np.clip(np.floor(xv), r_min, r_max).astype(np.int64)
        left = budget - int((c * ranks).sum())
        for i in order[::-1].tolist():  # still over (float noise): take units back, last in order first
            if left >= 0:
                break
            take = min(int(ranks[i]) - r_min, -(left // int(c[i])))  # -(left // c) = ceil(-left / c)
            ranks[i] -= take
            left += take * int(c[i])
    _fill_rounds(ranks, order, c, left, r_max)
    return ranks.tolist()


def allocate_ranks(
    scores: Mapping[str, float] | Sequence[float],
    budget: int,
    r_min: int = 1,
    r_max: int | None = None,
    costs: Mapping[str, int] | Sequence[int] | None = None,
) -> dict[str, int] | list[int]:
    """Split an integer rank ``budget`` over modules in proportion to their scores.

    Args:
        scores: per-module scores s_m >= 0, a mapping name -> score (order of the
            mapping is the module order used for tie-breaking) or a sequence.
        budget: total rank R; the result sums to exactly R. With ``costs``, a
            parameter budget B instead (see below).
        r_min, r_max: integer bounds for every module, 0 <= r_min <= r_max.
            ``r_max=None`` means no upper bound other than the budget.
        costs: optional, one positive integer per module, the parameters one unit
            of rank costs there (d_in + d_out for a LoRA pair): a sequence in module
            order, or a mapping with the same keys as ``scores``.

    Returns:
        ranks in the same form as ``scores`` (dict or list).

    Guarantees: sum == budget; r_min <= r_m <= r_max; s_a > s_b implies
    r_a >= r_b; deterministic; equal (or all-zero) scores give uniform ranks.
    Raises ValueError for infeasible input before doing anything.

    With costs: sum_m c_m r_m <= budget, and no module below r_max could take one
    more unit within it (budget - spent < c_m for each of them); r_min <= r_m <=
    r_max; among modules of equal cost a higher score never gets a lower rank;
    equal costs c and a budget of R * c give exactly the allocation of R without
    costs. ``sum_m c_m r_min > budget`` is a ValueError; a budget above
    ``sum_m c_m r_max`` gives every module r_max. The continuous problem and why
    it is this one: see the module docstring.
    """
    if isinstance(scores, Mapping):
        names = list(scores.keys())
        values = [scores[k] for k in names]
    else:
        names = None
        values = list(scores)
    if costs is None:
        if r_max is None:
            check_int("budget", budget)
            r_max = budget
        validate_allocation_inputs(values, budget, r_min, r_max)
        values = [float(v) for v in values]
        x = water_fill(values, budget, r_min, r_max)
        ranks = _round_to_budget(x, values, budget, r_min, r_max)
    else:
        check_int("budget", budget)
        cost_values = _check_costs(costs, names, len(values))
        if r_max is None:  # the most units any one module could pay for
            r_max = budget // min(cost_values) if cost_values and budget >= 0 else budget
            if isinstance(r_min, int) and not isinstance(r_min, bool):
                r_max = max(r_max, r_min)  # so that an infeasible budget is reported as such
        _check_bounds(len(values), budget, r_min, r_max)
        _check_budget_and_scores(values, budget, r_min, r_max, cost_values)
        ranks = _allocate_with_costs([float(v) for v in values], cost_values, budget, r_min, r_max)
    if names is None:
        return ranks
    return dict(zip(names, ranks))


def _allocate_with_costs(values: list[float], costs: list[int], budget: int, r_min: int, r_max: int) -> list[int]:
    """Validated inputs: reduce by the gcd of the costs, then the rank problem or the cost greedy."""
    n = len(values)
    g = math.gcd(*costs)
    units = [c // g for c in costs]
    spendable = budget // g  # same integer problem: sum_m (c_m/g) r_m <= floor(budget/g)
    if r_max * sum(units) <= spendable:
        return [r_max] * n
    # x_m <= spendable <= 2**53, so a larger r_max never binds; capping it keeps the int64 arithmetic exact.
    r_max = min(r_max, 2 * _MAX_PARAMS)
    if all(u == 1 for u in units):  # equal costs: exactly the rank problem with R = floor(budget/c)
        x = water_fill(values, spendable, r_min, r_max)
        return _round_to_budget(x, values, spendable, r_min, r_max)
    x = _water_fill_costs(values, units, spendable, r_min, r_max)
    return _round_with_costs(x, values, units, spendable, r_min, r_max)


def random_scores(names: Sequence[str], seed: int) -> dict[str, float]:
    """Scores drawn uniformly from [0, 1) by a seeded generator (the random-rank baseline).

    Fed through :func:`allocate_ranks`, they give a random pattern with exactly
    the same budget and bounds as FIM-LoRA.
    """
    rng = random.Random(seed)
    return {name: rng.random() for name in names}
