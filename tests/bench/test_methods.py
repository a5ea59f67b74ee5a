"""The harness's methods beyond the five baselines: fim_eva (FIM-LoRA ranks, EVA directions; issue 15, 3); the peers
of issue 22 are in test_peers.py."""

from __future__ import annotations

import torch

from fimlora.bench.methods import MethodSpec, counted_forwards, final_rank_map, prepare_method
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
    for method in ("fim", "random", "fim_eva", "fim_rslora", "fim_pissa", "fim_lora_ga", "fim_gora"):
        s = MethodSpec(method=method, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                       seed=0, fim={"n_batches": 2, "progress": False})
        model, info, _ = prepare_method(s, llama_base(1, 64, vocab=128), lambda: list(data))
        assert sum(info["allocated_ranks"].values()) == 4, method


def test_eva_layer_inputs_keep_one_vector_per_example_and_mask_tokens_as_peft():
    from peft.tuners.lora.eva import prepare_layer_inputs_fn_language_modeling

    from fimlora.bench.methods import eva_layer_inputs

    mask = torch.tensor([[1, 1, 0], [1, 0, 0]]).bool().nonzero()  # what PEFT's model-input step hands over
    tokens = torch.randn(2, 3, 5)
    torch.testing.assert_close(eva_layer_inputs((tokens,), mask, "l"),
                               prepare_layer_inputs_fn_language_modeling((tokens,), mask, "l"))
    assert eva_layer_inputs(tokens, mask, "l").shape == (3, 5)  # the three unmasked tokens
    pooled = torch.randn(2, 5)  # BERT's pooler: the first token of each example
    assert eva_layer_inputs((pooled,), mask, "bert.pooler.dense") is pooled


def test_eva_runs_on_an_encoder_with_every_linear_layer_adapted():
    """all-linear on BERT includes the pooler, whose input has no token axis; PEFT's default EVA input step fails
    there ("not enough values to unpack"), which made every EVA run of an all-linear encoder suite fail."""
    from tests.references import cls_batches, tiny_bert

    s = MethodSpec(method="eva", r=2, lora_alpha=4, target_modules="all-linear", task_type="SEQ_CLS", seed=0,
                   fim={"n_batches": 2})
    model, info, _ = prepare_method(s, tiny_bert(num_labels=3), lambda: cls_batches(2, seq=8))
    ranks = info["eva_ranks"]
    assert "bert.pooler.dense" in ranks and sum(ranks.values()) > 0


def test_eva_refuses_up_front_a_layer_with_fewer_rows_than_components():
    """BERT's pooler gets batch_size rows; with r * rho above that PEFT's EVA skips its SVD on every batch and
    cycles the data forever (a frontier run hung on it). Refused before EVA starts, naming the layer."""
    import pytest

    from tests.references import cls_batches, tiny_bert

    s = MethodSpec(method="eva", r=4, lora_alpha=8, target_modules="all-linear", task_type="SEQ_CLS", seed=0,
                   fim={"n_batches": 2})
    needle = (r"eva: PEFT's EVA needs at least r \* rho = 8 input rows per batch in every adapted layer, or it "
              r"cycles the data forever; 1 layer\(s\) get fewer, e\.g\. bert\.pooler\.dense: 4 ")
    with pytest.raises(ValueError, match=needle) as caught:
        prepare_method(s, tiny_bert(num_labels=3), lambda: cls_batches(2, batch_size=4, seq=8))
    assert "lower eva.rho or r so that r * rho <= 4," in str(caught.value)


def test_eva_rows_per_layer_counts_tokens_and_examples():
    from peft import EvaConfig

    from fimlora.bench.methods import eva_rows_per_layer
    from tests.references import cls_batches, lora_bert

    model = lora_bert(target_modules="all-linear", eva_config=EvaConfig(use_label_mask=False))
    batch = cls_batches(1, batch_size=3, seq=5)[0]
    batch["attention_mask"][0, 3:] = 0  # two padded tokens
    rows = eva_rows_per_layer(model, batch)
    assert rows["bert.pooler.dense"] == 3  # one vector per example
    assert rows["bert.encoder.layer.0.attention.self.query"] == 3 * 5 - 2  # the unmasked tokens
