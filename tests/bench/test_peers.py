"""The peer methods of issue 22: rslora, pissa, lora_ga, gora and FIM-LoRA's ranks with their inits.

Each is checked on a tiny seeded model against what the method says it does: the initial output equals the base
output where the init rewrites W (W_res + s B A = W), the scale is the stated one, the ranks equal FIM-LoRA's
where they should, and a save -> stock ``PeftModel.from_pretrained`` onto a fresh, unchanged base gives the
trained model's logits.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from fimlora.app.builders import reload_adapter
from fimlora.bench.gora import gora_b, gora_importance, gora_rank_bounds, gora_ranks
from fimlora.bench.methods import MethodSpec, final_rank_map, prepare_method, save_adapter
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
    from fimlora.bench.methods import mutates_base

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


def test_lora_ga_with_all_linear_targets_every_linear_layer():
    """PEFT's preprocess_loraga matched "all-linear" literally and found no layer (every LoRA-GA run of an
    all-linear suite failed); expanded first, it adapts exactly what a plain all-linear adapter adapts."""
    from dataclasses import replace

    batches = data()
    s = replace(spec("lora_ga"), target_modules="all-linear")
    model, _, _ = prepare_method(s, base(), lambda: list(batches))
    plain, _, _ = prepare_method(replace(spec("lora"), target_modules="all-linear"), base(), lambda: list(batches))
    assert sorted(lora_layers(model)) == sorted(lora_layers(plain)) and len(lora_layers(model)) == 7
    torch.testing.assert_close(logits(model, batches[0]), logits(base(), batches[0]), atol=1e-5, rtol=0)


def test_fim_lora_ga_has_fim_ranks_lora_ga_init_and_reloads_as_plain_lora(tmp_path):
    """LoRA-GA at FIM-LoRA's ranks: a rank_pattern/alpha_pattern adapter (no rsLoRA) whose PEFT conversion to plain
    LoRA doubles every rank and alpha; the reload onto the unchanged base gives the trained model."""
    batches = data()
    fim, fim_info, _ = prepare_method(spec("fim"), base(), lambda: list(batches))
    model, info, _ = prepare_method(spec("fim_lora_ga", lora_ga={"n_batches": 2}), base(), lambda: list(batches))
    ranks = final_rank_map(model, "fim_lora_ga")
    assert len(set(ranks.values())) > 1, "test needs a non-uniform FIM pattern"
    assert ranks == final_rank_map(fim, "fim") == info["allocated_ranks"] and info["scores"] == fim_info["scores"]
    assert info["lora_ga_batches"] == 2 and info["init_lora_weights"] == "lora_ga"
    assert model.peft_config["default"].rank_pattern and not model.peft_config["default"].use_rslora
    torch.testing.assert_close(logits(model, batches[0]), logits(base(), batches[0]), atol=1e-5, rtol=0)
    assert_w_res_plus_sba_is_w(model, base())
    grads = reference_mean_gradient(batches[:2])
    for name, layer in lora_layers(model).items():
        r_m = ranks[name]
        assert layer.scaling["default"] == pytest.approx(8 / 4)  # fim scale "preserve": alpha_m / r_m = alpha / r
        # ArB2r at the module's own rank: A's rows lie in the top-r_m right singular vectors of G.
        a = layer.lora_A["default"].weight.double()
        assert a.shape[0] == r_m
        top = torch.linalg.svd(grads[name], full_matrices=False)[2][:r_m]
        captured = torch.linalg.matrix_norm(a @ top.T) ** 2 / torch.linalg.matrix_norm(a) ** 2
        assert captured > 0.99, (name, r_m, float(captured))
    assert_reload_gives_trained_model(model, batches, base, tmp_path)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True
    assert saved["rank_pattern"] == {k: 2 * r for k, r in model.peft_config["default"].rank_pattern.items()}


@pytest.mark.parametrize("method", ["lora_ga", "fim_lora_ga"])
def test_lora_ga_refuses_up_front_a_rank_above_half_the_smaller_side(method):
    """LoRA-GA needs the gradient's top 2 r_m singular vectors: at r_m = 33 > 64 / 2 PEFT sliced too few columns
    and failed on a shape mismatch; refused first, naming the module. fim_lora_ga's ranks come from FIM-LoRA (r_max
    48 lets one module get 2 r_m > 64)."""
    batches = data()
    from dataclasses import replace

    s = spec(method, r=33) if method == "lora_ga" else replace(spec(method, r=24), fim={"n_batches": 3, "r_max": 48})
    with pytest.raises(ValueError, match=r"lora_ga: LoRA-GA needs 2 r <= min\(d_out, d_in\).* has r = \d+ and weight "
                                         r"shape \((\d+, 64|64, \d+)\)"):
        prepare_method(s, base(), lambda: list(batches))


# ----------------------------------------------------------------------------- gora


def test_gora_importance_is_the_mean_absolute_product_of_weight_and_gradient():
    w = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]])
    g = torch.tensor([[0.5, 0.25, -4.0], [-1.0, 7.0, 2.0]])
    total = 0.0
    for i in range(2):
        for j in range(3):
            total += abs(float(w[i, j]) * float(g[i, j]))
    assert gora_importance(w, g) == pytest.approx(total / 6)  # (0.5 + 0.5 + 2 + 3 + 0 + 2) / 6


def test_gora_ranks_split_the_parameter_budget_by_normalised_importance_then_clamp():
    # T = (4 + 4 + 8) * 2 = 32; p = 6/8, 1/8, 1/8 -> round(T p) = 24, 4, 4 -> // f = 6, 1, 0 -> clamp [1, 8]
    ranks = gora_ranks({"a": 6.0, "b": 1.0, "c": 1.0}, {"a": 4, "b": 4, "c": 8}, r=2, r_min=1, r_max=8)
    assert ranks == {"a": 6, "b": 1, "c": 1}
    assert gora_ranks({"a": 6.0, "b": 1.0, "c": 1.0}, {"a": 4, "b": 4, "c": 8}, r=2, r_min=1, r_max=4)["a"] == 4
    # round is Python's (half to even): T p = 2.5 -> 2, so 2 // 1 = 2 and 7.5 -> 8
    assert gora_ranks({"a": 1.0, "b": 3.0}, {"a": 1, "b": 1}, r=5, r_min=0, r_max=99) == {"a": 2, "b": 8}
    assert gora_rank_bounds(8) == (4, 32) and gora_rank_bounds(1) == (1, 4)
    with pytest.raises(ValueError, match="gora: importances must have a positive sum"):
        gora_ranks({"a": 0.0}, {"a": 4}, r=2, r_min=1, r_max=4)


def test_gora_b_is_the_reference_code_s_compress_init():
    """GoRA's L170-182 written out literally (scale_by_lr, rank_stablize, dynamic_scaling), in float64."""
    g = torch.Generator().manual_seed(0)
    a, grad = torch.randn(2, 5, generator=g), torch.randn(3, 5, generator=g)
    alpha, lr, r, d_in = 4.0, 0.05, 2, 5
    scale_rank = math.sqrt(r)  # dynamic scaling (real rank), rank_stablize (sqrt)
    s = alpha / scale_rank
    a64 = a.double()
    aat_inv = torch.linalg.pinv(a64 @ a64.T + 1e-8 * torch.eye(r, dtype=torch.float64))
    stable_gemma = (lr / math.sqrt(r / d_in)) * scale_rank
    want = grad.double() @ (a64.T @ aat_inv) * (stable_gemma / alpha)
    b = gora_b(grad, a, s, lr, sign="ascent")  # the code's line, +G
    torch.testing.assert_close(b.double(), want, atol=1e-5, rtol=1e-5)
    # the paper's (default): s B A = -eta sqrt(d_in / r) G A^+ A, a descent step projected onto A's row space
    proj = a64.T @ torch.linalg.inv(a64 @ a64.T) @ a64
    torch.testing.assert_close(s * gora_b(grad, a, s, lr).double() @ a64,
                               -lr * math.sqrt(d_in / r) * grad.double() @ proj, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"sign: must be one of \('descent', 'ascent'\), got 'down'"):
        gora_b(grad, a, s, lr, sign="down")


