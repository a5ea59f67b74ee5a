"""The peer methods of issue 22: rslora, pissa, lora_ga, gora and FIM-LoRA's ranks with their inits.

Each is checked on a tiny seeded model against what the method says it does: the initial output equals the base
output where the init rewrites W (W_res + s B A = W), the scale is the stated one, the ranks equal FIM-LoRA's
where they should, and a save -> stock ``PeftModel.from_pretrained`` onto a fresh, unchanged base gives the
trained model's logits.
"""

from __future__ import annotations

import math

import pytest
import torch

from fimlora.experiments.builders import reload_adapter
from fimlora.experiments.methods import MethodSpec, final_rank_map, prepare_method, save_adapter
from fimlora.modules import base_model_of
from tests.references import cls_batches, llama_base, lm_batches, make_b_nonzero, tiny_bert

TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]


def spec(method, r=4, **kw):
    return MethodSpec(method=method, r=r, lora_alpha=2 * r, target_modules=TARGETS, task_type="CAUSAL_LM", seed=0,
                      fim={"n_batches": 3}, **kw)


def base():
    return llama_base(1, 64, vocab=128)


def data():
    return lm_batches(n_batches=3, batch_size=4, seq=8)


def lora_layers(model):
    from peft.tuners.lora.layer import LoraLayer

    return {n: m for n, m in base_model_of(model).named_modules() if isinstance(m, LoraLayer)}


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def assert_reload_gives_trained_model(model, batches, make_base, tmp_path):
    """Train a little, save as the harness does, reload onto a fresh (unchanged) base: same logits."""
    from fimlora.experiments.methods import mutates_base

    initial = tmp_path / "initial_adapter" if mutates_base(model) else None
    if initial is not None:
        model.save_pretrained(initial)
    make_b_nonzero(model, batches, steps=2, lr=0.05)
    want = logits(model, batches[0])
    save_adapter(model, tmp_path / "adapter", initial)
    got = logits(reload_adapter(make_base(), tmp_path / "adapter"), batches[0])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def assert_w_res_plus_sba_is_w(model, fresh):
    """Every module: W_res + s B A equals the original W (PiSSA's and LoRA-GA's invariant)."""
    original = dict(fresh.named_modules())
    for name, layer in lora_layers(model).items():
        a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        assert torch.count_nonzero(b) > 0, name
        w_res = layer.get_base_layer().weight.double()
        s = layer.scaling["default"]
        torch.testing.assert_close(w_res + s * b @ a, original[name].weight.double(), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- rslora


def test_rslora_scales_every_module_by_alpha_over_sqrt_r(tmp_path):
    model, info, _ = prepare_method(spec("rslora"), base(), None)
    layers = lora_layers(model)
    assert layers and all(m.scaling["default"] == pytest.approx(8 / math.sqrt(4)) for m in layers.values())
    assert model.peft_config["default"].use_rslora is True
    assert_reload_gives_trained_model(model, data(), base, tmp_path)


def test_fim_rslora_has_fim_ranks_and_rslora_scales():
    batches = data()
    fim, fim_info, _ = prepare_method(spec("fim"), base(), lambda: list(batches))
    model, info, _ = prepare_method(spec("fim_rslora"), base(), lambda: list(batches))
    ranks = final_rank_map(model, "fim_rslora")
    assert len(set(ranks.values())) > 1, "test needs a non-uniform FIM pattern"
    # At uniform rank the rsLoRA scale differs from alpha/r by one factor for every module, so the Fisher
    # ordering, and the ranks, are FIM-LoRA's.
    assert ranks == final_rank_map(fim, "fim")
    for name, layer in lora_layers(model).items():
        r_m = ranks[name]
        alpha_m = 8 * math.sqrt(r_m / 4)  # fim scale "preserve" under rsLoRA
        assert layer.scaling["default"] == pytest.approx(alpha_m / math.sqrt(r_m)) == pytest.approx(8 / 2)


# ----------------------------------------------------------------------------- pissa


def test_pissa_keeps_the_base_output_and_reloads_as_plain_lora(tmp_path):
    batches = data()
    model, info, _ = prepare_method(spec("pissa"), base(), None)
    assert info["init_lora_weights"] == "pissa"
    torch.testing.assert_close(logits(model, batches[0]), logits(base(), batches[0]), atol=1e-5, rtol=0)
    assert_w_res_plus_sba_is_w(model, base())
    # A and B are the top-r singular triplets: s B A is the best rank-r approximation of W.
    for name, layer in lora_layers(model).items():
        w = dict(base().named_modules())[name].weight.double()
        s = layer.scaling["default"]
        sba = s * layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()
        u, sv, vh = torch.linalg.svd(w, full_matrices=False)
        torch.testing.assert_close(sba, u[:, :4] @ torch.diag(sv[:4]) @ vh[:4], atol=1e-5, rtol=0)
    assert_reload_gives_trained_model(model, batches, base, tmp_path)


def test_pissa_niter_takes_peft_s_fast_svd():
    model, info, _ = prepare_method(spec("pissa", pissa={"niter": 4}), base(), None)
    assert info["init_lora_weights"] == "pissa_niter_4"
    assert_w_res_plus_sba_is_w(model, base())


def test_pissa_reload_keeps_a_classifier_head(tmp_path):
    """PEFT 0.21.2's PiSSA->LoRA conversion writes only LoRA tensors; the head (modules_to_save) must come back."""
    batches = cls_batches(n_batches=2)
    s = MethodSpec(method="pissa", r=2, lora_alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS", seed=0)
    model, _, _ = prepare_method(s, tiny_bert(0), None)
    assert_reload_gives_trained_model(model, batches, lambda: tiny_bert(0), tmp_path)


def test_save_adapter_refuses_a_rewritten_base_without_its_initial_adapter(tmp_path):
    model, _, _ = prepare_method(spec("pissa"), base(), None)
    with pytest.raises(ValueError, match="initial_directory: .*'pissa'"):
        save_adapter(model, tmp_path / "adapter")


def test_fim_pissa_has_fim_ranks_and_pissa_init(tmp_path):
    batches = data()
    fim, fim_info, _ = prepare_method(spec("fim"), base(), lambda: list(batches))
    model, info, _ = prepare_method(spec("fim_pissa"), base(), lambda: list(batches))
    assert final_rank_map(model, "fim_pissa") == final_rank_map(fim, "fim") == info["allocated_ranks"]
    assert info["scores"] == fim_info["scores"]
    torch.testing.assert_close(logits(model, batches[0]), logits(base(), batches[0]), atol=1e-5, rtol=0)
    assert_w_res_plus_sba_is_w(model, base())
    assert_reload_gives_trained_model(model, batches, base, tmp_path)


# ----------------------------------------------------------------------------- lora_ga


def reference_mean_gradient(batches):
    """(1/N) sum_b dL_b/dW for every target weight of a fresh base, by plain autograd (one backward per batch)."""
    model = base().train()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in TARGETS]
    weights = [model.get_submodule(n).weight for n in names]
    acc = [torch.zeros_like(w, dtype=torch.float64) for w in weights]
    for batch in batches:
        for a, g in zip(acc, torch.autograd.grad(model(**batch).loss, weights)):
            a += g.double()
    return {n: a / len(batches) for n, a in zip(names, acc)}


def test_lora_ga_keeps_the_base_output_aligns_with_the_gradient_and_reloads(tmp_path):
    batches = data()
    model, info, _ = prepare_method(spec("lora_ga"), base(), lambda: list(batches))
    assert info["lora_ga_batches"] == len(batches)
    torch.testing.assert_close(logits(model, batches[0]), logits(base(), batches[0]), atol=1e-5, rtol=0)
    assert_w_res_plus_sba_is_w(model, base())
    grads = reference_mean_gradient(batches)
    for name, layer in lora_layers(model).items():
        # ArB2r: A's rows are the gradient's top-r right singular vectors (up to sign and the randomised SVD).
        a = layer.lora_A["default"].weight.double()
        _, _, vh = torch.linalg.svd(grads[name], full_matrices=False)
        top = vh[:4]
        captured = torch.linalg.matrix_norm(a @ top.T) ** 2 / torch.linalg.matrix_norm(a) ** 2
        assert captured > 0.99, (name, float(captured))
    assert_reload_gives_trained_model(model, batches, base, tmp_path)
