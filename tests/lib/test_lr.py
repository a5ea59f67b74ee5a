"""The learning-rate rules (fimlora.lr) against brute force: the Hessian from torch.autograd.functional.hessian over
the flattened LoRA weights of a tiny model, its top eigenvalue from eigvalsh; the range test leaves the model and RNG
as they were; the pass counts are the passes run."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
from torch.func import functional_call

from fimlora import lr as lrmod
from fimlora.config import LR_FAMILIES, LR_RULE_FILE, FimConfig, lr_rule_table
from fimlora.lr import (
    LrRecommendation,
    compute_lr_recommendation,
    hessian_vector_product,
    lanczos,
    learning_rate_from_statistic,
    lora_weights,
    power_iteration,
    range_test_statistic,
)
from tests.references import cls_batches, lora_bert, make_b_nonzero


def small_bert(b_nonzero: bool):
    """A double-precision tiny BERT with LoRA r = 1 on query only: 2 layers x (16 + 16) = 64 LoRA weights."""
    model = lora_bert(r=1, target_modules=["query"]).double()
    if b_nonzero:
        make_b_nonzero(model, cls_batches(2))
    return model.eval()


def brute_hessian(model, batch) -> torch.Tensor:
    """d^2 L / d theta^2 of the model's mean loss over the concatenated LoRA A/B weights, by autograd.functional."""
    names = [n for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n]
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])

    def loss(theta):
        parts = torch.split(theta, [math.prod(s) for s in shapes])
        override = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
        return functional_call(model, override, kwargs=batch).loss

    return torch.autograd.functional.hessian(loss, flat)


@pytest.mark.parametrize("b_nonzero", [False, True])
def test_hvp_and_power_iteration_match_the_brute_force_hessian(b_nonzero):
    with lrmod._math_attention():  # the fused CPU attention has no double backward
        _check_against_brute_force(b_nonzero)


def _check_against_brute_force(b_nonzero):
    model = small_bert(b_nonzero)
    batch = cls_batches(1)[0]
    H = brute_hessian(model, batch)
    params = lora_weights(model)
    assert sum(p.numel() for p in params) == H.shape[0] == 64
    for p in params:
        p.requires_grad_(True)
    loss = model(**batch).loss
    grads = torch.autograd.grad(loss, params, create_graph=True)
    v = [torch.randn(p.shape, generator=torch.Generator().manual_seed(3), dtype=p.dtype) for p in params]
    hv = torch.cat([h.reshape(-1) for h in hessian_vector_product(grads, params, v)])
    assert torch.allclose(hv, H @ torch.cat([x.reshape(-1) for x in v]), rtol=1e-8, atol=1e-10)

    def hvp(x):
        return hessian_vector_product(grads, params, x)

    eig = torch.linalg.eigvalsh(H)
    # The top eigenvalue and the most negative one are within 1% of each other in magnitude here (the A-B cross
    # block's +-sigma pairs): Lanczos finds lambda_max in a handful of products, power iteration does not.
    assert 0.95 < -float(eig.min()) / float(eig.max()) < 1
    lam, n = lanczos(hvp, params, n_iterations=20, tol=1e-6, generator=torch.Generator().manual_seed(0))
    assert lam == pytest.approx(float(eig.max()), rel=1e-4) and n < 20
    if not b_nonzero:  # B = 0: the A-A block is zero, the cross block is not
        k = 16  # layer 0's A block: the first 16 entries
        assert torch.count_nonzero(H[:k, :k]) == 0 and torch.count_nonzero(H[:k, k:2 * k]) > 0


