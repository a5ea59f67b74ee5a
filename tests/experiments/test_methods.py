"""The harness's methods beyond the five baselines: fim_eva (FIM-LoRA ranks, EVA directions; issue 15, 3); the peers
of issue 22 are in test_peers.py."""

from __future__ import annotations

import torch

from fimlora.experiments.methods import MethodSpec, counted_forwards, final_rank_map, prepare_method
from fimlora.modules import base_model_of
from tests.references import llama_base, lm_batches

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def spec(method, **kw):
    return MethodSpec(method=method, r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM", seed=0,
                      fim={"n_batches": 4}, **kw)


def lora_layers(model):
    """{rank_pattern key: LoRA layer}, read off the model directly (an EVA-initialised adapter is not one
    fimlora resizes, so its own discovery refuses it)."""
    from peft.tuners.lora.layer import LoraLayer

    return {n: m for n, m in base_model_of(model).named_modules() if isinstance(m, LoraLayer)}


def _keep_input(seen, name, module, args, out):
    seen.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]))


def layer_inputs(model, data):
    """Every LoRA module's input rows (tokens, d_in), captured on the base layers (a slow, obvious reference)."""
    import functools

    seen, handles = {}, []
    for name, layer in lora_layers(model).items():
        handles.append(layer.get_base_layer().register_forward_hook(functools.partial(_keep_input, seen, name)))
    try:
        with torch.no_grad(), model.disable_adapter():
            for b in data:
                model(**b)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(xs).double() for n, xs in seen.items()}


def test_fim_eva_keeps_fim_ranks_and_takes_leading_principal_directions():
    data = lm_batches(n_batches=4, batch_size=8, seq=16)
    fim_model, fim_info, _ = prepare_method(spec("fim"), llama_base(2, 64, vocab=128), lambda: list(data))
    model, info, _ = prepare_method(spec("fim_eva"), llama_base(2, 64, vocab=128), lambda: list(data))
    ranks = final_rank_map(fim_model, "fim")
    assert len(set(ranks.values())) > 1, "test needs a non-uniform FIM pattern"
    # q/k/v (and gate/up) see the same input, so PEFT's EVA alone would move rank between them
    assert final_rank_map(model, "fim_eva") == ranks == info["allocated_ranks"]
    assert info["scores"] == fim_info["scores"] and info["eva_forward_passes"] >= len(data)
    inputs = layer_inputs(model, data)
    for name, layer in lora_layers(model).items():
        a = layer.lora_A["default"].weight.detach().double()
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
        torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0], dtype=torch.float64), atol=1e-4, rtol=0)
        # EVA's rows span (nearly) the top-r principal subspace of the centred inputs: compare the variance
        # they capture with the exact optimum from an SVD.
        x = inputs[name] - inputs[name].mean(0)
        s = torch.linalg.svdvals(x)
        best = (s[: a.shape[0]] ** 2).sum()
        captured = ((x @ a.T) ** 2).sum()
        assert captured >= 0.95 * best, (name, float(captured / best))
    assert base_model_of(model) is not base_model_of(fim_model)


def test_counted_forwards_counts_passes_and_removes_its_hook():
    model = torch.nn.Linear(2, 2)
    with counted_forwards(model) as forwards:
        model(torch.ones(1, 2))
        model(torch.ones(1, 2))
    model(torch.ones(1, 2))
    assert forwards.count == 2 and not model._forward_pre_hooks


def test_fim_methods_take_a_progress_setting_from_the_config():
    """Issue 20, 3: ``fim: {progress: false}`` passes validation, so every FIM method must accept it (it once
    collided with the progress=False the harness sets, failing every run with a TypeError)."""
    data = lm_batches(n_batches=2, batch_size=4, seq=8)
    for method in ("fim", "random", "fim_eva", "fim_rslora", "fim_pissa", "fim_gora"):
        s = MethodSpec(method=method, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                       seed=0, fim={"n_batches": 2, "progress": False})
        model, info, _ = prepare_method(s, llama_base(1, 64, vocab=128), lambda: list(data))
        assert sum(info["allocated_ranks"].values()) == 4, method
