"""Budgets in parameters (budget_unit="params", budget_fraction) and a vLLM max_lora_rank cap (issue 13, 2 and 4)."""

from __future__ import annotations

import json

import pytest

import fimlora
from fimlora import FimConfig, lora_modules
from fimlora.allocation import RankAllocation
from fimlora.api import allocation_from_scores, compute_allocation, random_allocation
from tests.references import lm_batches, lora_llama


def uniform_params(model):
    return sum(i.r * (i.in_features + i.out_features) for i in lora_modules(model))


def skewed_scores(model):
    # Big scores on the small attention modules: a params budget must still not overspend.
    return {i.name: float(k + 1) ** 2 for k, i in enumerate(lora_modules(model))}


def test_config_validates_new_fields():
    with pytest.raises(ValueError, match=r"budget_unit: must be one of \['rank', 'params'\], got 'tokens'"):
        FimConfig(budget_unit="tokens")
    with pytest.raises(ValueError, match=r"budget_fraction: must be in \(0, 1\], got 1.5"):
        FimConfig(budget_fraction=1.5)
    with pytest.raises(ValueError, match="budget_fraction: must be > 0"):
        FimConfig(budget_fraction=0.0)
    with pytest.raises(ValueError, match="budget, budget_fraction: give at most one, got budget=10"):
        FimConfig(budget=10, budget_fraction=0.5)
    with pytest.raises(ValueError, match=r"max_lora_rank: must be one of \[1, 8, 16, .*got 12"):
        FimConfig(max_lora_rank=12)
    with pytest.raises(ValueError, match="r_max: must be <= max_lora_rank.*r_max=32 > max_lora_rank=16"):
        FimConfig(max_lora_rank=16, r_max=32)
    assert FimConfig().budget_unit == "rank" and FimConfig().max_lora_rank is None


def test_params_default_budget_is_uniform_size_and_spent_maximally():
    model = lora_llama(r=4)
    total = uniform_params(model)
    alloc = allocation_from_scores(model, skewed_scores(model), FimConfig(budget_unit="params"))
    assert alloc.budget_unit == "params" and alloc.budget == total
    costs = {i.name: i.in_features + i.out_features for i in lora_modules(model)}
    assert alloc.costs == costs
    spent = sum(alloc.ranks[n] * c for n, c in costs.items())
    assert alloc.params_spent == spent == alloc.trainable_lora_params() <= total
    # Maximal: no module below r_max could take one more unit within the budget.
    assert all(total - spent < costs[n] for n, r in alloc.ranks.items() if r < alloc.r_max)
    # The rank-unit allocation of the same scores sums ranks, not parameters: different here.
    by_rank = allocation_from_scores(model, skewed_scores(model))
    assert sum(by_rank.ranks.values()) == by_rank.budget == 56 and by_rank.params_spent > total


def test_rank_unit_unchanged_and_records_params():
    model = lora_llama(r=4)
    alloc = random_allocation(model, 0)
    assert alloc.budget_unit == "rank" and sum(alloc.ranks.values()) == alloc.budget == 56
    assert alloc.params_spent == alloc.trainable_lora_params()
    assert alloc.settings["budget_unit"] == "rank" and alloc.settings["max_lora_rank"] is None


def test_fim_at_half_the_parameters():
    model = lora_llama(r=4)
    total = uniform_params(model)
    alloc = compute_allocation(model, lm_batches(), FimConfig(budget_unit="params", budget_fraction=0.5,
                                                              n_batches=2, progress=False))
    assert alloc.budget == total // 2 and alloc.params_spent <= total // 2
    assert all(alloc.budget - alloc.params_spent < alloc.costs[n]
               for n, r in alloc.ranks.items() if r < alloc.r_max)


def test_budget_fraction_in_rank_units():
    model = lora_llama(r=4)
    alloc = random_allocation(model, 0, FimConfig(budget_fraction=0.5))
    assert alloc.budget == 28 and sum(alloc.ranks.values()) == 28