def test_power_iteration_and_lanczos_on_a_known_matrix_count_their_products():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    H = q @ torch.diag(torch.tensor([5.0, -2.0, 1.0, 0.5, 0.1, 0.0], dtype=torch.float64)) @ q.T
    calls = []

    def hvp(v):
        calls.append(1)
        return [H @ v[0]]

    lam, n = power_iteration(hvp, [torch.zeros(6, dtype=torch.float64)], 200, 1e-12, torch.Generator().manual_seed(1))
    assert lam == pytest.approx(5.0, rel=1e-9) and n == len(calls) < 200
    lam, n = power_iteration(hvp, [torch.zeros(6, dtype=torch.float64)], 3, 0.0, torch.Generator().manual_seed(1))
    assert n == 3
    # Shifted by the most negative eigenvalue, power iteration finds the top one of a spectrum led by a negative one.
    calls.clear()
    H = q @ torch.diag(torch.tensor([3.0, -4.0, 1.0, 0.5, 0.1, 0.0], dtype=torch.float64)) @ q.T
    lam, n = power_iteration(hvp, [torch.zeros(6, dtype=torch.float64)], 500, 1e-12, torch.Generator().manual_seed(1),
                             shift=-4.0)
    assert lam == pytest.approx(3.0, rel=1e-8) and n == len(calls)
    calls.clear()
    lam, n = lanczos(hvp, [torch.zeros(6, dtype=torch.float64)], 50, 1e-12, torch.Generator().manual_seed(1))
    assert lam == pytest.approx(3.0, rel=1e-9) and n == len(calls) <= 7  # exact once the Krylov space is all of R^6


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("rule", ["hessian", "range"])
def test_the_model_and_rng_are_exactly_as_before_and_passes_are_counted(rule):
    model = small_bert(b_nonzero=False)
    batches = cls_batches(3)
    before, flags = _state(model), [(p.requires_grad, p.grad) for p in model.parameters()]
    model.train()  # dropout on (train_mode=True) draws from the RNG, which must come back as it was
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    calls = {"forward": 0}
    handle = model.register_forward_hook(lambda *_: calls.__setitem__("forward", calls["forward"] + 1))
    rec = compute_lr_recommendation(model, iter(batches), rule, n_batches=2, steps=4, tol=0.0, train_mode=True)
    handle.remove()
    assert _same(before, _state(model)) and torch.equal(torch.get_rng_state(), rng)
    assert [(p.requires_grad, p.grad) for p in model.parameters()] == flags and model.training
    assert rec.passes["forward"] == calls["forward"]
    if rule == "hessian":  # per batch: 1 forward, 1 backward for g and 4 Hessian-vector products (tol 0)
        assert rec.passes == {"forward": 2, "backward": 2 * (1 + 4)} and rec.details["iterations"] == [4, 4]
        assert rec.statistic == pytest.approx(sum(rec.details["eigenvalues"]) / 2)
    else:  # 4 steps on the mean of 2 batches, then the loss after the last one
        steps = len(rec.details["learning_rates"])
        assert rec.passes == {"forward": 2 * steps + 2 * (steps == 4), "backward": 2 * steps}
        assert rec.statistic in rec.details["learning_rates"]
    constant = lr_rule_table()["rules"][rule]["encoder"]["constant"]  # the shipped fit
    assert rec.constant == constant and rec.learning_rate == pytest.approx(
        learning_rate_from_statistic(rule, rec.statistic, constant))
    assert "AdamW" in rec.text() and "not fitted" not in rec.text()
    assert LrRecommendation.from_dict(json.loads(json.dumps(rec.to_dict()))) == rec


def test_range_test_rule_and_its_step_counts():
    assert range_test_statistic([1, 2, 3], [5.0, 4.9, 4.0, 4.5]) == 2
    with pytest.raises(ValueError, match="lr_rule: 'range': no step"):
        range_test_statistic([1, 2], [5.0, 5.0, 6.0])
    model = small_bert(b_nonzero=False)
    rec = compute_lr_recommendation(model, cls_batches(2), "range", steps=6)
    lrs = rec.details["learning_rates"]
    assert lrs[0] == pytest.approx(lrmod.RANGE_START)
    assert all(b / a == pytest.approx((lrmod.RANGE_END / lrmod.RANGE_START) ** (1 / 5)) for a, b in zip(lrs, lrs[1:]))
    drops = [a - b for a, b in zip(rec.details["losses"], rec.details["losses"][1:])]
    assert rec.statistic == lrs[drops.index(max(drops))]


