"""The allocator against a slow, obvious reference and its stated guarantees."""

from __future__ import annotations

import random

import pytest

from fimlora.waterfill import allocate_ranks, random_scores, water_fill
from tests.references import reference_allocate


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
        (dict(scores=[1.0] * 4, budget=8, r_min=0, r_max=4), "r_min", "r_min=0"),
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
