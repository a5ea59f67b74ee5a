"""Errors of the public API: each a ValueError naming field, rule and value, with the model left bit-identical."""

from __future__ import annotations

import pytest
import torch

import fimlora
import fimlora.api
from fimlora import FimConfig, apply_allocation, lora_modules
from tests.references import lm_batches, lora_llama, make_b_nonzero

FIRST = "model.layers.0.self_attn.q_proj"


def snapshot(model, adapter="default"):
    """Everything a failed call must leave alone: tensors, per-layer r/alpha/scaling, config patterns."""
    cfg = model.peft_config[adapter]
    layers = {i.name: (i.layer.r[adapter], i.layer.lora_alpha[adapter], i.layer.scaling[adapter])
              for i in lora_modules(model, adapter)}
    return ({k: v.detach().clone() for k, v in model.state_dict().items()}, layers,
            dict(cfg.rank_pattern or {}), dict(cfg.alpha_pattern or {}), cfg.r, cfg.lora_alpha)


def assert_untouched(model, snap):
    sd, *rest = snap
    now, *now_rest = snapshot(model)
    assert list(now) == list(sd)
    for k in sd:
        assert now[k].dtype == sd[k].dtype and torch.equal(now[k], sd[k]), k
    assert now_rest == rest


def no_calibration(*args, **kwargs):
    raise AssertionError("calibration ran before the input check")


# ----------------------------------------------------------------------------- trained adapters


def trained_llama():
    model = lora_llama()
    make_b_nonzero(model, lm_batches())
    return model


@pytest.mark.parametrize("call", ["apply_fim_ranks", "compute_allocation"])
def test_trained_adapter_refused_before_calibration(call, monkeypatch):
    model = trained_llama()
    snap = snapshot(model)
    monkeypatch.setattr(fimlora.api, "compute_fisher", no_calibration)
    fn = {"apply_fim_ranks": lambda: fimlora.apply_fim_ranks(model, lm_batches(), progress=False),
          "compute_allocation": lambda: fimlora.compute_allocation(model, lm_batches(), FimConfig(progress=False))}
    with pytest.raises(ValueError, match=rf"model: LoRA-B of {FIRST!r} is non-zero \(max \|B\| = [0-9.e-]+\); "
                                         r"calibration assumes a freshly initialised adapter \(B = 0, straight after "
                                         r"get_peft_model\).*allow_trained=True"):
        fn[call]()
    assert_untouched(model, snap)


def test_fresh_adapter_with_one_trained_module_names_it():
    model = lora_llama()
    info = lora_modules(model)[5]
    with torch.no_grad():
        info.layer.lora_B["default"].weight[0, 1] = 1e-3
    with pytest.raises(ValueError, match=rf"LoRA-B of {info.name!r} is non-zero \(max \|B\| = 0.001\)"):
        fimlora.compute_allocation(model, lm_batches(), FimConfig(progress=False))


def test_trained_adapter_opt_in():
    model = trained_llama()
    alloc = fimlora.apply_fim_ranks(model, lm_batches(), n_batches=2, progress=False, allow_trained=True)
    assert alloc.settings["allow_trained"] is True
    assert {i.name: i.r for i in lora_modules(model)} == alloc.ranks
    fresh = fimlora.compute_allocation(lora_llama(), lm_batches(), FimConfig(n_batches=2, progress=False))
    assert fresh.settings["allow_trained"] is False


def test_apply_allocation_refuses_to_drop_trained_components():
    alloc = fimlora.compute_allocation(lora_llama(), lm_batches(), FimConfig(n_batches=2, progress=False))
    shrunk = next(n for n, r in alloc.ranks.items() if r < 4)
    model = trained_llama()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"allocation.ranks\[.*\]: shrinking from r=4 to [123] drops trained rank "
                                         r"components .*allow_trained=True"):
        apply_allocation(model, alloc)
    assert_untouched(model, snap)
    apply_allocation(model, alloc, allow_trained=True)
    assert lora_modules(model)[0].layer.r["default"] == alloc.ranks[FIRST]
    assert any(i.name == shrunk and i.r == alloc.ranks[shrunk] for i in lora_modules(model))


