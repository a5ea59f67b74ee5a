"""Resizing gives a standard PEFT adapter: stock save/reload and merge reproduce it exactly."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
from peft import PeftModel

import fimlora
from fimlora import FimConfig, RankAllocation, apply_allocation, check_pattern_keys, lora_modules
from fimlora.modules import base_model_of, pattern_matches
from fimlora.resize import resized_lora_weights
from tests.references import cls_batches, lm_batches, lora_bert, lora_llama, make_b_nonzero, tiny_bert, tiny_llama


def layer_state(model, adapter="default"):
    return {
        i.name: (i.layer.r[adapter], i.layer.lora_alpha[adapter], i.layer.scaling[adapter],
                 tuple(i.layer.lora_A[adapter].weight.shape), tuple(i.layer.lora_B[adapter].weight.shape))
        for i in lora_modules(model, adapter)
    }


CASES = [
    ("bert", lambda: lora_bert(), lambda: tiny_bert(), cls_batches, lambda out: out.logits),
    ("llama", lambda: lora_llama(), lambda: tiny_llama(), lm_batches, lambda out: out.logits),
    ("llama-rslora", lambda: lora_llama(use_rslora=True), lambda: tiny_llama(), lm_batches, lambda out: out.logits),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_save_reload_and_merge_reproduce_logits(case, tmp_path):
    _, make, make_base, batches, logits_of = case
    model = make()
    data = batches()
    uniform_total = sum(i.r for i in lora_modules(model))  # L * r before resizing
    alloc = fimlora.apply_fim_ranks(model, data, n_batches=3, progress=False)
    assert len(set(alloc.ranks.values())) > 1, "test needs a non-uniform pattern"
    assert uniform_total == 4 * len(alloc.ranks)
    assert sum(i.layer.r["default"] for i in lora_modules(model)) == uniform_total
    make_b_nonzero(model, data)
    assert all(i.layer.lora_B["default"].weight.abs().sum() > 0 for i in lora_modules(model))
    with torch.no_grad():
        ref = logits_of(model(**data[0]))
    model.save_pretrained(tmp_path)

    reloaded = PeftModel.from_pretrained(make_base(), tmp_path).eval()
    assert layer_state(reloaded) == layer_state(model)
    with torch.no_grad():
        got = logits_of(reloaded(**data[0]))
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)

    merged = reloaded.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(logits_of(merged(**data[0])), ref, rtol=1e-5, atol=1e-5)


def test_scale_preserved_by_default_and_fixed_alpha_option():
    model = lora_llama(r=4)  # alpha 8 -> scale 2
    alloc = fimlora.apply_fim_ranks(model, lm_batches(), n_batches=2, progress=False)
    for i in lora_modules(model):
        assert i.layer.scaling["default"] == pytest.approx(2.0)
        assert i.layer.lora_alpha["default"] == pytest.approx(8 * alloc.ranks[i.name] / 4)
    model = lora_llama(r=4)
    alloc = fimlora.apply_fim_ranks(model, lm_batches(), n_batches=2, scale="fixed_alpha", progress=False)
    for i in lora_modules(model):
        assert i.layer.lora_alpha["default"] == 8
        assert i.layer.scaling["default"] == pytest.approx(8 / alloc.ranks[i.name])


def test_rslora_scale_preserved():
    model = lora_llama(r=4, use_rslora=True)
    alloc = fimlora.apply_fim_ranks(model, lm_batches(), n_batches=2, progress=False)
    for i in lora_modules(model):
        r = alloc.ranks[i.name]
        assert i.layer.scaling["default"] == pytest.approx(8 / math.sqrt(4))
        assert i.layer.lora_alpha["default"] == pytest.approx(8 * math.sqrt(r / 4))


def test_kept_rows_and_columns_new_rows_like_peft():
    model = lora_llama(r=4)
    make_b_nonzero(model, lm_batches())
    before = {i.name: (i.layer.lora_A["default"].weight.detach().clone(),
                       i.layer.lora_B["default"].weight.detach().clone()) for i in lora_modules(model)}
    alloc = fimlora.apply_fim_ranks(model, lm_batches(), n_batches=2, progress=False, allow_trained=True)
    grew = shrank = 0
    for i in lora_modules(model):
        a0, b0 = before[i.name]
        a, b = i.layer.lora_A["default"].weight, i.layer.lora_B["default"].weight
        r = alloc.ranks[i.name]
        k = min(r, 4)
        assert a.shape == (r, i.in_features) and b.shape == (i.out_features, r)
        assert torch.equal(a[:k], a0[:k]) and torch.equal(b[:, :k], b0[:, :k])
        if r > 4:
            grew += 1
            assert torch.count_nonzero(b[:, 4:]) == 0
            bound = 1 / math.sqrt(i.in_features)
            assert a[4:].abs().max() <= bound and a[4:].std() > 0.3 * bound
        else:
            shrank += r < 4
        assert a.requires_grad and b.requires_grad
    assert grew and shrank


def test_growing_module_keeps_its_output():
    """B is zero-extended (not A): new A rows are PEFT-random, new B columns zero, so the output is unchanged."""
    model = lora_llama(r=4)
    make_b_nonzero(model, lm_batches())
    infos = lora_modules(model)
    x = {i.name: torch.randn(3, i.in_features) for i in infos}
    with torch.no_grad():
        before = {i.name: i.layer(x[i.name]) for i in infos}
    names = [i.name for i in infos]
    scores = {n: (10.0 if k % 2 == 0 else 0.0) for k, n in enumerate(names)}
    alloc = fimlora.allocation_from_scores(model, scores, FimConfig(r_min=1, r_max=7))
    apply_allocation(model, alloc, allow_trained=True)
    grown = [i for i in infos if alloc.ranks[i.name] > 4]
    assert len(grown) == 7
    with torch.no_grad():
        for i in grown:
            a, b = i.layer.lora_A["default"].weight, i.layer.lora_B["default"].weight
            assert bool((a[4:] != 0).any(dim=1).all()), i.name  # every new A row is random, none zero
            assert torch.count_nonzero(b[:, 4:]) == 0, i.name
            torch.testing.assert_close(i.layer(x[i.name]), before[i.name])
        for i in infos:
            if alloc.ranks[i.name] == 4:
                torch.testing.assert_close(i.layer(x[i.name]), before[i.name])


def test_default_r_max_is_twice_the_base_rank():
    model = lora_llama(r=4)
    names = [i.name for i in lora_modules(model)]
    base_r = model.peft_config["default"].r
    scores = {n: 10.0 ** -k for k, n in enumerate(names)}  # so skewed that the top modules hit the cap
    alloc = fimlora.allocation_from_scores(model, scores, FimConfig())
    assert alloc.r_max == 2 * base_r == 8
    assert max(alloc.ranks.values()) == 2 * base_r
    assert alloc.ranks[names[0]] == alloc.ranks[names[1]] == 2 * base_r


def grown_rows(model, old_r=4):
    """New A rows of every module that grew past ``old_r``."""
    return {i.name: i.layer.lora_A["default"].weight[old_r:].detach().clone()
            for i in lora_modules(model) if i.layer.r["default"] > old_r}


def q_proj_allocation(model, seed=0):
    """Both q_proj modules (same shape) grow from 4 to 8; every other module shrinks."""
    scores = {i.name: (10.0 if i.name.endswith("q_proj") else 1.0) for i in lora_modules(model)}
    return fimlora.allocation_from_scores(model, scores, FimConfig(seed=seed))


def test_new_a_rows_differ_between_modules():
    model = lora_llama(r=4)
    apply_allocation(model, q_proj_allocation(model))
    rows = grown_rows(model)
    q0, q1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
    assert set(rows) == {q0, q1} and rows[q0].shape == rows[q1].shape == (4, 16)
    assert not torch.equal(rows[q0], rows[q1])


def test_new_a_rows_follow_the_seed():
    alloc = q_proj_allocation(lora_llama(r=4), seed=7)
    rows = {}
    for key, seed in [("1", 1), ("2", 2), ("1 again", 1), ("settings", None), ("7", 7)]:
        model = lora_llama(r=4)
        apply_allocation(model, alloc, seed=seed)
        rows[key] = grown_rows(model)
    assert set(rows["1"]) == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}
    for name in rows["1"]:
        assert not torch.equal(rows["1"][name], rows["2"][name]), name
        assert torch.equal(rows["1"][name], rows["1 again"][name]), name
        # no explicit seed: the allocation's recorded setting, 7
        assert torch.equal(rows["settings"][name], rows["7"][name]), name
        assert not torch.equal(rows["settings"][name], rows["1"][name]), name


def test_gaussian_init_new_rows_have_std_one_over_new_rank():
    d_in, new_r = 1024, 8
    a, b = torch.randn(2, d_in), torch.randn(32, 2)
    new_a, new_b = resized_lora_weights(a, b, new_r, "gaussian", torch.Generator().manual_seed(0))
    rows = new_a[2:]  # 6 * 1024 values; the std estimate is good to about 1%
    assert torch.equal(new_a[:2], a) and torch.equal(new_b[:, :2], b) and torch.count_nonzero(new_b[:, 2:]) == 0
    assert rows.std().item() == pytest.approx(1 / new_r, rel=0.04, abs=0)  # PEFT: normal(0, 1/r')
    assert abs(rows.mean().item()) < 0.01
    # PEFT's own gaussian init of a rank-8 A on the same d_in agrees
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(d_in, 32)),
                                LoraConfig(r=new_r, target_modules=["0"], init_lora_weights="gaussian"))
    peft_a = peft_model.base_model.model[0].lora_A["default"].weight
    assert rows.std().item() == pytest.approx(peft_a.std().item(), rel=0.06, abs=0)


def test_rank_pattern_keys_are_exact_and_unprefixed():
    model = lora_llama(layers=12)  # layer 1 vs layer 11: the dot-boundary trap
    fimlora.apply_fim_ranks(model, lm_batches(), n_batches=2, progress=False)
    cfg = model.peft_config["default"]
    base = base_model_of(model)
    all_names = [n for n, _ in base.named_modules()]
    targets = [i.name for i in lora_modules(model)]
    assert list(cfg.rank_pattern) == targets == list(cfg.alpha_pattern)
    assert not any(k.startswith("base_model") for k in cfg.rank_pattern)
    for key in cfg.rank_pattern:
        assert [n for n in all_names if pattern_matches(key, n)] == [key]
    assert check_pattern_keys(cfg.rank_pattern, targets, all_names) == []
    assert pattern_matches("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.q_proj")
    assert not pattern_matches("layers.1.self_attn.q_proj", "model.layers.11.self_attn.q_proj")


def test_check_pattern_keys_finds_prefix_overlap_and_misses():
    model = lora_llama()
    base = base_model_of(model)
    names = [n for n, _ in base.named_modules()]
    targets = [i.name for i in lora_modules(model)]
    problems = check_pattern_keys({"base_model.model.model.layers.0.self_attn.q_proj": 2, "q_proj": 3,
                                   "model.layers.0.self_attn.q_proj": 4, "nothing_here": 1}, targets, names)
    text = "\n".join(problems)
    assert "wrapper prefix" in text and "matches no LoRA module" in text
    assert "is matched by 2 keys" in text
    assert "q_proj' matches" not in text  # a key matching several modules is ordinary PEFT usage


def test_allocation_json_roundtrip_applies_identically_to_fresh_model(tmp_path):
    model = lora_bert()
    alloc = fimlora.apply_fim_ranks(model, cls_batches(), n_batches=2, progress=False, seed=5)
    path = tmp_path / "rank_map.json"
    alloc.to_json(path)
    loaded = RankAllocation.from_json(path)
    assert loaded == alloc
    assert list(loaded.ranks) == list(alloc.ranks)
    fresh = lora_bert()
    apply_allocation(fresh, loaded)
    assert layer_state(fresh) == layer_state(model)
    for i, j in zip(lora_modules(model), lora_modules(fresh)):
        assert torch.equal(i.layer.lora_A["default"].weight, j.layer.lora_A["default"].weight)
    assert fresh.peft_config["default"].rank_pattern == model.peft_config["default"].rank_pattern


def test_named_adapter(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                           adapter_name="task")
    alloc = fimlora.apply_fim_ranks(model, lm_batches(), n_batches=2, adapter_name="task", progress=False)
    assert model.peft_config["task"].rank_pattern == alloc.ranks
    make_b_nonzero(model, lm_batches())
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "task", adapter_name="task")
    assert layer_state(reloaded, "task") == layer_state(model, "task")


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            dict(model.peft_config["default"].rank_pattern), layer_state(model))


def assert_untouched(model, snap):
    sd, pattern, layers = snap
    now = model.state_dict()
    assert set(now) == set(sd)
    assert all(torch.equal(now[k], sd[k]) for k in sd)
    assert dict(model.peft_config["default"].rank_pattern) == pattern
    assert layer_state(model) == layers


def test_bad_allocation_leaves_model_untouched():
    model = lora_bert()
    alloc = fimlora.compute_allocation(model, cls_batches(), FimConfig(n_batches=2, progress=False))
    last = alloc.module_names[-1]
    bad = RankAllocation.from_dict({**alloc.to_dict(), "shapes": {**alloc.shapes, last: [1, 2]}})
    snap = snapshot(model)
    with pytest.raises(ValueError, match=rf"allocation.shapes\['{last}'\]: must match .* got \(1, 2\)"):
        apply_allocation(model, bad)
    assert_untouched(model, snap)
    other = lora_llama()
    with pytest.raises(ValueError,
                       match="allocation: keys must be exactly the model's LoRA modules; missing \\['model.layers.0"):
        apply_allocation(other, alloc)


def test_unsupported_layers_rejected_up_front():
    from peft import LoraConfig, get_peft_model

    # DoRA is supported (tests/lib/test_layer_types.py); the other refused types are tested there too.
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"model.embed_tokens: layer type .*Embedding is not supported"):
        fimlora.apply_fim_ranks(model, lm_batches(), progress=False)
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


def test_trains_after_resize_with_fresh_optimizer():
    model = lora_llama()
    fimlora.apply_fim_ranks(model, lm_batches(), n_batches=2, progress=False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 28
    opt = torch.optim.AdamW(params, lr=1e-2)
    b_before = [i.layer.lora_B["default"].weight.detach().clone() for i in lora_modules(model)]
    loss = model(**lm_batches()[0]).loss
    loss.backward()
    opt.step()
    assert all(not torch.equal(b, i.layer.lora_B["default"].weight) for b, i in zip(b_before, lora_modules(model)))


# ----------------------------------------------------------------------------- the config path (sharded models)


def rebuilt_from_config(alloc, base_config, seed=1234):
    """The resized adapter built afresh: get_peft_model on a new base model with the allocation's LoraConfig."""
    from peft import get_peft_model

    torch.manual_seed(seed)  # PEFT's own A init: other random numbers than the calibrated model's
    return get_peft_model(tiny_llama(seed=0), fimlora.lora_config_for_allocation(alloc, base_config))