def test_apply_fim_ranks_with_params_budget_resizes_to_the_spent_size():
    model = lora_llama(r=4)
    total = uniform_params(model)
    alloc = fimlora.apply_fim_ranks(model, lm_batches(), n_batches=2, budget=total // 2, budget_unit="params",
                                    progress=False)
    trainable = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert trainable == alloc.params_spent <= total // 2


def test_params_budget_too_small_names_it():
    model = lora_llama(r=4)
    with pytest.raises(ValueError, match="budget: infeasible, sum of r_min\\*costs > budget"):
        random_allocation(model, 0, FimConfig(budget_unit="params", budget=100))


def test_json_round_trip_keeps_unit_costs_and_params(tmp_path):
    model = lora_llama(r=4)
    alloc = allocation_from_scores(model, skewed_scores(model), FimConfig(budget_unit="params", budget_fraction=0.5))
    back = RankAllocation.from_json(alloc.to_json(tmp_path / "m.json"))
    assert back == alloc
    assert (back.budget_unit, back.costs, back.params_spent) == (alloc.budget_unit, alloc.costs, alloc.params_spent)


def test_old_rank_map_without_new_fields_loads():
    model = lora_llama(r=4)
    alloc = random_allocation(model, 0)
    d = json.loads(alloc.to_json())
    for key in ("budget_unit", "costs", "params_spent"):
        del d[key]
    back = RankAllocation.from_dict(d)
    assert back.budget_unit == "rank"
    assert back.costs == {n: sum(s) for n, s in alloc.shapes.items()}
    assert back.params_spent == alloc.params_spent


def test_allocation_validation_by_unit():
    model = lora_llama(r=4)
    d = random_allocation(model, 0, FimConfig(budget_unit="params", budget_fraction=0.5)).to_dict()
    d.pop("format_version"), d.pop("module_order")
    d["budget"] = d["params_spent"] - 1
    with pytest.raises(ValueError, match="ranks: sum_m ranks\\[m\\] \\* costs\\[m\\] must be <= budget"):
        RankAllocation(**d)
    d["budget"] += 1
    d["params_spent"] += 1
    with pytest.raises(ValueError, match="params_spent: must equal"):
        RankAllocation(**d)
    d["params_spent"] = None
    d["budget_unit"] = "rank"
    with pytest.raises(ValueError, match="ranks: must sum to budget"):
        RankAllocation(**d)
    d["budget_unit"] = "bytes"
    with pytest.raises(ValueError, match="budget_unit: must be one of"):
        RankAllocation(**d)


def test_max_lora_rank_caps_ranks():
    model = lora_llama(r=8)
    free = allocation_from_scores(model, skewed_scores(model))
    assert max(free.ranks.values()) > 8  # without the cap r_max is 2r = 16 and used
    capped = allocation_from_scores(model, skewed_scores(model), FimConfig(max_lora_rank=8))
    assert capped.r_max == 8 and max(capped.ranks.values()) == 8
    assert sum(capped.ranks.values()) == capped.budget == 112


def test_max_lora_rank_keeps_a_lower_explicit_r_max():
    model = lora_llama(r=8)
    alloc = allocation_from_scores(model, skewed_scores(model), FimConfig(max_lora_rank=16, r_max=12))
    assert alloc.r_max == 12 and max(alloc.ranks.values()) == 12


def test_max_lora_rank_infeasible_budget_says_why():
    model = lora_llama(r=8)
    with pytest.raises(ValueError, match="L\\*r_max < budget.*capped by max_lora_rank=1"):
        random_allocation(model, 0, FimConfig(max_lora_rank=1))


def test_rank_table_shows_budget_unit_and_params_spent():
    from fimlora.rankmap import format_rank_table

    model = lora_llama(r=4)
    by_params = random_allocation(model, 0, FimConfig(budget_unit="params", budget_fraction=0.5))
    last = format_rank_table(by_params).splitlines()[-1]
    assert last.startswith(f"budget {by_params.budget:,} params over 14 modules")
    assert last.endswith(f"LoRA params spent {by_params.params_spent:,}")
    by_rank = random_allocation(model, 0)
    assert format_rank_table(by_rank).splitlines()[-1].startswith("budget 56 ranks over 14 modules")


