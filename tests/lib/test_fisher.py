"""Fisher scores against brute-force autograd, and the model left exactly as it was."""

from __future__ import annotations

import warnings

import pytest
import torch

import fimlora
from fimlora import FimConfig, compute_fisher, compute_scores
from fimlora.estimators import (
    batch_gradient_t,
    batch_squared_grad,
    make_estimator,
    per_example_multiplier,
    per_example_squared_grad_sum,
)
from fimlora.modules import lora_modules
from tests.references import (
    assert_fisher_close,
    b_weights,
    cls_batches,
    lm_batches,
    lora_bert,
    lora_llama,
    reference_batch_fisher,
    reference_per_example_fisher,
)


@pytest.mark.parametrize("make, batches", [(lora_bert, cls_batches), (lora_llama, lm_batches)])
def test_batch_estimator_equals_autograd(make, batches):
    model, data = make(), batches()
    ref = reference_batch_fisher(model, data)
    got = compute_fisher(model, data, FimConfig(n_batches=3, progress=False)).fisher
    assert all(f.dtype == torch.float32 for f in got.values())
    assert all(got[n].shape == b_weights(model)[n].shape for n in got)
    assert any(f.abs().sum() > 0 for f in got.values())
    assert_fisher_close(got, ref)


@pytest.mark.parametrize("make, batches", [(lora_bert, cls_batches), (lora_llama, lm_batches)])
def test_per_example_estimator_equals_single_example_loop(make, batches):
    model, data = make(), batches()
    ref = reference_per_example_fisher(model, data)
    res = compute_fisher(model, data, FimConfig(n_batches=3, estimator="per_example", progress=False))
    assert set(res.n_examples.values()) == {12}
    assert_fisher_close(res.fisher, ref)
    # and it is not the batch estimator in disguise
    batch = compute_fisher(model, data, FimConfig(n_batches=3, progress=False)).fisher
    name = next(iter(ref))
    assert not torch.allclose(batch[name], res.fisher[name], rtol=1e-2, atol=0)


def test_per_example_sum_reduction():
    model = lora_bert()
    data = cls_batches()
    ref = reference_per_example_fisher(model, data)

    def sum_loss(m, b):
        return m(**b).loss * b["input_ids"].shape[0]

    got = compute_fisher(model, data, FimConfig(n_batches=3, estimator="per_example", loss_reduction="sum",
                                                progress=False), loss_fn=sum_loss).fisher
    assert_fisher_close(got, ref)


def example_losses(y, target):
    """l_n for a batch of LoRA-B outputs y (n, ..., d_out): non-linear so G_n differs from the batch mean."""
    return (torch.tanh(y) * target).reshape(y.shape[0], -1).sum(1) ** 2