def saved_adapter(model, path):
    from safetensors.torch import load_file

    model.save_pretrained(path)
    return load_file(str(path / "adapter_model.safetensors")), json.loads((path / "adapter_config.json").read_text())


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_config_path_builds_the_adapter_apply_allocation_builds(tmp_path, init):
    """Same ranks, alphas and scales; with apply_resized_lora_a also the same A and B, so the same trained adapter."""
    data = lm_batches()
    model = lora_llama(seed=0, init_lora_weights=init)
    base_config = copy.deepcopy(model.peft_config["default"])
    alloc = fimlora.compute_allocation(model, data, FimConfig(n_batches=3, progress=False, seed=5))
    old_ranks = {i.name: i.r for i in lora_modules(model)}
    assert any(r > old_ranks[n] for n, r in alloc.ranks.items()), "test needs a module that grows (new A rows)"
    assert any(r < old_ranks[n] for n, r in alloc.ranks.items()), "test needs a module that shrinks"
    old_a = fimlora.lora_a_weights(model)
    apply_allocation(model, alloc)

    rebuilt = rebuilt_from_config(alloc, base_config)
    assert layer_state(rebuilt) == layer_state(model)  # r, alpha, scaling, A and B shapes
    a_of = lambda m: {i.name: i.layer.lora_A["default"].weight.detach().clone() for i in lora_modules(m)}  # noqa: E731
    assert any(not torch.equal(a, a_of(model)[n]) for n, a in a_of(rebuilt).items())  # PEFT's init is not it
    assert fimlora.apply_resized_lora_a(rebuilt, alloc, old_a) is rebuilt
    want, got = model.state_dict(), rebuilt.state_dict()
    assert list(got) == list(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k

    for m in (model, rebuilt):
        make_b_nonzero(m, data)
    tensors, config = saved_adapter(model, tmp_path / "apply_allocation")
    tensors2, config2 = saved_adapter(rebuilt, tmp_path / "config_path")
    assert list(tensors2) == list(tensors)
    for k in tensors:
        assert torch.equal(tensors2[k], tensors[k]), k
    # PEFT saves target_modules from a set: the same modules, in an order that varies with the hash seed.
    unordered = lambda c: {**c, "target_modules": sorted(c["target_modules"])  # noqa: E731
                           if isinstance(c["target_modules"], list) else c["target_modules"]}
    assert unordered(config2) == unordered(config) and config["rank_pattern"] == alloc.ranks


def test_config_path_bad_input_names_the_rule_and_leaves_the_model_unchanged():
    data = lm_batches()
    model = lora_llama(seed=0)
    base_config = copy.deepcopy(model.peft_config["default"])
    alloc = fimlora.compute_allocation(model, data, FimConfig(n_batches=2, progress=False))
    old_a = fimlora.lora_a_weights(model)
    first = next(iter(alloc.ranks))
    with pytest.raises(ValueError, match=r"lora_config: must be a peft.LoraConfig, got dict"):
        fimlora.lora_config_for_allocation(alloc, {"r": 4})
    with pytest.raises(ValueError, match=r"allocation.use_rslora: is False but the adapter's config has use_rslora"):
        fimlora.lora_config_for_allocation(alloc, dataclasses.replace(base_config, use_rslora=True))
    snap = snapshot(model)
    with pytest.raises(ValueError, match=rf"model: LoRA module '{first}' has r=4, lora_alpha=8.0 but the allocation "
                                         r"gives r=\d+, .*get_peft_model\(base, lora_config_for_allocation"):
        fimlora.apply_resized_lora_a(model, alloc, old_a)  # the calibrated model, not rebuilt at the new ranks
    assert_untouched(model, snap)
    rebuilt = rebuilt_from_config(alloc, base_config)
    snap = snapshot(rebuilt)
    cases = [
        ({n: a for n, a in old_a.items() if n != first}, rf"old_a: must hold the old LoRA-A of every module of "
                                                         rf"the allocation .* missing \['{first}'\], unknown \[\]"),
        ({**old_a, "x.q_proj": old_a[first]}, r"old_a: must hold .* missing \[\], unknown \['x.q_proj'\]"),
        ({**old_a, first: old_a[first][:2]}, rf"old_a\['{first}'\]: must be the old LoRA-A of shape \(r, d_in\)="
                                            r"\(4, 16\), got \(2, 16\)"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            fimlora.apply_resized_lora_a(rebuilt, alloc, bad)
        assert_untouched(rebuilt, snap)
    make_b_nonzero(rebuilt, data)
    snap = snapshot(rebuilt)
    with pytest.raises(ValueError, match=r"LoRA-B of .* is non-zero"):
        fimlora.apply_resized_lora_a(rebuilt, alloc, old_a)
    assert_untouched(rebuilt, snap)
