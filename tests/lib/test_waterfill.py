"""The allocator against a slow, obvious reference and its stated guarantees."""

from __future__ import annotations

import math
import random
import time

import numpy as np
import pytest

from fimlora.waterfill import _round_with_costs, allocate_ranks, random_scores, water_fill
from tests.references import reference_allocate, reference_allocate_costs


@pytest.mark.parametrize("seed", range(40))
def test_matches_reference(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 60)
    r = rng.choice([1, 2, 4, 8, 16])
    r_min = rng.randint(1, r)
    r_max = rng.randint(r, 3 * r)
    scores = [rng.expovariate(1.0) ** rng.choice([1, 3]) for _ in range(n)]
    if seed % 4 == 0:
        for i in rng.sample(range(n), k=n // 3):
            scores[i] = 0.0
    budget = n * r
    got = allocate_ranks(scores, budget, r_min, r_max)
    assert got == reference_allocate(scores, budget, r_min, r_max)


@pytest.mark.parametrize("seed", range(30))
def test_guarantees(seed):
    rng = random.Random(1000 + seed)
    n = rng.randint(1, 200)
    r_min = rng.randint(1, 4)
    r_max = rng.randint(r_min, 40)
    budget = rng.randint(n * r_min, n * r_max)
    scores = [rng.choice([0.0, rng.random(), rng.random() * 1e-8, rng.random() * 1e6]) for _ in range(n)]
    ranks = allocate_ranks(scores, budget, r_min, r_max)
    assert sum(ranks) == budget
    assert all(r_min <= r <= r_max for r in ranks)
    for a in range(n):
        for b in range(n):
            if scores[a] > scores[b]:
                assert ranks[a] >= ranks[b], (a, b, scores[a], scores[b], ranks[a], ranks[b])
    assert allocate_ranks(scores, budget, r_min, r_max) == ranks  # deterministic


@pytest.mark.parametrize("value", [0.0, 1.0, 3.7e-9])
def test_equal_scores_give_uniform(value):
    assert allocate_ranks([value] * 12, 12 * 8, 1, 16) == [8] * 12


def test_unequal_budget_split_of_equal_scores_goes_to_first_modules():
    # 10 units over 4 equal modules: 2 each, leftover 2 to the first two (module order)
    assert allocate_ranks([1.0] * 4, 10, 1, 5) == [3, 3, 2, 2]


@pytest.mark.parametrize(
    "scores, budget, r_max, expected",
    [
        # x = [1.5, 4.5]: equal fractional parts, the one leftover unit goes to the higher score
        ([1.0, 3.0], 6, 8, [1, 5]),
        # same with the higher score first in module order: score, not position, decides
        ([3.0, 1.0], 6, 8, [5, 1]),
        # x = [1.5, 4.5, 7.5, 10.5]: 2 leftover units to the two highest scores
        ([1.0, 3.0, 5.0, 7.0], 24, 16, [1, 4, 8, 11]),
        # x = [1.4, 1.4, 4.2]: fractional part first (0.4 beats 0.2 despite the lower score), then module order
        ([1.0, 1.0, 3.0], 7, 8, [2, 1, 4]),
        # x = [1.5, 1.5, 1.5, 4.5]: four-way tie, 2 units: the higher score, then the first in module order
        ([1.0, 1.0, 1.0, 3.0], 9, 8, [2, 1, 1, 5]),
    ],
)
def test_leftover_units_tie_break_higher_score_then_module_order(scores, budget, r_max, expected):
    assert allocate_ranks(scores, budget, 1, r_max) == expected
    assert reference_allocate(scores, budget, 1, r_max) == expected


def test_proportional_when_unconstrained():
    assert allocate_ranks([1.0, 2.0, 3.0, 2.0], 16, 1, 16) == [2, 4, 6, 4]


def test_clipping_redistributes_to_others():
    # the big module is capped at 8; the remaining 8 units are shared 1:1
    assert allocate_ranks([100.0, 1.0, 1.0], 16, 1, 8) == [8, 4, 4]


def test_zero_score_modules_share_rest_when_positive_modules_saturate():
    x = water_fill([5.0, 0.0, 0.0, 3.0], 20, 1, 8)
    assert x == [8.0, 2.0, 2.0, 8.0]
    assert allocate_ranks([5.0, 0.0, 0.0, 3.0], 20, 1, 8) == [8, 2, 2, 8]
    assert allocate_ranks([5.0, 0.0, 0.0], 13, 1, 8) == [8, 3, 2]


def test_mapping_in_mapping_out_keeps_order():
    scores = {"b": 1.0, "a": 3.0}
    out = allocate_ranks(scores, 8, 1, 8)
    assert list(out) == ["b", "a"] and out == {"b": 2, "a": 6}


@pytest.mark.parametrize(
    "kwargs, field, needle",
    [
        (dict(scores=[1.0] * 4, budget=3, r_min=1, r_max=4), "budget", "L*r_min > budget"),
        (dict(scores=[1.0] * 4, budget=40, r_min=1, r_max=4), "budget", "L*r_max < budget"),
        (dict(scores=[1.0] * 4, budget=8, r_min=-1, r_max=4), "r_min", "r_min=-1"),
        (dict(scores=[1.0, -1.0], budget=4, r_min=1, r_max=4), "scores[1]", "-1.0"),
        (dict(scores=[1.0, float("nan")], budget=4, r_min=1, r_max=4), "scores[1]", "nan"),
        (dict(scores=[1.0, float("inf")], budget=4, r_min=1, r_max=4), "scores[1]", "inf"),
        (dict(scores=[1.0], budget=4, r_min=3, r_max=2), "r_max", "r_max=2 < r_min=3"),
        (dict(scores=[], budget=4, r_min=1, r_max=2), "scores", "0 scores"),
        (dict(scores=[1.0], budget=2.5, r_min=1, r_max=4), "budget", "2.5"),
    ],
)
def test_infeasible_input_names_field_rule_and_values(kwargs, field, needle):
    with pytest.raises(ValueError) as exc:
        allocate_ranks(**kwargs)
    msg = str(exc.value)
    assert msg.startswith(field + ":"), msg
    assert needle in msg, msg


def test_infeasible_message_carries_numbers():
    with pytest.raises(ValueError, match=r"224 modules \* r_min=8 = 1792 > budget=896"):
        allocate_ranks([1.0] * 224, 224 * 4, 8, 16)


def test_random_scores_seeded_and_same_budget():
    names = [f"m{i}" for i in range(30)]
    a, b, c = random_scores(names, 7), random_scores(names, 7), random_scores(names, 8)
    assert a == b and a != c
    ranks = allocate_ranks(a, 30 * 4, 1, 8)
    assert sum(ranks.values()) == 120
    assert len(set(ranks.values())) > 1


# ----------------------------------------------------------------------------- r_min = 0


@pytest.mark.parametrize("seed", range(20))
def test_r_min_zero_matches_reference(seed):
    rng = random.Random(3000 + seed)
    n = rng.randint(1, 60)
    r_max = rng.randint(1, 16)
    budget = rng.randint(0, n * r_max)
    scores = [rng.choice([0.0, rng.expovariate(1.0)]) for _ in range(n)]
    got = allocate_ranks(scores, budget, 0, r_max)
    assert got == reference_allocate(scores, budget, 0, r_max)
    assert sum(got) == budget and all(0 <= r <= r_max for r in got)


def test_r_min_zero_hand_worked():
    # tau = 1: x = [0, 0, 1, 3] exactly; the zero-score modules get nothing
    assert allocate_ranks([0.0, 0.0, 1.0, 3.0], 4, 0, 4) == [0, 0, 1, 3]
    # x = [0.5, 1.5]: one leftover unit to the higher score at equal fractional parts
    assert allocate_ranks([1.0, 3.0], 2, 0, 4) == [0, 2]
    assert allocate_ranks([1.0, 2.0], 0, 0, 4) == [0, 0]
    assert allocate_ranks([1.0, 2.0], 0, 0, 4, costs=[3, 5]) == [0, 0]


# ----------------------------------------------------------------------------- costs (a parameter budget)

REALISTIC_COSTS = [768 + 768, 768 + 3072, 4096 + 4096, 4096 + 1024, 4096 + 11008, 11008 + 4096]


def random_cost_case(rng, n_max=60):
    n = rng.randint(1, n_max)
    kind = rng.choice(["small", "realistic", "wide", "two"])
    if kind == "small":
        costs = [rng.randint(1, 12) for _ in range(n)]
    elif kind == "realistic":
        costs = [rng.choice(REALISTIC_COSTS) for _ in range(n)]
    elif kind == "wide":
        costs = [rng.choice([1, 7, 100, 1000]) for _ in range(n)]
    else:
        costs = [rng.choice([3, 5]) for _ in range(n)]
    r_min = rng.randint(0, 3)
    r_max = rng.randint(max(r_min, 1), 24)
    lo, hi = r_min * sum(costs), r_max * sum(costs)
    budget = rng.randint(lo, hi + (hi - lo) // 10)  # sometimes above what r_max can spend
    scores = [rng.expovariate(1.0) ** rng.choice([1, 3]) for _ in range(n)]
    if rng.random() < 0.3:
        for i in rng.sample(range(n), k=n // 3):
            scores[i] = 0.0
    if rng.random() < 0.1:
        scores = [0.0] * n
    return scores, costs, budget, r_min, r_max


def check_cost_guarantees(scores, costs, budget, r_min, r_max, ranks):
    spent = sum(c * r for c, r in zip(costs, ranks))
    assert spent <= budget
    assert all(r_min <= r <= r_max for r in ranks)
    below = [c for c, r in zip(costs, ranks) if r < r_max]
    assert not below or budget - spent < min(below), (budget - spent, min(below))  # maximal
    n = len(scores)
    for a in range(n):
        for b in range(n):
            if costs[a] == costs[b] and scores[a] > scores[b]:
                assert ranks[a] >= ranks[b], (a, b, scores[a], scores[b], ranks[a], ranks[b])


@pytest.mark.parametrize("seed", range(150))
def test_costs_match_reference(seed):
    scores, costs, budget, r_min, r_max = random_cost_case(random.Random(5000 + seed))
    got = allocate_ranks(scores, budget, r_min, r_max, costs=costs)
    assert got == reference_allocate_costs(scores, costs, budget, r_min, r_max)


@pytest.mark.parametrize("seed", range(150))
def test_costs_guarantees(seed):
    rng = random.Random(7000 + seed)
    scores, costs, budget, r_min, r_max = random_cost_case(rng, n_max=200)
    if seed % 3 == 0:  # scores spanning many orders of magnitude
        scores = [rng.choice([0.0, rng.random(), rng.random() * 1e-8, rng.random() * 1e6]) for _ in scores]
    ranks = allocate_ranks(scores, budget, r_min, r_max, costs=costs)
    check_cost_guarantees(scores, costs, budget, r_min, r_max, ranks)
    assert allocate_ranks(scores, budget, r_min, r_max, costs=costs) == ranks  # deterministic


@pytest.mark.parametrize("seed", range(60))
def test_equal_costs_give_the_rank_allocation(seed):
    # the cases of test_matches_reference and test_guarantees, with every unit costing c
    rng = random.Random(seed if seed < 40 else 1000 + seed - 40)
    n = rng.randint(1, 60)
    r = rng.choice([1, 2, 4, 8, 16])
    r_min = rng.randint(0, r)
    r_max = rng.randint(r, 3 * r)
    budget = rng.randint(n * r_min, n * r_max)
    scores = [rng.choice([0.0, rng.expovariate(1.0), rng.random() * 1e-8, rng.random() * 1e6]) for _ in range(n)]
    c = rng.choice([1, 2, 3, 1536, 8192, 15104])
    want = allocate_ranks(scores, budget, r_min, r_max)
    assert allocate_ranks(scores, budget * c, r_min, r_max, costs=[c] * n) == want
    # what a unit cannot be bought with changes nothing
    assert allocate_ranks(scores, budget * c + c - 1, r_min, r_max, costs=[c] * n) == want
    names = [f"m{i}" for i in range(n)]
    assert allocate_ranks(dict(zip(names, scores)), budget * c, r_min, r_max,
                          costs=dict(zip(reversed(names), [c] * n))) == dict(zip(names, want))
    assert allocate_ranks(scores, budget * c, r_min, None, costs=[c] * n) == allocate_ranks(scores, budget, r_min)


def test_equal_costs_keep_the_tie_breaks():
    # the hand-worked tie-break cases above, every unit costing 8192 parameters
    assert allocate_ranks([1.0, 3.0], 6 * 8192, 1, 8, costs=[8192] * 2) == [1, 5]
    assert allocate_ranks([1.0, 1.0, 3.0], 7 * 8192, 1, 8, costs=[8192] * 3) == [2, 1, 4]
    assert allocate_ranks([1.0] * 4, 10 * 8192, 1, 5, costs=[8192] * 4) == [3, 3, 2, 2]


@pytest.mark.parametrize(
    "scores, costs, budget, r_min, r_max, expected",
    [
        # tau*(3*1 + 5*2 + 7*3) = 100: tau = 50/17, x = [2.94, 5.88, 8.82], floors [2, 5, 8] spend 87;
        # 13 left: module 0 (.94) takes 3, module 1 (.88) takes 5, module 2 (7 > 5) does not fit;
        # second round: module 0 takes 3 (2 left), nothing else fits. 98 spent.
        ([1.0, 2.0, 3.0], [3, 5, 7], 100, 0, 100, [4, 6, 8]),
        # same problem scaled by the gcd 4 of the costs, budget 403 -> floor(403/4) = 100
        ([1.0, 2.0, 3.0], [12, 20, 28], 403, 0, 100, [4, 6, 8]),
        # rank proportional to score whatever the cost: tau*(1*10 + 2*30) = 140 gives x = [2, 4] exactly
        ([1.0, 2.0], [10, 30], 140, 1, 8, [2, 4]),
        # x = [2.5, 5] (tau = 2.5): floors spend 2*10 + 5*30 = 170, 10 left buys module 0 one more unit
        ([1.0, 2.0], [10, 30], 180, 1, 8, [3, 5]),
        # equal scores, costs 1 and 100: x = 152/101 = 1.505 each, floors [1, 1] spend 101; module 0 then
        # takes 51 single units (module 1's 100 never fits): maximality can favour a cheap module
        ([1.0, 1.0], [1, 100], 152, 1, 64, [52, 1]),
        # module 0 capped at 4 (cost 40); tau*(1*10) = 60 - 40 for the rest: x = [4, 2, 2]
        ([100.0, 1.0, 1.0], [10, 5, 5], 60, 1, 4, [4, 2, 2]),
        # the positive module at r_max = 6 spends 8*6 = 48; the zero-score ones share the other 52 at one
        # rank: 52 / (3 + 10) = 4, x = [6, 4, 4]
        ([5.0, 0.0, 0.0], [8, 3, 10], 100, 1, 6, [6, 4, 4]),
        # budget above sum c_m r_max = 5*(3+5) = 40: every module at r_max
        ([1.0, 2.0], [3, 5], 1000, 1, 5, [5, 5]),
        # budget = sum c_m r_min exactly: every module at r_min
        ([1.0, 2.0], [3, 5], 16, 2, 5, [2, 2]),
        # all-zero scores: one common rank 50 / (2 + 3) = 10
        ([0.0, 0.0], [2, 3], 50, 1, 16, [10, 10]),
        # At the budget's edges. Equal scores, costs 3, 5, 4: x = 20/12 = 1.67 each, floors spend 12; the 8 left
        # go in module order and modules 0 and 1 use them up exactly (3 + 5 = 8): the last unit that fits is given
        ([1.0, 1.0, 1.0], [3, 5, 4], 20, 0, 5, [2, 2, 1]),
        # one parameter less: 7 left after the floors; module 0 takes 3, module 1 (5 > 4) cannot, module 2 takes
        # exactly the 4 left
        ([1.0, 1.0, 1.0], [3, 5, 4], 19, 0, 5, [2, 1, 2]),
        # sum_m c_m r_max = 2*3 + 3*3 = 15: at 15 every module is at r_max, one parameter less is not: module 0
        # is capped at 3 and x_1 = (14 - 6) / 3 = 2.67, floor 2; the 2 left cannot buy module 1's 3
        ([2.0, 1.0], [2, 3], 15, 1, 3, [3, 3]),
        ([2.0, 1.0], [2, 3], 14, 1, 3, [3, 2]),
        # sum_m c_m r_min = 5: at 6, tau = 0.75 gives x = [1.5, 1], floors spend 5 and the 1 left buys nothing;
        # at 7, tau = 1 gives x = [2, 1] exactly
        ([2.0, 1.0], [2, 3], 5, 1, 3, [1, 1]),
        ([2.0, 1.0], [2, 3], 6, 1, 3, [1, 1]),
        ([2.0, 1.0], [2, 3], 7, 1, 3, [2, 1]),
    ],
)
def test_costs_hand_worked(scores, costs, budget, r_min, r_max, expected):
    got = allocate_ranks(scores, budget, r_min, r_max, costs=costs)
    assert got == expected
    assert reference_allocate_costs(scores, costs, budget, r_min, r_max) == expected
    check_cost_guarantees(scores, costs, budget, r_min, r_max, got)


def test_costs_water_fill_levels():
    # x_m = clip(tau*s_m) with sum c_m x_m = budget; x stays proportional to s, not to s / c
    assert water_fill([1.0, 2.0], 140, 1, 8, costs=[10, 30]) == [2.0, 4.0]
    assert water_fill([5.0, 0.0, 0.0], 100, 1, 6, costs=[8, 3, 10]) == [6.0, 4.0, 4.0]
    x = water_fill([1.0, 2.0, 3.0], 100, 0, 100, costs=[3, 5, 7])
    assert x == pytest.approx([50 / 17, 100 / 17, 150 / 17], rel=1e-12)
    assert sum(c * v for c, v in zip([3, 5, 7], x)) == pytest.approx(100, rel=1e-12)


def test_costs_mapping_in_mapping_out_keeps_order():
    out = allocate_ranks({"b": 1.0, "a": 2.0}, 140, 1, 8, costs={"a": 30, "b": 10})
    assert list(out) == ["b", "a"] and out == {"b": 2, "a": 4}
    # a sequence of costs is in the scores' module order
    assert allocate_ranks({"b": 1.0, "a": 2.0}, 140, 1, 8, costs=[10, 30]) == {"b": 2, "a": 4}
    assert allocate_ranks([1.0, 2.0], 140, 1, 8, costs=np.array([10, 30])) == [2, 4]


def test_costs_r_max_none_is_bounded_by_the_budget_only():
    # one module: as many units as the budget buys
    assert allocate_ranks([1.0], 100, 1, None, costs=[7]) == [14]
    ranks = allocate_ranks([1.0, 50.0], 100, 1, None, costs=[7, 3])
    check_cost_guarantees([1.0, 50.0], [7, 3], 100, 1, 100 // 3, ranks)
    assert ranks == [1, 31]


def test_costs_rounding_never_overspends():
    # 2.9999999995 is taken as 3 (the rounding rule), but 3 units would overspend: plain floors instead
    assert _round_with_costs([2.9999999995, 1.0], [1.0, 1.0], [2, 3], 7, 1, 8) == [2, 1]
    # floors above the budget (x itself off by float noise): units come back, last in phase-2 order first
    # (2 over: module 1, last, gives its one unit above r_min back; 1 left buys nothing)
    assert _round_with_costs([3.0, 2.0], [2.0, 1.0], [2, 3], 10, 1, 8) == [3, 1]
    # (5 over: module 1 gives back 1 unit (3), module 0 then 1 unit (2))
    assert _round_with_costs([3.0, 2.0], [2.0, 1.0], [2, 3], 7, 1, 8) == [2, 1]


@pytest.mark.parametrize(
    "kwargs, field, needle",
    [
        (dict(costs=[3, 5], budget=15), "budget", "r_min=2 * sum(costs)=8 = 16 > budget=15"),
        (dict(costs=[3]), "costs", "1 costs for 2 scores"),
        (dict(costs=[3, 5, 7]), "costs", "3 costs for 2 scores"),
        (dict(costs=[3, 0]), "costs[1]", "0"),
        (dict(costs=[-3, 5]), "costs[0]", "-3"),
        (dict(costs=[3, 2.5]), "costs[1]", "2.5"),
        (dict(costs=[3.0, 5]), "costs[0]", "3.0"),
        (dict(costs=[True, 5]), "costs[0]", "True"),
        (dict(costs=[3, np.float64(5)]), "costs[1]", "5"),
        (dict(costs=[3, 2**60]), "costs[1]", "2**53"),
        (dict(costs="35"), "costs", "'35'"),
        (dict(costs=7), "costs", "7"),
        (dict(costs={"a": 3, "b": 5}), "costs", "mapping"),
        (dict(costs=[3, 5], budget=2.0**60), "budget", "integer"),
        (dict(costs=[3, 5], budget=2**60), "budget", "2**53"),
        (dict(costs=[3, 5], r_min=-1), "r_min", "r_min=-1"),
        (dict(costs=[3, 5], r_min=3, r_max=2), "r_max", "r_max=2 < r_min=3"),
        (dict(costs=[3, 5], scores=[1.0, -1.0]), "scores[1]", "-1.0"),
    ],
)
def test_costs_invalid_input_names_field_rule_and_values(kwargs, field, needle):
    args = dict(scores=[1.0, 2.0], budget=100, r_min=2, r_max=8)
    args.update(kwargs)
    with pytest.raises(ValueError) as exc:
        allocate_ranks(**args)
    msg = str(exc.value)
    assert msg.startswith(field + ":"), msg
    assert needle in msg, msg


@pytest.mark.parametrize(
    "costs, needle",
    [
        ({"a": 3}, "missing ['b'], unexpected []"),
        ({"a": 3, "b": 5, "c": 7}, "missing [], unexpected ['c']"),
        ({"a": 3, "B": 5}, "missing ['b'], unexpected ['B']"),
        ({"a": 3, "b": 0}, "costs['b']: must be in [1, 2**53], got 0"),
        ({"a": 3, "b": 5.0}, "costs['b']: must be a positive integer"),
    ],
)
def test_costs_mapping_keys_must_match(costs, needle):
    with pytest.raises(ValueError) as exc:
        allocate_ranks({"a": 1.0, "b": 2.0}, 100, 1, 8, costs=costs)
    assert str(exc.value).startswith("costs"), str(exc.value)
    assert needle in str(exc.value), str(exc.value)


def test_costs_infeasible_message_carries_numbers():
    with pytest.raises(ValueError, match=r"budget: infeasible, sum of r_min\*costs > budget: r_min=1 \* "
                                         r"sum\(costs\)=1792 = 1792 > budget=1000"):
        allocate_ranks([1.0] * 224, 1000, 1, 16, costs=[8] * 224)


@pytest.mark.parametrize("n", [100, 1_000, 10_000, 100_000])
def test_costs_many_modules_fast(n):
    rng = np.random.default_rng(n)
    scores = (rng.exponential(size=n) ** 3).tolist()
    scores[::7] = [0.0] * len(scores[::7])
    costs = rng.choice(REALISTIC_COSTS, size=n).tolist()
    budget = 8 * sum(costs) + 12345
    t0 = time.perf_counter()
    ranks = allocate_ranks(scores, budget, 1, 32, costs=costs)
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0, elapsed
    spent = sum(c * r for c, r in zip(costs, ranks))
    below = [c for c, r in zip(costs, ranks) if r < 32]
    assert spent <= budget and budget - spent < min(below)
    assert math.isclose(spent, budget, rel_tol=1e-3)


def test_exact_ties_in_fractional_parts_go_to_the_higher_score_despite_float_noise():
    # x = (4, 4/3, 4, 16/3, 4/3): three parts of 1/3 that differ only in float noise; the score-4 module wins.
    assert allocate_ranks([3.0, 1.0, 3.0, 4.0, 1.0], 16, 1, 6) == [4, 1, 4, 6, 1]