def test_apply_allocation_grows_trained_adapter_without_opt_in():
    """Growing keeps every trained component (B is zero-extended), so no opt-in is needed."""
    model = trained_llama()
    n = len(lora_modules(model))
    scores = {i.name: float(k) for k, i in enumerate(lora_modules(model))}
    alloc = fimlora.allocation_from_scores(model, scores, FimConfig(r_min=4, r_max=8, budget=4 * n + 10))
    data = lm_batches()[0]
    with torch.no_grad():
        before = model(**data).logits
    apply_allocation(model, alloc)
    with torch.no_grad():
        torch.testing.assert_close(model(**data).logits, before)


# ----------------------------------------------------------------------------- named arguments vs config


@pytest.mark.parametrize("named", [{"r_max": 4}, {"n_batches": 2, "estimator": "batch"}, {"r_min": 1},
                                   {"budget": 10, "aggregation": "max"}, {"seed": 3}])
def test_named_arguments_and_config_conflict(named, monkeypatch):
    model = lora_llama()
    snap = snapshot(model)
    monkeypatch.setattr(fimlora.api, "compute_fisher", no_calibration)
    names = ", ".join(repr(k) for k in sorted(named))
    with pytest.raises(ValueError, match=rf"config: pass either config or the settings it holds, not both; "
                                         rf"also got \[{names}\]"):
        fimlora.apply_fim_ranks(model, lm_batches(), config=FimConfig(progress=False), **named)
    assert_untouched(model, snap)


def test_documented_defaults_unchanged():
    model = lora_llama()
    alloc = fimlora.apply_fim_ranks(model, lm_batches(n_batches=9), progress=False)
    s = alloc.settings
    assert (s["n_batches"], s["n_batches_used"], s["r_min"], s["estimator"], s["aggregation"]) == (8, 8, 1, "batch",
                                                                                                     "mean")
    assert (alloc.r_min, alloc.r_max, alloc.budget) == (1, 8, 4 * len(alloc.ranks))


def test_config_alone_is_honoured():
    model = lora_llama()
    alloc = fimlora.apply_fim_ranks(model, lm_batches(), config=FimConfig(n_batches=2, r_max=5, progress=False))
    assert alloc.r_max == 5 and alloc.settings["n_batches_used"] == 2
    assert max(alloc.ranks.values()) <= 5


# ----------------------------------------------------------------------------- wrapped models

WRAPPED = (r"model: the PEFT model is wrapped in {}; calibrate before wrapping: call apply_fim_ranks on the "
           r"PeftModel before DDP/FSDP wraps it \(or pass model.module\)")