def test_learning_rate_from_statistic_and_the_rule_file(monkeypatch):
    import fimlora.config as config

    assert learning_rate_from_statistic("hessian", 50.0, constant=0.01) == pytest.approx(2e-4)
    assert learning_rate_from_statistic("range", 1e-3, constant=0.5) == pytest.approx(5e-4)
    table = json.loads(LR_RULE_FILE.read_text())
    assert table == lr_rule_table() and FimConfig().lr_rule == table["default_rule"]
    assert set(table["rules"]["hessian"]) == set(LR_FAMILIES) == {"encoder", "causal_lm"}
    shipped = table["rules"]["hessian"]["encoder"]["constant"]
    assert shipped > 0 and learning_rate_from_statistic("hessian", 50.0) == pytest.approx(shipped / 50)
    unfitted = copy.deepcopy(table)
    unfitted["rules"]["hessian"]["encoder"].update(constant=None, fitted_on=None)
    monkeypatch.setattr(config, "lr_rule_table", lambda: unfitted)
    assert learning_rate_from_statistic("hessian", 50.0) is None
    rec = compute_lr_recommendation(small_bert(False), cls_batches(1), "hessian", n_batches=1, steps=3)
    assert rec.learning_rate is None and rec.constant is None and "not fitted" in rec.text()
    assert "lr_rule.json has no encoder constant for it yet" in rec.text()
    assert rec.short_text().startswith("lr not fitted (hessian: lambda_max")
    fitted = copy.deepcopy(table)
    fitted["rules"]["hessian"]["encoder"].update(constant=0.02, fitted_on="suite x")
    monkeypatch.setattr(config, "lr_rule_table", lambda: fitted)
    assert learning_rate_from_statistic("hessian", 4.0) == pytest.approx(0.005)
    rec = compute_lr_recommendation(small_bert(False), cls_batches(1), "hessian", n_batches=1, steps=3)
    assert rec.learning_rate == pytest.approx(0.02 / rec.statistic) and rec.fitted_on == "suite x"
    assert rec.family == "encoder" and "AdamW" in rec.text() and "not fitted" not in rec.text()
    with pytest.raises(ValueError, match=r"statistic \(hessian\): must be > 0, got -1"):
        learning_rate_from_statistic("hessian", -1.0, constant=1.0)
    with pytest.raises(ValueError, match="rule: must be one of"):
        learning_rate_from_statistic("grid", 1.0)
    with pytest.raises(ValueError, match=r"family: must be one of \['encoder', 'causal_lm'\], got 'decoder'"):
        learning_rate_from_statistic("hessian", 1.0, family="decoder")


def test_the_rule_file_is_checked_per_rule_and_family(monkeypatch, tmp_path):
    import fimlora.config as config

    table = json.loads(LR_RULE_FILE.read_text())
    bad = copy.deepcopy(table)
    del bad["rules"]["range"]["causal_lm"]
    path = tmp_path / "lr_rule.json"
    path.write_text(json.dumps(bad))
    monkeypatch.setattr(config, "LR_RULE_FILE", path)
    config.lr_rule_table.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"rules\.range: must have an entry for model family 'causal_lm'"):
            config.lr_rule_table()
        bad = copy.deepcopy(table)
        bad["rules"]["hessian"]["causal_lm"]["constant"] = -1.0
        path.write_text(json.dumps(bad))
        config.lr_rule_table.cache_clear()
        with pytest.raises(ValueError, match=r"rules\.hessian\.causal_lm\.constant: must be > 0, got -1"):
            config.lr_rule_table()
        bad = copy.deepcopy(table)
        bad["rules"]["range"]["encoder"]["warning"] = 3
        path.write_text(json.dumps(bad))
        config.lr_rule_table.cache_clear()
        with pytest.raises(ValueError, match=r"rules\.range\.encoder\.warning: must be a string or null, got 3"):
            config.lr_rule_table()
    finally:
        monkeypatch.undo()
        config.lr_rule_table.cache_clear()


@pytest.mark.parametrize("rule", ["hessian", "range"])
def test_errors_name_the_field_and_leave_the_model_unchanged(rule):
    model = small_bert(b_nonzero=True)
    before = _state(model)
    with pytest.raises(ValueError, match=f"batches: empty; lr_rule '{rule}'"):
        compute_lr_recommendation(model, [], rule)

    def nan_loss(m, batch):
        return m(**batch).loss * math.nan

    with pytest.raises(ValueError, match="the loss itself is non-finite"):
        compute_lr_recommendation(model, cls_batches(1), rule, loss_fn=nan_loss)
    with pytest.raises(ValueError, match="adapter_name: no adapter named 'other'"):
        compute_lr_recommendation(model, cls_batches(1), rule, adapter_name="other")
    with pytest.raises(ValueError, match="steps: must be >= 2, got 1"):
        compute_lr_recommendation(model, cls_batches(1), rule, steps=1)
    assert _same(before, _state(model))