def test_plot_title_shows_budget_unit(tmp_path):
    from fimlora.rankmap import plot_rank_map

    pytest.importorskip("matplotlib")
    model = lora_llama(r=4)
    alloc = random_allocation(model, 0, FimConfig(budget_unit="params", budget_fraction=0.5))
    svg = plot_rank_map(alloc, tmp_path / "m.svg").read_text()
    assert f"budget {alloc.budget:,} params, {alloc.params_spent:,} params spent" in svg


def test_settings_by_name_through_every_entry_point():
    model = lora_llama(r=8)
    scores = skewed_scores(model)
    by_name = allocation_from_scores(model, scores, budget_unit="params", budget_fraction=0.5)
    assert by_name == allocation_from_scores(model, scores, FimConfig(budget_unit="params", budget_fraction=0.5))
    assert random_allocation(model, 0, budget_unit="params").budget_unit == "params"
    alloc = compute_allocation(model, lm_batches(), n_batches=1, progress=False, max_lora_rank=8)
    assert alloc.r_max == 8 and max(alloc.ranks.values()) <= 8
    with pytest.raises(ValueError, match="config: pass either config or the settings"):
        random_allocation(model, 0, FimConfig(), budget_unit="params")


def test_params_unit_needs_positive_costs():
    model = lora_llama(r=4)
    d = random_allocation(model, 0, budget_unit="params").to_dict()
    d.pop("format_version"), d.pop("module_order")
    first = next(iter(d["costs"]))
    d["costs"][first] = 0
    d["params_spent"] = None
    with pytest.raises(ValueError, match=f"costs\\['{first}'\\]: must be >= 1, got 0"):
        RankAllocation(**d)


# ----------------------------------------------------------------------------- issue 20 (B): a config that serves at K


def assert_serves_at(cfg: dict, k: int, alloc):
    """adapter_config: r <= K and lora_alpha / r equal to every kept module's alpha_m / r_m (default scale)."""
    assert cfg["r"] <= k
    kept = {n: r for n, r in alloc.ranks.items() if r > 0}
    assert cfg["rank_pattern"] == kept
    for name, r in kept.items():
        assert cfg["alpha_pattern"][name] / r == pytest.approx(cfg["lora_alpha"] / cfg["r"], rel=1e-12)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_max_lora_rank_writes_a_config_vllm_serves_at_k(tmp_path, use_rslora):
    import torch
    from peft import LoraConfig, PeftModel

    from tests.references import make_b_nonzero, tiny_llama

    model = lora_llama(r=16, lora_alpha=32, use_rslora=use_rslora)
    original = LoraConfig(**{k: v for k, v in model.peft_config["default"].to_dict().items()
                             if k in ("r", "lora_alpha", "target_modules", "use_rslora", "task_type")})
    alloc = fimlora.apply_fim_ranks(model, lm_batches(), n_batches=2, budget=80, max_lora_rank=8, progress=False)
    assert max(alloc.ranks.values()) <= 8
    make_b_nonzero(model, lm_batches())
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    if use_rslora:  # alpha' = alpha * sqrt(r'/r): every module's alpha_m / sqrt(r_m) equals lora_alpha / sqrt(r)
        assert cfg["r"] == 8 and cfg["lora_alpha"] == pytest.approx(32 * (8 / 16) ** 0.5)
        for name, r in alloc.ranks.items():
            assert cfg["alpha_pattern"][name] / r ** 0.5 == pytest.approx(cfg["lora_alpha"] / 8 ** 0.5)
    else:
        assert (cfg["r"], cfg["lora_alpha"]) == (8, 16)
        assert_serves_at(cfg, 8, alloc)
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    batch = lm_batches()[0]
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)
    # The config path writes the same global r and lora_alpha.
    built = fimlora.lora_config_for_allocation(alloc, original)
    assert (built.r, built.lora_alpha) == (cfg["r"], cfg["lora_alpha"])
