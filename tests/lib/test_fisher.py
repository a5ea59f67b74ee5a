"""Fisher scores against brute-force autograd, and the model left exactly as it was."""

from __future__ import annotations

import pytest
import torch

import fimlora
from fimlora import FimConfig, compute_fisher, compute_scores
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


def test_scores_aggregations_match_definitions():
    model = lora_llama()
    res = compute_fisher(model, lm_batches(), FimConfig(n_batches=2, progress=False))
    for agg, fn in [("mean", lambda f: f.double().mean()), ("max", lambda f: f.double().max()),
                    ("l2", lambda f: f.double().pow(2).sum().sqrt())]:
        scores = compute_scores(res, agg)
        for n, f in res.fisher.items():
            assert scores[n] == pytest.approx(float(fn(f)), rel=1e-9)


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

    return [
        ("no labels", lambda: (no_labels(), None, FimConfig(n_batches=2, progress=False)), r"batch: .*no labels"),
        ("empty", lambda: ([], None, FimConfig(n_batches=2, progress=False)), r"dataloader: yielded no batches"),
        ("nan", lambda: (cls_batches(), nan_loss, FimConfig(n_batches=2, progress=False)),
         r"non-finite gradient in module 'bert\.encoder\.layer\.0\.attention\.self\.query' at batch 0"),
        ("nan per-example", lambda: (cls_batches(), nan_loss, FimConfig(n_batches=2, estimator="per_example",
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("estimator", ["batch", "per_example"])
def test_low_precision_models(dtype, estimator):
    ref_model = lora_llama()
    ref = compute_scores(compute_fisher(ref_model, lm_batches(), FimConfig(n_batches=2, estimator=estimator,
                                                                           progress=False)))
    model = lora_llama().to(dtype)
    res = compute_fisher(model, lm_batches(), FimConfig(n_batches=2, estimator=estimator, progress=False))
    assert all(f.dtype == torch.float32 and torch.isfinite(f).all() for f in res.fisher.values())
    got = compute_scores(res)
    for n in ref:
        assert got[n] == pytest.approx(ref[n], rel=0.15), n


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