def test_gora_descent_init_lowers_the_calibration_loss_and_ascent_raises_it():
    """The sign in use: GoRA's initial adapter is a small step on the mean calibration gradient, so to first order
    it moves the mean calibration loss down (descent) or up (ascent) from the base model's."""
    batches = data()

    def mean_loss(model):
        with torch.no_grad():
            return sum(float(model(**b).loss) for b in batches[:2]) / 2

    start = mean_loss(base())
    losses = {}
    for sign in ("descent", "ascent"):
        model, _, _ = prepare_method(spec("gora", gora={"n_batches": 2, "lr": 0.01, "sign": sign}), base(),
                                     lambda: list(batches))
        losses[sign] = mean_loss(model)
    assert losses["descent"] < start < losses["ascent"], (losses, start)


def test_gora_method_ranks_b_scale_and_reload(tmp_path):
    batches = data()
    s = spec("gora", gora={"n_batches": 2})
    model, info, _ = prepare_method(s, base(), lambda: list(batches))
    grads = reference_mean_gradient(batches[:2])
    fresh = dict(base().named_modules())
    importances = {n: float(torch.mean(torch.abs(fresh[n].weight.detach().double() * g))) for n, g in grads.items()}
    features = {n: sum(fresh[n].weight.shape) for n in grads}
    want = gora_ranks(importances, features, r=4, r_min=2, r_max=16)
    assert info["allocated_ranks"] == want == final_rank_map(model, "gora")
    assert len(set(want.values())) > 1, "test needs a non-uniform GoRA pattern"
    assert info["gora_rank_bounds"] == [2, 16] and info["params_spent"] == sum(want[n] * features[n] for n in want)
    for name, layer in lora_layers(model).items():
        r_m = want[name]
        assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(r_m))  # one alpha, rsLoRA scale
        a = layer.lora_A["default"].weight
        torch.testing.assert_close(layer.lora_B["default"].weight.double(),
                                   gora_b(grads[name].float(), a, layer.scaling["default"]).double(),  # descent
                                   atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(layer.get_base_layer().weight, fresh[name].weight)  # W untouched
    # B != 0 at init: a stock reload of the untrained adapter must already give the same logits
    model.save_pretrained(tmp_path / "init")
    torch.testing.assert_close(logits(reload_adapter(base(), tmp_path / "init"), batches[0]),
                               logits(model, batches[0]), atol=1e-6, rtol=0)
    assert_reload_gives_trained_model(model, batches, base, tmp_path)


def test_fim_gora_has_fim_ranks_and_gora_b(tmp_path):
    batches = data()
    fim, fim_info, _ = prepare_method(spec("fim"), base(), lambda: list(batches))
    model, info, _ = prepare_method(spec("fim_gora", gora={"n_batches": 3}), base(), lambda: list(batches))
    ranks = final_rank_map(model, "fim_gora")
    assert ranks == final_rank_map(fim, "fim") == info["allocated_ranks"] and info["scores"] == fim_info["scores"]
    grads = reference_mean_gradient(batches)
    for name, layer in lora_layers(model).items():
        s_m = layer.scaling["default"]
        assert s_m == pytest.approx(8 / 4)  # fim's preserve rule: alpha_m / r_m = alpha / r
        torch.testing.assert_close(layer.lora_B["default"].weight.double(),
                                   gora_b(grads[name].float(), layer.lora_A["default"].weight, s_m).double(),
                                   atol=1e-6, rtol=1e-4)
    assert_reload_gives_trained_model(model, batches, base, tmp_path)


def test_a_pissa_run_s_kept_adapter_reloads_onto_the_unchanged_base(tmp_path):
    """Through the sweep: the saved PiSSA adapter is plain LoRA (rank 2 r, head included), and a stock reload onto
    a fresh base scores exactly what the run recorded, example by example."""
    import json

    from peft import PeftModel

    from fimlora.app.builders import build_base_model
    from fimlora.app.models import load_tokenizer
    from fimlora.app.tasks import load_task
    from fimlora.app.train import TrainSettings, evaluate
    from fimlora.bench.sweep import run_sweep
    from tests.bench.test_sweep import base_cfg

    cfg = base_cfg(methods=["pissa"], seeds=[1], keep_adapters=True)
    assert run_sweep(cfg, tmp_path, progress=False)["ok"] == 1
    record = json.loads((tmp_path / "trec6__pissa__r2__s1.json").read_text())
    adapter = tmp_path / "adapters" / "trec6__pissa__r2__s1"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["r"] == 4  # converted: [B | -B0] [A ; A0]
    task = load_task("trec6", seed=0, max_train=64, max_test=32)
    reloaded = PeftModel.from_pretrained(build_base_model("minilm", task, 1, seed=1), adapter)
    again = evaluate(reloaded, task, load_tokenizer("minilm"), TrainSettings(max_length=32, progress=False))
    assert again == record["metrics"]["trec6"] and len(again["correct"]) == 32


@pytest.mark.parametrize("method", ["gora", "fim_gora"])
def test_gora_sign_from_the_config_is_the_sign_used_and_the_one_hashed(method):
    """Issue 28 (14f): a config's ``gora: {sign: ascent}`` reaches the init through the sweep's own spec builder
    (B = -/+ (eta sqrt(d_in / r) / s) G A^+, so ascent's B is descent's negated, A being seeded alike), and the
    settings the run's hash covers record that sign (ascent by the absence of the key, GORA_SIGN_BEFORE)."""
    from dataclasses import asdict
    from types import SimpleNamespace

    from fimlora.bench.config import ExperimentConfig, RunSpec, run_settings
    from fimlora.bench.gora import DEFAULT_LR
    from fimlora.bench.registry import GORA_SIGN_BEFORE
    from fimlora.bench.sweep import _method_spec

    batches = data()
    grads = reference_mean_gradient(batches[:2])
    run = RunSpec("sst2", method, 4, 0)
    b, recorded = {}, {}
    for sign in ("descent", "ascent"):
        cfg = ExperimentConfig(name="t", model="minilm", tasks=["sst2"], methods=[method], seeds=[0], ranks=[4],
                               target_modules=TARGETS, fim={"n_batches": 3}, gora={"n_batches": 2, "sign": sign})
        model, _, _ = prepare_method(_method_spec(cfg, run, "lm", 8, SimpleNamespace(max_steps=1)), base(),
                                     lambda: list(batches))
        layers = lora_layers(model)
        b[sign] = {n: layer.lora_B["default"].weight.detach().clone() for n, layer in layers.items()}
        for name, layer in layers.items():
            want = gora_b(grads[name].float(), layer.lora_A["default"].weight, layer.scaling["default"], DEFAULT_LR,
                          sign=sign)
            torch.testing.assert_close(b[sign][name], want, atol=1e-6, rtol=1e-4)
        gora_settings = run_settings(asdict(cfg), run)["gora"]
        recorded[sign] = gora_settings.get("sign", GORA_SIGN_BEFORE)
    for name, descent in b["descent"].items():
        assert descent.abs().max() > 0
        torch.testing.assert_close(b["ascent"][name], -descent)
    assert recorded == {"descent": "descent", "ascent": "ascent"}


# ----------------------------------------------------------------------------- gora's init-step search


def _eval_mean_loss(model, batches):
    model.eval()
    with torch.no_grad():
        return sum(float(model(**b).loss) for b in batches) / len(batches)


@pytest.mark.parametrize("method", ["gora", "fim_gora"])
def test_gora_lr_search_picks_the_step_of_lowest_held_out_loss_by_brute_force(method):
    """gora.lr_search: each candidate step, built as a fixed-lr run of the same seed, scored on the calibration
    batches after the gradient's (held out from G); the run's step is the argmin and its B is GoRA's at that step."""
    batches = lm_batches(n_batches=4, batch_size=4, seq=8)
    held_out = batches[2:4]
    candidates = [1e-3, 1e-2, 0.1, 1.0, 10.0]
    want = {}
    for eta in candidates:
        fixed, _, _ = prepare_method(spec(method, gora={"n_batches": 2, "lr": eta}), base(), lambda: list(batches))
        want[eta] = _eval_mean_loss(fixed, held_out)
    model, info, _ = prepare_method(spec(method, gora={"n_batches": 2, "lr_search": candidates[::-1]}), base(),
                                    lambda: list(batches))
    assert len({round(v, 6) for v in want.values()}) == len(candidates), "test needs distinct losses"
    best = min(want, key=want.get)
    if method == "fim_gora":  # measured: an interior optimum here (GoRA's own lies at the top of this range)
        assert min(candidates) < best < max(candidates), want
    assert info["gora_lr"] == best
    assert info["gora_lr_search"] == pytest.approx({f"{k:g}": v for k, v in want.items()}, rel=1e-5)
    assert list(info["gora_lr_search"]) == [f"{k:g}" for k in sorted(candidates)]
    assert _eval_mean_loss(model, held_out) == pytest.approx(want[best], rel=1e-5)
    grads = reference_mean_gradient(batches[:2])
    for name, layer in lora_layers(model).items():
        if name not in grads or layer.r["default"] == 0:
            continue
        torch.testing.assert_close(layer.lora_B["default"].weight.double(),
                                   gora_b(grads[name].float(), layer.lora_A["default"].weight,
                                          layer.scaling["default"], best).double(), atol=1e-6, rtol=1e-4)


def test_choose_gora_lr_restores_b_and_mode_and_breaks_ties_to_the_smaller_step():
    from fimlora.bench.gora import choose_gora_lr

    batches = data()
    model, _, _ = prepare_method(spec("gora", gora={"n_batches": 2}), base(), lambda: list(batches))
    model.train()
    before = {n: layer.lora_B["default"].weight.detach().clone() for n, layer in lora_layers(model).items()}
    grads = reference_mean_gradient(batches[:2])
    zero = {n: torch.zeros_like(g) for n, g in grads.items()}
    eta, losses = choose_gora_lr(model, zero, [0.5, 0.05, 5.0], batches[2:])  # G = 0: every step gives B = 0
    assert eta == 0.05 and len(set(losses.values())) == 1
    assert model.training
    for name, layer in lora_layers(model).items():
        torch.testing.assert_close(layer.lora_B["default"].weight, before[name], rtol=0, atol=0)


@pytest.mark.parametrize(("kw", "needle"), [
    ({"lr_search": []}, r"gora\.lr_search: must be a non-empty list"),
    ({"lr_search": [0.1, -1.0]}, r"gora\.lr_search\[1\]"),
    ({"lr_search": 0.1}, r"gora\.lr_search: must be a non-empty list of numbers > 0, got 0\.1"),
    ({"lr_search": [0.1], "lr": 0.05}, r"gora\.lr, gora\.lr_search: give at most one"),
])
def test_gora_lr_search_config_errors_name_the_field(kw, needle):
    from fimlora.bench.config import ExperimentConfig

    with pytest.raises(ValueError, match=needle):
        ExperimentConfig(name="t", model="minilm", tasks=["sst2"], methods=["gora"], seeds=[0], ranks=[4],
                         gora=kw)


def test_gora_lr_search_needs_a_held_out_batch():
    batches = data()
    with pytest.raises(ValueError, match=r"gora\.lr_search: no calibration batch is left after the gradient's"):
        prepare_method(spec("gora", gora={"n_batches": 3, "lr_search": [0.1]}), base(), lambda: list(batches))