@pytest.mark.parametrize("tokens", [None, 5], ids=["no-token-dim", "5-tokens"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_per_example_squared_grad_sum_equals_autograd_loop(tokens, reduction):
    torch.manual_seed(0)
    n, r, d_out, scale = 4, 3, 6, 8.0
    lin = torch.nn.Linear(r, d_out, bias=False)  # plays LoRA-B: W is B, shape (d_out, r)
    shape = (n, r) if tokens is None else (n, tokens, r)
    h = torch.randn(shape)
    target = torch.randn(shape[:-1] + (d_out,))
    y = lin(h)
    losses = example_losses(y, target)
    loss = losses.mean() if reduction == "mean" else losses.sum()
    grad_out, g_scaled = torch.autograd.grad(loss * scale, [y, lin.weight], retain_graph=True)
    (g_batch,) = torch.autograd.grad(loss, lin.weight)
    got = per_example_squared_grad_sum(h, grad_out, per_example_multiplier(n, reduction, scale))
    ref = torch.zeros(d_out, r, dtype=torch.float64)
    for i in range(n):  # one backward per example: dl_i/dB
        (g,) = torch.autograd.grad(example_losses(lin(h[i : i + 1]), target[i : i + 1]).sum(), lin.weight)
        ref += g.double() ** 2
    assert got.shape == (r, d_out) and got.dtype == torch.float32
    torch.testing.assert_close(got.t().double(), ref, rtol=1e-5, atol=0)
    # the batch term is the square of the *mean* (or sum) gradient, not the per-example sum
    torch.testing.assert_close(batch_squared_grad(g_scaled, scale), g_batch**2, rtol=1e-6, atol=0)
    assert not torch.allclose(g_batch.double() ** 2, ref, rtol=0.1)


@pytest.mark.parametrize("tokens", [None, 5], ids=["no-token-dim", "5-tokens"])
def test_batch_gradient_from_activations_equals_autograd(tokens):
    """sum over examples and positions of dL/dy h^T is dL/dB, whatever the loss couples across positions."""
    torch.manual_seed(0)
    n, r, d_out = 4, 3, 6
    lin = torch.nn.Linear(r, d_out, bias=False)
    shape = (n, r) if tokens is None else (n, tokens, r)
    h = torch.randn(shape)
    y = lin(h)
    loss = example_losses(y, torch.randn(shape[:-1] + (d_out,))).mean()
    grad_out, g = torch.autograd.grad(loss, [y, lin.weight])
    got = batch_gradient_t(h, grad_out)
    assert got.shape == (r, d_out) and got.dtype == torch.float32
    torch.testing.assert_close(got.t(), g, rtol=1e-6, atol=1e-7)


def hooked_batch_fisher(monkeypatch, model, data, loss_fn=None, n_batches=3):
    """The batch estimator as an FSDP2-sharded model gets it (from LoRA-B hooks), here on a whole model."""
    import fimlora.fisher

    with monkeypatch.context() as m:
        m.setattr(fimlora.fisher, "is_fsdp2_sharded", lambda model: True)
        return compute_fisher(model, data, FimConfig(n_batches=n_batches, progress=False), loss_fn=loss_fn).fisher


@pytest.mark.parametrize("make, batches", [(lora_bert, cls_batches), (lora_llama, lm_batches)])
def test_hooked_batch_estimator_equals_autograd(monkeypatch, make, batches):
    model, data = make(), batches()
    ref = reference_batch_fisher(model, data)
    grads_before = [p.grad for p in model.parameters()]
    got = hooked_batch_fisher(monkeypatch, model, data)
    assert [p.grad for p in model.parameters()] == grads_before
    assert_fisher_close(got, ref, rtol=1e-5)


def test_hooked_batch_estimator_sums_calls_before_squaring(monkeypatch):
    """Two calls of every module in one forward: g_b = g_call1 + g_call2, squared once (as B.grad has it)."""
    model = lora_llama()
    ref = compute_fisher(model, lm_batches(), FimConfig(n_batches=2, progress=False), loss_fn=twice_loss).fisher
    got = hooked_batch_fisher(monkeypatch, model, lm_batches(), loss_fn=twice_loss, n_batches=2)
    assert_fisher_close(got, {n: v.double() for n, v in ref.items()}, rtol=1e-5)
    per_call = hooked_batch_fisher(monkeypatch, model, lm_batches(), n_batches=2)
    name = next(iter(ref))
    assert not torch.allclose(got[name], 2 * per_call[name], rtol=1e-2)  # (2g)^2 = 4 g^2, not 2 g^2


@pytest.mark.parametrize("reentrant", [False, True])
def test_hooked_batch_estimator_under_gradient_checkpointing(monkeypatch, reentrant):
    ref = reference_batch_fisher(lora_llama(), lm_batches(n_batches=2))
    model = lora_llama()
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    got = hooked_batch_fisher(monkeypatch, model, lm_batches(n_batches=2), n_batches=2)
    assert_fisher_close(got, ref, rtol=1e-5)


def test_unknown_estimator_is_rejected():
    model = lora_llama()
    with pytest.raises(ValueError, match=r"estimator: must be one of \['batch', 'per_example'\], got 'exact'"):
        make_estimator("exact", lora_modules(model), "default", 1.0, "mean")


def twice_loss(m, b):
    return m(**b).loss + m(**b).loss


def first_layer_loss(m, b):
    inputs = {k: v for k, v in b.items() if k != "labels"}
    return m(**inputs, output_hidden_states=True).hidden_states[1].pow(2).mean()


def test_module_run_twice_warns_for_per_example_only():
    model = lora_llama()
    with pytest.warns(UserWarning, match=r"14 LoRA module\(s\) ran more than once .*counts each call") as rec:
        res = compute_fisher(model, lm_batches(), FimConfig(n_batches=2, estimator="per_example", progress=False),
                             loss_fn=twice_loss)
    assert {w.filename for w in rec if "more than once" in str(w.message)} == {__file__}  # points at the caller
    assert set(res.n_examples.values()) == {16}  # 2 batches * 4 examples * 2 calls
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compute_fisher(model, lm_batches(), FimConfig(n_batches=2, progress=False), loss_fn=twice_loss)


@pytest.mark.parametrize("estimator", ["batch", "per_example"])
def test_modules_off_the_loss_path_warn_and_score_zero(estimator):
    model = lora_llama()
    with pytest.warns(UserWarning, match=r"7 LoRA module\(s\) received no gradient .*model\.layers\.1\.") as rec:
        res = compute_fisher(model, lm_batches(), FimConfig(n_batches=2, estimator=estimator, progress=False),
                             loss_fn=first_layer_loss)
    assert {w.filename for w in rec if "no gradient" in str(w.message)} == {__file__}
    for name, f in res.fisher.items():
        assert (torch.count_nonzero(f) == 0) == name.startswith("model.layers.1."), name


def test_scores_aggregations_match_definitions():
    model = lora_llama()
    res = compute_fisher(model, lm_batches(), FimConfig(n_batches=2, progress=False))
    for agg, fn in [("mean", lambda f: f.double().mean()), ("max", lambda f: f.double().max()),
                    ("l2", lambda f: f.double().pow(2).sum().sqrt())]:
        scores = compute_scores(res, agg)
        for n, f in res.fisher.items():
            assert scores[n] == pytest.approx(float(fn(f)), rel=1e-9, abs=0)


def model_state(model):
    return {
        "modes": [m.training for m in model.modules()],
        "requires": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "grads": [(n, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()],
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "hooks": sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules()),
        "config": (dict(model.peft_config["default"].rank_pattern), dict(model.peft_config["default"].alpha_pattern)),
    }


def assert_same_state(a, b):
    assert a["modes"] == b["modes"]
    assert a["requires"] == b["requires"]
    assert a["hooks"] == b["hooks"]
    assert a["config"] == b["config"]
    for (n1, g1), (n2, g2) in zip(a["grads"], b["grads"]):
        assert n1 == n2 and (g1 is None) == (g2 is None), n1
        if g1 is not None:
            assert torch.equal(g1, g2)
    for n in a["params"]:
        assert torch.equal(a["params"][n], b["params"][n]), n


@pytest.mark.parametrize("estimator", ["batch", "per_example"])
@pytest.mark.parametrize("train", [True, False])
def test_model_restored_after_calibration(estimator, train):
    model = lora_bert()
    model.train(train)
    model.base_model.model.classifier.train(not train)  # a mixed mode must survive too
    some = next(p for n, p in model.named_parameters() if "lora_A" in n)
    some.grad = torch.ones_like(some)  # pre-existing .grad must survive
    before = model_state(model)
    compute_fisher(model, cls_batches(), FimConfig(n_batches=2, estimator=estimator, progress=False))
    assert_same_state(before, model_state(model))


def test_only_b_requires_grad_during_calibration():
    model = lora_llama()
    seen = []

    def loss_fn(m, b):
        seen.append(sorted(n for n, p in m.named_parameters() if p.requires_grad))
        seen.append(m.training)
        return m(**b).loss

    compute_fisher(model, lm_batches(), FimConfig(n_batches=1, progress=False), loss_fn=loss_fn)
    names, training = seen
    assert names and all(".lora_B." in n for n in names)
    assert len(names) == 14
    assert training is False


def bad_input_cases():
    def no_labels():
        return [{k: v for k, v in b.items() if k != "labels"} for b in cls_batches()]

    def nan_loss(m, b):
        return m(**b).loss * float("nan")

    def nan_gradient(m, b):  # a finite loss whose gradient is NaN: d sqrt(x)/dx at 0 is inf, times 0
        out = m(**b)
        return out.loss + torch.sqrt(out.logits.sum() * 0.0)

    return [
        ("no labels", lambda: (no_labels(), None, FimConfig(n_batches=2, progress=False)), r"batch: .*no labels"),
        ("empty", lambda: ([], None, FimConfig(n_batches=2, progress=False)), r"dataloader: yielded no batches"),
        ("nan loss", lambda: (cls_batches(), nan_loss, FimConfig(n_batches=2, progress=False)),
         r"batch 0: the loss itself is non-finite \(loss=nan\)"),
        ("nan", lambda: (cls_batches(), nan_gradient, FimConfig(n_batches=2, progress=False)),
         r"non-finite gradient in module 'bert\.encoder\.layer\.0\.attention\.self\.query' at batch 0"),
        ("nan per-example", lambda: (cls_batches(), nan_gradient, FimConfig(n_batches=2, estimator="per_example",
                                                                            progress=False)),
         r"non-finite gradient in module .* at batch 0"),
        ("budget", lambda: (cls_batches(), None, FimConfig(n_batches=2, r_min=8, progress=False)),
         r"budget: infeasible, L\*r_min > budget: 13 modules \* r_min=8 = 104 > budget=52"),
        ("adapter", lambda: (cls_batches(), None, FimConfig(adapter_name="nope", progress=False)),
         r"adapter_name: no adapter named 'nope'"),
    ]


@pytest.mark.parametrize("case", bad_input_cases(), ids=lambda c: c[0])
def test_bad_input_clear_error_model_unchanged(case):
    _, make, pattern = case
    model = lora_bert()
    data, loss_fn, cfg = make()
    before = model_state(model)
    with pytest.raises(ValueError, match=pattern):
        fimlora.apply_fim_ranks(model, data, config=cfg, loss_fn=loss_fn)
    assert_same_state(before, model_state(model))


def test_model_without_lora_is_rejected():
    from tests.references import tiny_bert

    with pytest.raises(TypeError, match="model: expected a peft.PeftModel"):
        fimlora.apply_fim_ranks(tiny_bert(), cls_batches())


def test_short_dataloader_warns_and_uses_what_it_has():
    model = lora_bert()
    with pytest.warns(UserWarning, match="yielded only 2 batches"):
        res = compute_fisher(model, cls_batches(2), FimConfig(n_batches=5, progress=False))
    assert res.n_batches == 2


def test_config_validation_names_field():
    with pytest.raises(ValueError, match=r"estimator: must be one of \['batch', 'per_example'\], got 'exact'"):
        FimConfig(estimator="exact")
    with pytest.raises(ValueError, match=r"n_batches: must be >= 1, got 0"):
        FimConfig(n_batches=0)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("estimator", ["batch", "per_example"])
def test_gradient_checkpointing_gives_same_scores_and_is_active(estimator, reentrant):
    plain = lora_llama()
    ref = compute_fisher(plain, lm_batches(), FimConfig(n_batches=2, estimator=estimator, progress=False)).fisher
    model = lora_llama()
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    layer = model.base_model.model.model.layers[0]
    assert layer.gradient_checkpointing
    modes = [m.training for m in model.modules()]
    calls = []
    orig = layer._gradient_checkpointing_func
    layer._gradient_checkpointing_func = lambda *a, **k: (calls.append(1), orig(*a, **k))[1]
    got = compute_fisher(model, lm_batches(), FimConfig(n_batches=2, estimator=estimator, progress=False)).fisher
    assert calls, "checkpointing was not used during calibration"
    assert [m.training for m in model.modules()] == modes
    assert_fisher_close(got, {n: v.double() for n, v in ref.items()}, rtol=1e-5)


def scaled_down_loss(model, batch):
    # Small enough that many fp16 gradients of LoRA-B fall below fp16's smallest subnormal without a loss scale.
    return model(**batch).loss * 1e-3


def low_precision_scores(dtype, estimator, loss_scale=None):
    """(scores of the fp32 model, Fisher and scores of the same model cast to ``dtype``) with the small loss."""
    ref = compute_scores(compute_fisher(lora_llama(), lm_batches(), FimConfig(n_batches=2, estimator=estimator,
                                                                              progress=False),
                                        loss_fn=scaled_down_loss))
    res = compute_fisher(lora_llama().to(dtype), lm_batches(),
                         FimConfig(n_batches=2, estimator=estimator, loss_scale=loss_scale, progress=False),
                         loss_fn=scaled_down_loss)
    return ref, res, compute_scores(res)


def assert_fp32_buffers_and_scores_near(ref, res, got, rel):
    assert all(f.dtype == torch.float32 and torch.isfinite(f).all() for f in res.fisher.values())
    for n in ref:
        assert got[n] == pytest.approx(ref[n], rel=rel, abs=0), n


@pytest.mark.parametrize("estimator", ["batch", "per_example"])
def test_fp16_default_loss_scale_avoids_underflow(estimator):
    ref, res, got = low_precision_scores(torch.float16, estimator)
    # measured: at most 0.4% off fp32 with the default scale of 1024 (fp16 rounding of the forward)
    assert_fp32_buffers_and_scores_near(ref, res, got, rel=0.02)
    # ... and without it whole modules flush to zero
    _, unscaled, got_unscaled = low_precision_scores(torch.float16, estimator, loss_scale=1.0)
    assert any(torch.count_nonzero(f) == 0 for f in unscaled.fisher.values())
    assert max(abs(got_unscaled[n] - ref[n]) / ref[n] for n in ref) > 0.5


@pytest.mark.parametrize("estimator", ["batch", "per_example"])
def test_bf16_model_scores_close_to_fp32(estimator):
    ref, res, got = low_precision_scores(torch.bfloat16, estimator)
    # measured: at most 0.7% off (bf16 keeps 8 significant bits, and fp32's exponent range: no underflow)
    assert_fp32_buffers_and_scores_near(ref, res, got, rel=0.05)


def test_train_mode_with_zero_dropout_matches_eval():
    model = lora_llama()  # lora_dropout 0 and llama has no dropout by default
    a = compute_fisher(model, lm_batches(), FimConfig(n_batches=2, progress=False)).fisher
    b = compute_fisher(model, lm_batches(), FimConfig(n_batches=2, train_mode=True, progress=False)).fisher
    assert_fisher_close(b, {n: v.double() for n, v in a.items()}, rtol=1e-6)


def test_train_mode_uses_dropout():
    model = lora_bert()  # dropout 0.1
    torch.manual_seed(0)
    a = compute_fisher(model, cls_batches(), FimConfig(n_batches=2, train_mode=True, progress=False)).fisher
    b = compute_fisher(model, cls_batches(), FimConfig(n_batches=2, progress=False)).fisher
    name = next(iter(a))
    assert not torch.allclose(a[name], b[name], atol=0)


# ----------------------------------------------------------------------------- issue 20 (C): a loss that says nothing


def masked(batches, which=None):
    """The batches with every label of batch ``which`` (all batches when None) set to -100."""
    out = []
    for i, b in enumerate(batches):
        b = dict(b)
        if which is None or i == which:
            b["labels"] = torch.full_like(b["labels"], -100)
        out.append(b)
    return out


@pytest.mark.parametrize("which", [None, 1])
def test_every_label_masked_is_a_non_finite_loss_error(which):
    model = lora_llama()
    before = model_state(model)
    batch = 0 if which is None else which
    with pytest.raises(ValueError, match=rf"batch {batch}: the loss itself is non-finite \(loss=nan\).*every label "
                                         r"masked \(-100\)"):
        fimlora.apply_fim_ranks(model, masked(lm_batches(), which), n_batches=3, progress=False)
    assert_same_state(before, model_state(model))


def test_huge_regression_labels_blame_the_loss_not_the_loss_scale():
    from peft import LoraConfig, get_peft_model

    from tests.references import tiny_bert

    model = get_peft_model(tiny_bert(num_labels=1), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    batches = cls_batches(num_labels=2)
    for b in batches:
        b["labels"] = torch.full(b["labels"].shape, 1e30)
    before = model_state(model)
    with pytest.raises(ValueError, match=r"batch 0: the loss itself is non-finite \(loss=inf\)") as err:
        fimlora.apply_fim_ranks(model, batches, n_batches=2, progress=False)
    assert "lower loss_scale" not in str(err.value)
    assert_same_state(before, model_state(model))


def test_an_all_zero_fisher_is_an_error():
    model = lora_llama()
    before = model_state(model)
    with pytest.raises(ValueError, match=r"fisher: every module's score is 0 after 2 batches"):
        fimlora.apply_fim_ranks(model, lm_batches(), n_batches=2, progress=False,
                                loss_fn=lambda m, b: m(**b).logits.sum() * 0.0)
    assert_same_state(before, model_state(model))


# ----------------------------------------------------------------------------- issue 20 (H4): hooked path, loss_scale


def test_hooked_batch_estimator_undoes_the_loss_scale(monkeypatch):
    import fimlora.fisher
    from fimlora.estimators import HookedBatchEstimator

    made = []
    real = fimlora.fisher.make_estimator
    monkeypatch.setattr(fimlora.fisher, "make_estimator", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    monkeypatch.setattr(fimlora.fisher, "is_fsdp2_sharded", lambda model: True)
    model, data = lora_llama(), lm_batches()
    ref = reference_batch_fisher(model, data)
    for scale in (1.0, 1024.0):
        got = compute_fisher(model, data, FimConfig(n_batches=3, loss_scale=scale, progress=False)).fisher
        assert isinstance(made[-1], HookedBatchEstimator) and made[-1].loss_scale == scale
        assert_fisher_close(got, ref, rtol=1e-5)