def test_a_non_finite_hessian_vector_product_is_an_error_and_the_model_is_unchanged(monkeypatch):
    model = small_bert(b_nonzero=True)
    before = _state(model)
    monkeypatch.setattr(lrmod, "hessian_vector_product", lambda g, p, v: [x * math.inf for x in v])
    with pytest.raises(ValueError, match="lr_rule: 'hessian': calibration batch 0: Hessian-vector product: non-fin"):
        compute_lr_recommendation(model, cls_batches(1), "hessian")
    assert _same(before, _state(model))


def test_fim_config_validates_the_lr_settings():
    with pytest.raises(ValueError, match=r"lr_rule: must be one of \['hessian', 'range', 'none'\], got 'grid'"):
        FimConfig(lr_rule="grid")
    with pytest.raises(ValueError, match="lr_batches: must be >= 1, got 0"):
        FimConfig(lr_batches=0)
    with pytest.raises(ValueError, match="lr_steps: must be >= 2, got 1"):
        FimConfig(lr_steps=1)
    assert dataclasses.asdict(FimConfig(lr_rule="none"))["lr_rule"] == "none"


@pytest.mark.parametrize("rule", ["hessian", "range"])
def test_compute_allocation_measures_the_resized_adapter_and_leaves_the_model_unchanged(rule):
    import fimlora
    from fimlora import apply_allocation

    model = lora_bert(seed=2)
    model.eval()
    batches = cls_batches(4)
    before, modules = _state(model), dict(model.named_modules())
    config = fimlora.FimConfig(n_batches=3, r_min=0, budget=10, lr_rule=rule, lr_steps=5, progress=False)
    alloc = fimlora.compute_allocation(model, iter(batches), config)  # a generator: read once
    assert 0 in alloc.ranks.values() and set(alloc.ranks.values()) != {4}  # a real resize, with a module dropped
    assert _same(before, _state(model)) and dict(model.named_modules()) == modules
    # The same measurement on the adapter apply_allocation builds, by hand, from the first 2 batches.
    resized = copy.deepcopy(model)
    apply_allocation(resized, alloc, seed=config.seed)
    want = compute_lr_recommendation(resized, batches[:2], rule, steps=5, seed=config.seed)
    assert alloc.lr["statistic"] == pytest.approx(want.statistic, rel=1e-6)
    key = "eigenvalues" if rule == "hessian" else "losses"
    assert alloc.lr["details"][key] == pytest.approx(want.details[key], rel=1e-6)
    assert alloc.lr["passes"] == want.passes and alloc.lr["rule"] == rule
    assert alloc.learning_rate == pytest.approx(want.learning_rate, rel=1e-6) and alloc.learning_rate > 0
    again = fimlora.RankAllocation.from_json(alloc.to_json())
    assert again.lr == json.loads(json.dumps(alloc.lr))
    # apply_fim_ranks keeps it; "none" computes none.
    applied = fimlora.apply_fim_ranks(copy.deepcopy(model), batches, config=config)
    assert applied.lr["statistic"] == pytest.approx(alloc.lr["statistic"], rel=1e-6)
    off = fimlora.compute_allocation(model, batches, dataclasses.replace(config, lr_rule="none"))
    assert off.lr is None and off.learning_rate is None


def test_an_adapter_a_data_driven_init_built_gets_a_recommendation_but_is_still_not_resized():
    """The rule reads LoRA weights only, so PiSSA's (and EVA's, LoRA-GA's) adapters are measured as they are; the
    resize path keeps refusing them, since their init set the ranks."""
    from fimlora.modules import lora_modules

    model = lora_bert(r=2, target_modules=["query", "value"], init_lora_weights="pissa", lora_dropout=0.0).eval()
    with pytest.raises(ValueError, match="init_lora_weights='pissa' is not supported"):
        lora_modules(model)
    assert len(lora_modules(model, any_init=True)) == 4
    rec = compute_lr_recommendation(model, iter(cls_batches(1)), "hessian", n_batches=1, steps=3)
    assert math.isfinite(rec.statistic) and rec.statistic != 0 and rec.passes["forward"] == 1


