"""r_min = 0: a module allocated rank 0 loses its adapter, and the saved adapter says so (issue 13, 3)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora.layer import LoraLayer
from safetensors.torch import load_file

import fimlora
from fimlora import FimConfig, apply_allocation, lora_modules
from fimlora.api import allocation_from_scores
from fimlora.check import check_adapter
from fimlora.modules import base_model_of
from tests.references import lm_batches, lora_llama, make_b_nonzero, tiny_llama


def all_linear(seed=0, **kw):
    return lora_llama(seed=seed, target_modules="all-linear", **kw)


def model_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model, before):
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def lora_layer_names(model):
    return [n for n, m in base_model_of(model).named_modules() if isinstance(m, LoraLayer)]


def half_size_drops(model):
    """A half-size parameter budget with r_min=0 and scores that leave the first MLP modules at rank 0."""
    scores = {i.name: 1e-9 if ".layers.0.mlp." in i.name else 1.0 for i in lora_modules(model)}
    return allocation_from_scores(model, scores, budget_unit="params", budget_fraction=0.5, r_min=0)


def test_config_accepts_r_min_zero_only():
    assert FimConfig(r_min=0).r_min == 0
    with pytest.raises(ValueError, match="r_min: must be >= 0, got -1"):
        FimConfig(r_min=-1)


def test_dropped_modules_lose_their_layer_and_save_reload_merge_reproduce(tmp_path):
    model = all_linear()
    data = lm_batches()
    alloc = half_size_drops(model)
    dropped = [n for n, r in alloc.ranks.items() if r == 0]
    kept = [n for n, r in alloc.ranks.items() if r > 0]
    assert dropped == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    assert alloc.params_spent <= alloc.budget == sum(
        i.r * (i.in_features + i.out_features) for i in lora_modules(model)) // 2
    with torch.no_grad():
        before = model(**data[0]).logits
    apply_allocation(model, alloc)

    assert lora_layer_names(model) == kept
    for name in dropped:
        layer = base_model_of(model).get_submodule(name)
        assert type(layer) is torch.nn.Linear
    # B = 0: removing the adapter does not change the model.
    with torch.no_grad():
        torch.testing.assert_close(model(**data[0]).logits, before, rtol=0, atol=0)
    cfg = model.peft_config["default"]
    assert list(cfg.target_modules) == kept
    assert list(cfg.rank_pattern) == kept and list(cfg.alpha_pattern) == kept

    make_b_nonzero(model, data)
    with torch.no_grad():
        ref = model(**data[0]).logits
    model.save_pretrained(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == sorted(kept)
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    for name in dropped:
        assert not [k for k in tensors if f"{name}." in k], name
    assert {k.split(".lora_")[0].removeprefix("base_model.model.") for k in tensors} == set(kept)

    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a").eval()
    assert lora_layer_names(reloaded) == kept
    assert {i.name: i.r for i in lora_modules(reloaded)} == {n: alloc.ranks[n] for n in kept}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**data[0]).logits, ref, rtol=0, atol=1e-6)
    merged = reloaded.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(**data[0]).logits, ref, rtol=1e-5, atol=1e-5)

    names = [n for n, _ in tiny_llama().named_modules()]
    report = check_adapter(tmp_path / "a", names)
    assert report.ok, report.format()
    assert sorted(report.ranks) == sorted(kept)


def test_apply_fim_ranks_half_size_all_linear_drops_and_reloads(tmp_path):
    model = all_linear(seed=3, r=8)
    data = lm_batches(n_batches=2)
    full = sum(i.r * (i.in_features + i.out_features) for i in lora_modules(model))
    alloc = fimlora.apply_fim_ranks(model, data, n_batches=2, r_min=0, budget_unit="params", budget_fraction=0.5,
                                    progress=False)
    dropped = [n for n, r in alloc.ranks.items() if r == 0]
    assert dropped, "test needs a half-size FIM allocation that drops a module"
    assert alloc.params_spent <= full // 2
    kept_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert kept_params == alloc.params_spent
    make_b_nonzero(model, data)
    with torch.no_grad():
        ref = model(**data[0]).logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama(3), tmp_path).eval()
    assert lora_layer_names(reloaded) == [n for n, r in alloc.ranks.items() if r > 0]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**data[0]).logits, ref, rtol=0, atol=1e-6)


def test_dropping_every_module_is_refused_and_model_untouched():
    model = all_linear()
    alloc = half_size_drops(model)
    alloc.ranks = {n: 0 for n in alloc.ranks}
    before = model_state(model)
    with pytest.raises(ValueError, match="allocation.ranks: every one of the 14 modules has rank 0"):
        apply_allocation(model, alloc)
    assert_state_equal(model, before)


def test_dropping_a_module_that_holds_another_adapter_is_refused():
    from peft import LoraConfig

    model = all_linear()
    model.add_adapter("other", LoraConfig(r=2, target_modules=["gate_proj"]))
    alloc = half_size_drops(model)
    before = model_state(model)
    needle = r"model.layers.0.mlp.gate_proj'\]: rank 0 removes .* adapter\(s\) \['other'\]"
    with pytest.raises(ValueError, match=needle):
        apply_allocation(model, alloc)
    assert_state_equal(model, before)
    assert len(lora_layer_names(model)) == 14


def test_dropping_a_trained_module_needs_allow_trained():
    model = all_linear()
    alloc = half_size_drops(model)
    make_b_nonzero(model, lm_batches())
    before = model_state(model)
    with pytest.raises(ValueError, match="drops trained rank components"):
        apply_allocation(model, alloc)
    assert_state_equal(model, before)
    apply_allocation(model, alloc, allow_trained=True)
    assert "model.layers.0.mlp.up_proj" not in lora_layer_names(model)


def test_config_path_drops_the_same_modules_as_apply_allocation(tmp_path):
    """lora_config_for_allocation + get_peft_model + apply_resized_lora_a == apply_allocation, with drops."""
    from peft import LoraConfig, get_peft_model

    from fimlora.resize import apply_resized_lora_a, lora_a_weights, lora_config_for_allocation

    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    model = all_linear()
    alloc = half_size_drops(model)
    old_a = lora_a_weights(model)
    apply_allocation(model, alloc)
    rebuilt = get_peft_model(tiny_llama(), lora_config_for_allocation(alloc, config))
    assert lora_layer_names(rebuilt) == lora_layer_names(model)
    apply_resized_lora_a(rebuilt, alloc, old_a)
    want, got = model.state_dict(), rebuilt.state_dict()
    assert list(got) == list(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    model.save_pretrained(tmp_path / "a")
    rebuilt.save_pretrained(tmp_path / "b")
    saved = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in "ab"]
    for key in ("target_modules", "rank_pattern", "alpha_pattern"):
        assert saved[0][key] == saved[1][key], key
    alloc.ranks = {n: 0 for n in alloc.ranks}
    with pytest.raises(ValueError, match="allocation.ranks: every one of the 14 modules has rank 0"):
        lora_config_for_allocation(alloc, config)


def test_the_peft_model_forgets_the_dropped_modules():
    model = all_linear()
    alloc = half_size_drops(model)
    apply_allocation(model, alloc)
    kept = [n for n, r in alloc.ranks.items() if r > 0]
    assert model.base_model.targeted_module_names == kept


# ----------------------------------------------------------------------------- issue 20 (E): a name inside another


class _Inner(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)


class Nested(torch.nn.Module):
    """``fc`` and ``inner.fc``: one full name is a dot-suffix of the other."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = torch.nn.Linear(8, 8)
        self.inner = _Inner()
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.inner.fc(torch.tanh(self.fc(x)))))