class Wrapper(torch.nn.Module):
    """What accelerate, DeepSpeed and others put around a model: the model at ``.module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def test_ddp_wrapped_model_gets_calibrate_before_wrapping(tmp_path):
    from torch.nn.parallel import DistributedDataParallel

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = lora_llama()
        ddp = DistributedDataParallel(model)
        snap = snapshot(model)
        for call in (lambda: fimlora.apply_fim_ranks(ddp, lm_batches(), progress=False),
                     lambda: fimlora.compute_allocation(ddp, lm_batches(), FimConfig(progress=False)),
                     lambda: lora_modules(ddp)):
            with pytest.raises(ValueError, match=WRAPPED.format("DistributedDataParallel")):
                call()
        assert_untouched(model, snap)
        alloc = fimlora.apply_fim_ranks(ddp.module, lm_batches(), n_batches=2, progress=False)
        assert {i.name: i.r for i in lora_modules(model)} == alloc.ranks
    finally:
        torch.distributed.destroy_process_group()


def test_any_module_wrapper_gets_the_same_advice():
    model = lora_llama()
    with pytest.raises(ValueError, match=WRAPPED.format("Wrapper")):
        fimlora.apply_fim_ranks(Wrapper(Wrapper(model)), lm_batches(), progress=False)
    with pytest.raises(ValueError, match=WRAPPED.format("Wrapper")):
        alloc = fimlora.compute_allocation(model, lm_batches(), FimConfig(n_batches=2, progress=False))
        apply_allocation(Wrapper(model), alloc)


def test_check_not_sharded_gives_the_same_advice():
    from fimlora.distributed import check_not_sharded

    class DistributedDataParallel(Wrapper):
        pass

    with pytest.raises(ValueError, match=r"is wrapped in DistributedDataParallel; calibrate before wrapping"):
        check_not_sharded(DistributedDataParallel(lora_llama()))


# ----------------------------------------------------------------------------- issue 20: alphas of a rank map (A)


def alloc_for(model, **kw):
    return fimlora.compute_allocation(model, lm_batches(), FimConfig(n_batches=2, progress=False, **kw))


def test_apply_allocation_refuses_a_map_made_for_another_lora_alpha():
    alloc = alloc_for(lora_llama(r=4, lora_alpha=8))
    model = lora_llama(r=4, lora_alpha=32)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"allocation.base_alpha: must equal lora_alpha=32 of the model's LoRA "
                                         r"config .*got 8"):
        apply_allocation(model, alloc)
    assert_untouched(model, snap)


def test_apply_allocation_refuses_a_map_made_for_another_r():
    alloc = alloc_for(lora_llama(r=4, lora_alpha=8))
    model = lora_llama(r=8, lora_alpha=8)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"allocation.base_r: must equal r=8 of the model's LoRA config.*got 4"):
        apply_allocation(model, alloc)
    assert_untouched(model, snap)


def swapped_ranks(alloc):
    """The map with the ranks of two modules of different rank swapped by hand, alphas left as they were."""
    d = alloc.to_dict()
    names = list(alloc.ranks)
    a = names[0]
    b = next(n for n in names if alloc.ranks[n] != alloc.ranks[a])
    d["ranks"][a], d["ranks"][b] = d["ranks"][b], d["ranks"][a]
    del d["params_spent"]
    return fimlora.RankAllocation.from_dict(d), a


def test_apply_allocation_refuses_alphas_that_do_not_follow_the_scale_rule():
    alloc = alloc_for(lora_llama())
    edited, name = swapped_ranks(alloc)
    model = lora_llama()
    snap = snapshot(model)
    r, old_r = edited.ranks[name], edited.old_ranks[name]
    with pytest.raises(ValueError, match=rf"allocation.alphas\[{name!r}\]: must be {8 * r / old_r:g} = old alpha 8 \* "
                                         rf"r'/r = 8 \* {r}/{old_r} under the map's scale rule 'preserve', got "
                                         rf"{alloc.alphas[name]!r}"):
        apply_allocation(model, edited)
    assert_untouched(model, snap)


def test_scale_rule_read_from_the_map_and_old_maps_checked_as_preserve():
    fixed = alloc_for(lora_llama(), scale="fixed_alpha")
    apply_allocation(lora_llama(), fixed)  # agrees with its own rule
    d = fixed.to_dict()
    del d["settings"]["scale"]
    old = fimlora.RankAllocation.from_dict(d)
    model = lora_llama()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"under the map's scale rule 'preserve' \(settings has no 'scale'; "
                                         r"maps without it are checked against the default\)"):
        apply_allocation(model, old)
    assert_untouched(model, snap)
    d["settings"]["scale"] = "wide"
    with pytest.raises(ValueError, match=r"allocation.settings\['scale'\]: must be one of \['preserve', "
                                         r"'fixed_alpha'\], got 'wide'"):
        apply_allocation(model, fimlora.RankAllocation.from_dict(d))


def test_lora_config_for_allocation_checks_the_same_rules():
    from peft import LoraConfig

    alloc = alloc_for(lora_llama(r=4, lora_alpha=8))
    cfg = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"allocation.base_alpha: must equal lora_alpha=32 of lora_config"):
        fimlora.lora_config_for_allocation(alloc, cfg)
    edited, name = swapped_ranks(alloc)
    with pytest.raises(ValueError, match=rf"allocation.alphas\[{name!r}\]"):
        fimlora.lora_config_for_allocation(edited, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))


# ----------------------------------------------------------------------------- issue 20: seed (F)


def test_negative_seed_refused_by_the_config():
    with pytest.raises(ValueError, match="seed: must be >= 0, got -1"):
        FimConfig(seed=-1)