def test_compute_allocation_falls_back_to_the_range_test_where_double_backward_fails(monkeypatch):
    """TRL's chunked-logprob loss has no double backward (tests/test_readme.py runs the real SFTTrainer); here the
    Hessian-vector product fails as it does there, so the fallback's plumbing is checked on a tiny model."""
    import fimlora

    def no_double_backward(*_):
        raise RuntimeError("mm(): functions with out=... arguments don't support automatic differentiation")

    monkeypatch.setattr(lrmod, "hessian_vector_product", no_double_backward)
    model = lora_bert(r=2, target_modules=["query", "value"])
    batches = cls_batches(3)
    config = fimlora.FimConfig(n_batches=2, lr_rule="hessian", progress=False)
    with pytest.warns(UserWarning, match="lr_rule: 'hessian' failed on calibration batch 0 .*measured with "
                                         "lr_rule='range' instead"):
        alloc = fimlora.compute_allocation(model, batches, config)
    assert alloc.lr["rule"] == "range" and alloc.lr["statistic"] > 0 and alloc.learning_rate > 0
    with pytest.raises(ValueError, match="lr_rule: 'hessian' failed on calibration batch 0"):  # asked directly
        compute_lr_recommendation(model, batches, "hessian")
    # Where the range test fails too, no recommendation, and the rank map as without one.
    monkeypatch.setattr(lrmod, "_range", lambda *a, **k: (_ for _ in ()).throw(ValueError("lr_rule: 'range': x")))
    with pytest.warns(UserWarning, match="no learning rate is recommended"):
        none = fimlora.compute_allocation(model, batches, config)
    assert none.lr is None and none.ranks == alloc.ranks


def test_a_causal_lm_gets_its_own_family_s_constant_and_an_encoder_the_encoder_s(monkeypatch):
    """The Hessian's scale differs by orders of magnitude between a classifier's loss and a next-token loss, so each
    family has its own fitted constant (lr_rule.json); a family without one gets the statistic and no rate."""
    import warnings

    import fimlora.config as config
    from tests.references import lm_batches, lora_llama

    table = copy.deepcopy(lr_rule_table())
    table["rules"]["hessian"]["encoder"].update(constant=0.02, fitted_on="encoders")
    table["rules"]["hessian"]["causal_lm"].update(constant=0.5, fitted_on="decoders")
    monkeypatch.setattr(config, "lr_rule_table", lambda: table)
    rec = compute_lr_recommendation(lora_llama(), lm_batches(n_batches=1), "hessian", steps=3)
    assert lrmod.model_family(lora_llama()) == rec.family == "causal_lm" and rec.fitted_on == "decoders"
    assert rec.learning_rate == pytest.approx(0.5 / rec.statistic) and "causal_lm constant 0.5" in rec.text()
    enc = compute_lr_recommendation(small_bert(False), cls_batches(1), "hessian", n_batches=1, steps=3)
    assert lrmod.model_family(small_bert(False)) == enc.family == "encoder" and enc.fitted_on == "encoders"
    assert enc.learning_rate == pytest.approx(0.02 / enc.statistic)
    # A failed judgement travels with the family's constant: every recommendation of it warns, an encoder's not.
    table["rules"]["hessian"]["causal_lm"]["warning"] = "3x too high on another task"
    with pytest.warns(UserWarning, match="lr_rule: 3x too high on another task"):
        compute_lr_recommendation(lora_llama(), lm_batches(n_batches=1), "hessian", steps=3)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="lr_rule")
        compute_lr_recommendation(small_bert(False), cls_batches(1), "hessian", n_batches=1, steps=3)
    table["rules"]["hessian"]["causal_lm"].update(constant=None, fitted_on=None)
    with warnings.catch_warnings():  # no rate, nothing to warn about
        warnings.filterwarnings("error", message="lr_rule")
        rec = compute_lr_recommendation(lora_llama(), lm_batches(n_batches=1), "hessian", steps=3)
    assert rec.learning_rate is None and "no causal_lm constant for it yet" in rec.text()
    assert LrRecommendation.from_dict({k: v for k, v in rec.to_dict().items() if k != "family"}).family == "encoder"