def nested_lora(seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed + 100)
    return get_peft_model(Nested(seed), LoraConfig(r=4, lora_alpha=8, target_modules=["fc"]))


@pytest.mark.parametrize("scores, r_min", [({"fc": 1.0, "inner.fc": 1e-9}, 0), ({"fc": 1e-9, "inner.fc": 1.0}, 0),
                                           ({"fc": 1.0, "inner.fc": 0.2}, 1)],
                         ids=["drop-inner", "drop-outer", "no-drop"])
def test_a_name_that_ends_another_gets_a_key_that_matches_only_itself(tmp_path, scores, r_min):
    model = nested_lora()
    assert [i.name for i in lora_modules(model)] == ["fc", "inner.fc"]
    alloc = allocation_from_scores(model, scores, r_min=r_min)
    assert len(set(alloc.ranks.values())) == 2
    apply_allocation(model, alloc)
    with torch.no_grad():  # a trained adapter, so that a wrong rank or scale shows in the output
        for i in lora_modules(model):
            i.layer.lora_B["default"].weight.normal_()
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(Nested(), tmp_path)
    kept = {n: r for n, r in alloc.ranks.items() if r > 0}
    assert {i.name: i.r for i in lora_modules(reloaded)} == kept
    assert lora_layer_names(reloaded) == list(kept)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), reloaded(x))
    report = check_adapter(tmp_path, [n for n, _ in Nested().named_modules() if n])
    assert report.problems == [], report.problems
    # The config path writes the same keys.
    built = fimlora.lora_config_for_allocation(alloc, nested_lora().peft_config["default"])
    saved = model.peft_config["default"]
    assert (built.rank_pattern, built.alpha_pattern, built.target_modules) == (
        saved.rank_pattern, saved.alpha_pattern, saved.target_modules)


def test_a_regex_target_modules_becomes_an_exact_regex_of_the_kept_modules(tmp_path):
    """A string target_modules is a regex PEFT full-matches; the kept names as a list would select more modules
    than the regex did (every module whose name ends with one), so it stays a regex, of exactly the kept ones."""
    model = lora_llama(target_modules=r".*\.(q_proj|v_proj)")
    scores = {i.name: 1e-9 if i.name.startswith("model.layers.0.") else 1.0 for i in lora_modules(model)}
    alloc = allocation_from_scores(model, scores, r_min=0)
    kept = {n: r for n, r in alloc.ranks.items() if r > 0}
    assert len(kept) == 2
    apply_allocation(model, alloc)
    make_b_nonzero(model, lm_batches())
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert isinstance(saved["target_modules"], str)
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert {i.name: i.r for i in lora_modules(reloaded)} == kept
    batch = lm_batches()[0]
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)
