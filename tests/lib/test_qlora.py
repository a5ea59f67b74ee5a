"""QLoRA on a tiny LLaMA quantised with real bitsandbytes (4-bit nf4 and 8-bit) on the CPU: scores equal autograd on
the same quantised model, the model is left exactly as it was, the budget is exact, and a stock reload onto a freshly
quantised base gives the same ranks and logits."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import fimlora
import fimlora.fisher
from fimlora import FimConfig, compute_fisher, lora_modules
from fimlora.check import check_adapter
from tests.lib.test_api_errors import no_calibration
from tests.lib.test_fisher import assert_same_state, model_state
from tests.lib.test_resize import layer_state
from tests.references import (
    assert_fisher_close,
    lm_batches,
    make_b_nonzero,
    qlora_llama,
    quantised_llama,
    reference_batch_fisher,
    reference_per_example_fisher,
    save_tiny_llama,
)

pytest.importorskip("bitsandbytes")
from bitsandbytes.functional import _convert_weight_packed_for_cpu, has_avx512bf16  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt. inputs will be cast:UserWarning")

BITS = [4, 8]
LAYER_TYPE = {4: "peft.tuners.lora.bnb.Linear4bit", 8: "peft.tuners.lora.bnb.Linear8bitLt"}
PROJECTIONS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj"]
REFERENCES = {"batch": reference_batch_fisher, "per_example": reference_per_example_fisher}
# DoRA on 8-bit fails inside PEFT's own forward on this CPU (bitsandbytes' int8 dequantize finds no column
# statistics), with or without fimlora; so QDoRA is tested on 4-bit only.
BITS_DORA = [(4, False), (8, False), (4, True)]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def packed_4bit_layers(model):
    """Names of 4-bit layers bitsandbytes has repacked into its CPU inference-only format."""
    return [n for n, m in model.named_modules()
            if getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False)]


def bnb_4bit_layers(model):
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def arm_cpu_repacking(model):
    """Make every 4-bit layer repack on an eval forward without grad, as bitsandbytes does on CPUs with AVX512-BF16.

    bitsandbytes decides per layer, from the CPU, at construction (``support_avx512bf16_for_cpu``); forcing the
    flag makes the hazard present on every x86-64 machine, so a calibration that runs such a forward is caught
    here too. Only for tests whose code under test must not reach the packed kernel: that kernel needs AVX512-BF16.
    """
    layers = bnb_4bit_layers(model)
    assert layers
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True


def repack_for_cpu_inference(layer):
    """Put ``layer``'s weight into bitsandbytes' CPU inference format exactly as its eval forward would.

    ``_convert_weight_packed_for_cpu`` is the conversion ``Linear4bit.forward`` calls; it is pure tensor code, so
    the state is the same on any CPU (running the forward would need AVX512-BF16 for the repack to happen).
    """
    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(layer.weight.data,
                                                                                 layer.weight.quant_state)


@pytest.mark.parametrize("bits", BITS)
def test_every_quantised_projection_found(base_dir, bits):
    model = qlora_llama(base_dir, bits)
    infos = lora_modules(model)
    assert [i.name for i in infos] == [f"model.layers.{k}.{p}" for k in range(2) for p in PROJECTIONS]
    assert {f"{type(i.layer).__module__}.{type(i.layer).__name__}" for i in infos} == {LAYER_TYPE[bits]}
    shapes = {i.name.split(".")[-1]: (i.in_features, i.out_features) for i in infos}
    assert shapes == {"q_proj": (64, 64), "k_proj": (64, 64), "v_proj": (64, 64), "o_proj": (64, 64),
                      "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}


@pytest.mark.parametrize("estimator", ["batch", "per_example"])
@pytest.mark.parametrize("bits, dora", BITS_DORA, ids=["4bit", "8bit", "4bit-dora"])
def test_scores_equal_autograd_on_the_quantised_model(base_dir, bits, estimator, dora):
    model = qlora_llama(base_dir, bits, use_dora=dora)
    data = lm_batches()
    ref = REFERENCES[estimator](model, data)
    if bits == 4:
        arm_cpu_repacking(model)
    layer = model.get_base_model().model.layers[0]
    assert layer.gradient_checkpointing  # prepare_model_for_kbit_training turned it on
    calls = []
    orig = layer._gradient_checkpointing_func
    layer._gradient_checkpointing_func = lambda *a, **k: (calls.append(1), orig(*a, **k))[1]
    got = compute_fisher(model, data, FimConfig(n_batches=3, estimator=estimator, progress=False)).fisher
    assert calls, "checkpointing was not used during calibration"
    # every module gets a gradient: a 4-bit layer that bitsandbytes repacked for inference would pass none upstream
    assert all(f.abs().sum() > 0 for f in got.values())
    assert packed_4bit_layers(model) == []
    assert_fisher_close(got, ref)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("estimator", ["batch", "per_example"])
@pytest.mark.parametrize("bits", BITS)
def test_calibration_leaves_quantised_model_as_it_was(base_dir, bits, estimator, train):
    model = qlora_llama(base_dir, bits)
    if bits == 4:
        arm_cpu_repacking(model)
    model.train(train)
    before = model_state(model)  # includes the input-grad hook prepare_model_for_kbit_training put on the embedding
    compute_fisher(model, lm_batches(), FimConfig(n_batches=2, estimator=estimator, progress=False))
    assert_same_state(before, model_state(model))
    assert packed_4bit_layers(model) == []


@pytest.mark.parametrize("bits, dora", BITS_DORA, ids=["4bit", "8bit", "4bit-dora"])
def test_qlora_end_to_end_stock_reload_on_fresh_quantised_base(base_dir, bits, dora, tmp_path):
    model = qlora_llama(base_dir, bits, use_dora=dora)
    data = lm_batches()
    uniform_total = sum(i.r for i in lora_modules(model))
    assert uniform_total == 4 * 14  # L * r from the model: 2 layers x 7 projections at r = 4
    alloc = fimlora.apply_fim_ranks(model, data, n_batches=3, progress=False)
    assert len(set(alloc.ranks.values())) > 1
    assert alloc.budget == sum(alloc.ranks.values()) == uniform_total
    assert {i.name: i.layer.r["default"] for i in lora_modules(model)} == alloc.ranks
    make_b_nonzero(model, data)
    model.eval()
    with torch.no_grad():
        ref = model(**data[0]).logits
    model.save_pretrained(tmp_path)
    assert check_adapter(tmp_path).ok, check_adapter(tmp_path).format()
    reloaded = PeftModel.from_pretrained(quantised_llama(base_dir, bits), tmp_path).eval()
    assert layer_state(reloaded) == layer_state(model)
    assert reloaded.peft_config["default"].use_dora is dora
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**data[0]).logits, ref, rtol=0, atol=1e-6)


def test_4bit_layer_repacked_for_inference_is_refused(base_dir, monkeypatch):
    """An eval forward without grad makes bitsandbytes repack a 4-bit weight into a format with no backward."""
    model = get_peft_model(quantised_llama(base_dir, 4), LoraConfig(r=4, target_modules="all-linear"))
    repack_for_cpu_inference(model.get_base_model().model.layers[0].self_attn.q_proj.get_base_layer())
    q_proj = "base_model.model.model.layers.0.self_attn.q_proj"
    assert packed_4bit_layers(model) == [q_proj, f"{q_proj}.base_layer"]  # the LoRA layer exposes its base's weight
    before = model_state(model)
    monkeypatch.setattr(fimlora.fisher, "_calibrate", no_calibration)
    with pytest.raises(ValueError, match=r"model: the 4-bit weight of 'model\.layers\.0\.self_attn\.q_proj' was "
                                         r"repacked by bitsandbytes for CPU inference .* the scores of every module "
                                         r"before it would be 0"):
        fimlora.apply_fim_ranks(model, lm_batches(), progress=False)
    assert_same_state(before, model_state(model))


def test_4bit_without_kbit_preparation_gives_the_same_scores(base_dir):
    """No input grads, no checkpointing: the first layer's input needs no grad, yet no layer gets repacked and the
    scores are those of the prepared model (same weights, same seeded LoRA init)."""
    base = quantised_llama(base_dir, 4)
    torch.manual_seed(100)  # as qlora_llama seeds LoRA's A
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    arm_cpu_repacking(model)
    prepared = qlora_llama(base_dir, 4)
    got = compute_fisher(model, lm_batches(), FimConfig(n_batches=3, progress=False)).fisher
    assert packed_4bit_layers(model) == []
    ref = compute_fisher(prepared, lm_batches(), FimConfig(n_batches=3, progress=False)).fisher
    assert_fisher_close(got, {n: f.double() for n, f in ref.items()}, rtol=1e-5)


@pytest.mark.skipif(not has_avx512bf16(),
                    reason="bitsandbytes repacks 4-bit weights for inference only on CPUs with AVX512-BF16; "
                           "this CPU lacks AVX512-BF16")
def test_eval_forward_without_grad_repacks_on_this_cpu(base_dir):
    """The real hazard behind the refusal above, on hardware that has it: a plain no-grad eval forward repacks."""
    model = get_peft_model(quantised_llama(base_dir, 4), LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        model(**lm_batches()[0])
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer" in packed_4bit_layers(model)


def test_8bit_dora_refused_up_front_naming_module_and_combination(base_dir, monkeypatch):
    """bitsandbytes' int8 layer with DoRA fails on a later forward/backward (stock PEFT too); refused by layer type,
    before any forward, whatever the CPU."""
    model = qlora_llama(base_dir, 8, use_dora=True)
    monkeypatch.setattr(fimlora.api, "compute_fisher", no_calibration)
    needle = (r"model\.layers\.0\.self_attn\.q_proj: DoRA \(use_dora=True\) on a bitsandbytes 8-bit base layer "
              r"\(peft\.tuners\.lora\.bnb\.Linear8bitLt\) is not supported")
    with pytest.raises(ValueError, match=needle):
        lora_modules(model)
    with pytest.raises(ValueError, match=needle):
        fimlora.compute_allocation(model, lm_batches(), FimConfig(progress=False))
