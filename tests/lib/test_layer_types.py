"""LoRA layer types: which are calibrated and resized (any pair of linear maps: Conv1D, other quantised wrappers,
DoRA) and which are refused up front with the module and the reason (embedding, conv, target_parameters, MHA).

bitsandbytes 4/8-bit is in test_qlora.py.
"""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import fimlora
import fimlora.fisher
from fimlora import FimConfig, apply_allocation, compute_fisher, lora_modules
from fimlora.check import check_adapter
from tests.lib.test_api_errors import assert_untouched, no_calibration, snapshot
from tests.lib.test_resize import layer_state
from tests.references import (
    assert_fisher_close,
    lm_batches,
    lora_gpt2,
    lora_llama,
    make_b_nonzero,
    reference_batch_fisher,
    reference_per_example_fisher,
    tiny_gpt2,
    tiny_llama,
)

REFERENCES = {"batch": reference_batch_fisher, "per_example": reference_per_example_fisher}
FIRST = "model.layers.0.self_attn.q_proj"


def fisher_of(model, estimator, n_batches=3):
    return compute_fisher(model, lm_batches(), FimConfig(n_batches=n_batches, estimator=estimator,
                                                         progress=False)).fisher


def assert_reload_reproduces(model, make_base, tmp_path, data, custom_modules=None):
    """save_pretrained, stock PeftModel.from_pretrained on a fresh base: same ranks/alphas/scales and logits."""
    with torch.no_grad():
        ref = model(**data).logits
    model.save_pretrained(tmp_path)
    kw = {}
    if custom_modules is not None:
        # A custom layer mapping is not saved in adapter_config.json; it is registered again on the loaded config.
        kw["config"] = LoraConfig.from_pretrained(tmp_path)
        kw["config"]._register_custom_module(custom_modules)
    reloaded = PeftModel.from_pretrained(make_base(), tmp_path, **kw).eval()
    assert layer_state(reloaded) == layer_state(model)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**data).logits, ref, rtol=0, atol=1e-6)
    return reloaded, ref


# ----------------------------------------------------------------------------- GPT-2 Conv1D (fan_in_fan_out)


@pytest.mark.parametrize("estimator", ["batch", "per_example"])
def test_gpt2_conv1d_scores_equal_reference(estimator):
    model = lora_gpt2()
    infos = lora_modules(model)
    assert [(i.name, i.in_features, i.out_features) for i in infos[:3]] == [
        ("transformer.h.0.attn.c_attn", 16, 48), ("transformer.h.0.attn.c_proj", 16, 16),
        ("transformer.h.0.mlp.c_proj", 64, 16)]
    ref = REFERENCES[estimator](model, lm_batches())
    assert_fisher_close(fisher_of(model, estimator), ref)


def test_gpt2_conv1d_resize_save_reload_and_merge(tmp_path):
    model = lora_gpt2()
    data = lm_batches()
    total = sum(i.r for i in lora_modules(model))
    alloc = fimlora.apply_fim_ranks(model, data, n_batches=3, progress=False)
    assert len(set(alloc.ranks.values())) > 1
    assert sum(i.layer.r["default"] for i in lora_modules(model)) == total == 4 * 6
    for i in lora_modules(model):  # A (r, d_in), B (d_out, r) whatever the base weight's orientation
        assert i.layer.lora_A["default"].weight.shape == (alloc.ranks[i.name], i.in_features)
        assert i.layer.lora_B["default"].weight.shape == (i.out_features, alloc.ranks[i.name])
    make_b_nonzero(model, data)
    reloaded, ref = assert_reload_reproduces(model, tiny_gpt2, tmp_path, data[0])
    assert reloaded.peft_config["default"].fan_in_fan_out is True
    with torch.no_grad():
        torch.testing.assert_close(reloaded.merge_and_unload()(**data[0]).logits, ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- a quantised wrapper not seen before


class FakeQuantLinear(nn.Module):
    """A stand-in for a GPTQ/AWQ-style quantised linear: int8 weight and per-row scale, infeatures/outfeatures, no
    nn.Linear anywhere; GPTQ and AWQ themselves do not install on this machine."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        self.register_buffer("qweight", torch.round(w / scale).to(torch.int8))
        self.register_buffer("scales", scale)
        self.infeatures, self.outfeatures = linear.in_features, linear.out_features

    def forward(self, x):
        return x @ (self.qweight.float() * self.scales).t()


def fake_quant_llama(seed=0):
    base = tiny_llama(seed)
    for layer in base.model.layers:
        for name in ("q_proj", "v_proj"):
            setattr(layer.self_attn, name, FakeQuantLinear(getattr(layer.self_attn, name)))
    return base


def fake_quant_config(lora_cls):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    cfg._register_custom_module({FakeQuantLinear: lora_cls})
    return cfg


@pytest.mark.parametrize("wrapper", ["GPTQLoraLinear", "AwqLoraLinear"])
def test_other_quantised_wrapper_found_by_structure(wrapper, tmp_path):
    """PEFT's own GPTQ/AWQ LoRA layers on a quantised base: a pair of nn.Linear factors, so calibrated and resized."""
    import peft.tuners.lora.awq
    import peft.tuners.lora.gptq

    lora_cls = {"GPTQLoraLinear": peft.tuners.lora.gptq.GPTQLoraLinear,
                "AwqLoraLinear": peft.tuners.lora.awq.AwqLoraLinear}[wrapper]
    torch.manual_seed(100)
    model = get_peft_model(fake_quant_llama(), fake_quant_config(lora_cls))
    infos = lora_modules(model)
    assert [type(i.layer).__name__ for i in infos[:3]] == [wrapper, wrapper, "Linear"]
    assert (infos[0].name, infos[0].in_features, infos[0].out_features) == (FIRST, 16, 16)
    data = lm_batches()
    assert_fisher_close(fisher_of(model, "per_example"), reference_per_example_fisher(model, data))
    alloc = fimlora.apply_fim_ranks(model, data, n_batches=3, progress=False)
    assert sum(alloc.ranks.values()) == 4 * 6 and len(set(alloc.ranks.values())) > 1
    make_b_nonzero(model, data)
    assert_reload_reproduces(model, fake_quant_llama, tmp_path, data[0], custom_modules={FakeQuantLinear: lora_cls})


# ----------------------------------------------------------------------------- DoRA


def lora_dora(**kw):
    return lora_llama(use_dora=True, **kw)


def row_norms_of_w(info):
    return torch.linalg.norm(info.layer.get_base_layer().weight.detach(), dim=1)


@pytest.mark.parametrize("estimator", ["batch", "per_example"])
def test_dora_scores_equal_reference(estimator):
    model = lora_dora()
    ref = REFERENCES[estimator](model, lm_batches())
    with warnings.catch_warnings():
        # DoRA also calls lora_B on an identity matrix (its weight norm); that call is not a second term
        warnings.simplefilter("error")
        got = fisher_of(model, estimator)
    assert_fisher_close(got, ref)


def test_dora_resize_at_init_is_exact():
    """At B = 0 the magnitude is ||W||_row at any rank: resizing changes neither m nor the output."""
    model = lora_dora()
    data = lm_batches()[0]
    infos = lora_modules(model)
    assert all(i.dora for i in infos)
    magnitudes = {i.name: i.layer.lora_magnitude_vector["default"].weight.detach().clone() for i in infos}
    with torch.no_grad():
        before = model(**data).logits
        base = model.get_base_model()
        with model.disable_adapter():
            plain = base(**data).logits
    torch.testing.assert_close(before, plain, rtol=0, atol=0)
    alloc = fimlora.apply_fim_ranks(model, lm_batches(), n_batches=3, progress=False)
    assert len(set(alloc.ranks.values())) > 1
    for i in lora_modules(model):
        m = i.layer.lora_magnitude_vector["default"].weight
        assert torch.equal(m, magnitudes[i.name]), i.name
        torch.testing.assert_close(m, row_norms_of_w(i), rtol=1e-6, atol=0)
        assert i.layer.lora_A["default"].weight.shape[0] == alloc.ranks[i.name]
        assert m.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(model(**data).logits, before, rtol=0, atol=0)


def test_dora_save_reload_and_merge(tmp_path):
    model = lora_dora()
    data = lm_batches()
    alloc = fimlora.apply_fim_ranks(model, data, n_batches=3, progress=False)
    assert len(set(alloc.ranks.values())) > 1
    make_b_nonzero(model, data)  # trains A, B and the magnitude vectors
    reloaded, ref = assert_reload_reproduces(model, tiny_llama, tmp_path, data[0])
    assert reloaded.peft_config["default"].use_dora is True
    assert reloaded.peft_config["default"].rank_pattern == alloc.ranks
    trained = {i.name: i.layer.lora_magnitude_vector["default"].weight for i in lora_modules(model)}
    for i in lora_modules(reloaded):
        assert i.dora and i.layer.use_dora["default"]
        assert torch.equal(i.layer.lora_magnitude_vector["default"].weight, trained[i.name]), i.name
    with torch.no_grad():
        torch.testing.assert_close(reloaded.merge_and_unload()(**data[0]).logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call", ["apply_fim_ranks", "compute_allocation", "compute_fisher", "apply_allocation"])
def test_trained_dora_refused_even_with_allow_trained(call, monkeypatch):
    alloc = fimlora.compute_allocation(lora_dora(), lm_batches(), FimConfig(n_batches=2, progress=False))
    model = lora_dora()
    make_b_nonzero(model, lm_batches())
    snap = snapshot(model)
    monkeypatch.setattr(fimlora.fisher, "_calibrate", no_calibration)
    fn = {"apply_fim_ranks": lambda: fimlora.apply_fim_ranks(model, lm_batches(), progress=False, allow_trained=True),
          "compute_allocation": lambda: fimlora.compute_allocation(model, lm_batches(), FimConfig(progress=False),
                                                                   allow_trained=True),
          "compute_fisher": lambda: compute_fisher(model, lm_batches(), FimConfig(progress=False)),
          "apply_allocation": lambda: apply_allocation(model, alloc, allow_trained=True)}
    with pytest.raises(ValueError, match=rf"model: LoRA-B of DoRA module {FIRST!r} is non-zero \(max \|B\| = "
                                         r"[0-9.e-]+\); fimlora resizes DoRA adapters only at initialisation "
                                         r"\(B = 0, .*also with allow_trained=True"):
        fn[call]()
    assert_untouched(model, snap)


@pytest.mark.parametrize("allow_trained", [False, True])
def test_dora_with_random_b_init_refused(allow_trained):
    """Without allow_trained too, the error is DoRA's (the generic one would suggest allow_trained, which fails)."""
    model = lora_dora(init_lora_weights=False)  # PEFT leaves both factors random: B != 0 from the start
    with pytest.raises(ValueError, match=rf"LoRA-B of DoRA module {FIRST!r} is non-zero .*also with allow_trained"):
        fimlora.apply_fim_ranks(model, lm_batches(), progress=False, allow_trained=allow_trained)


# ----------------------------------------------------------------------------- refused layer types


class Net(nn.Module):
    """One of each layer type whose LoRA is not a pair of linear maps called on an input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 8)
        self.conv = nn.Conv2d(8, 8, 1)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.experts = nn.Module()
        self.experts.weight = nn.Parameter(torch.randn(2, 8, 8))  # (num_experts, d_in, d_out), MoE style
        self.proj = nn.Linear(8, 8)

    def forward(self, ids):
        h = self.embed(ids)
        h = self.conv(h.transpose(1, 2)[..., None])[..., 0].transpose(1, 2)
        h = self.mha(h, h, h)[0]
        h = h @ self.experts.weight.sum(0)
        return self.proj(h)


REFUSED = [
    ("embedding", dict(target_modules=["embed", "proj"]), "embed",
     r"layer type peft\.tuners\.lora\.layer\.Embedding is not supported: LoRA on an embedding .* A = 0 and B random, "
     r"so dL/dB is zero at initialisation"),
    ("conv", dict(target_modules=["conv", "proj"]), "conv",
     r"layer type peft\.tuners\.lora\.layer\.Conv2d is not supported: lora_A is a Conv2d and lora_B a Conv2d, not a "
     r"pair of nn\.Linear maps"),
    ("mha", dict(target_modules=["mha", "proj"]), "mha",
     r"layer type peft\.tuners\.lora\.layer\.MultiheadAttention is not supported: LoRA on nn\.MultiheadAttention "
     r"merges B A into in_proj_weight"),
    ("target_parameters", dict(target_modules=["proj"], target_parameters=["experts.weight"]), "experts",
     r"layer type peft\.tuners\.lora\.layer\.ParamWrapper is not supported: LoRA on a parameter \(target_parameters, "
     r"e\.g\. MoE experts\)"),
]


@pytest.mark.parametrize("case", REFUSED, ids=lambda c: c[0])
def test_refused_layer_types_named_up_front(case, monkeypatch):
    _, kw, module, reason = case
    model = get_peft_model(Net(), LoraConfig(r=2, **kw))
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(fimlora.fisher, "_calibrate", no_calibration)
    batches = [{"ids": torch.randint(0, 10, (2, 3))}]
    with pytest.raises(ValueError, match=rf"model: 1 LoRA module\(s\) of adapter 'default' cannot be resized:\n  "
                                         rf"{module}: {reason}"):
        fimlora.apply_fim_ranks(model, batches, loss_fn=lambda m, b: m(**b).sum(), progress=False)
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match=rf"\n  {module}: "):
        lora_modules(model)


def test_llama_embedding_lora_refused_with_reason():
    model = lora_llama(target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(ValueError, match=r"model\.embed_tokens: layer type .*Embedding is not supported: LoRA on an "
                                         r"embedding"):
        fimlora.apply_fim_ranks(model, lm_batches(), progress=False)


def test_other_lora_variants_still_refused():
    import peft.tuners.lora.gptq

    cfg = fake_quant_config(peft.tuners.lora.gptq.GPTQLoraLinear)
    cfg.use_qalora = True
    cfg.qalora_group_size = 4
    model = get_peft_model(fake_quant_llama(), cfg)
    with pytest.raises(ValueError, match=rf"{FIRST}: LoRA variant QALoraLinearVariant is not supported \(plain LoRA "
                                         r"and DoRA are\)"):
        lora_modules(model)


# ----------------------------------------------------------------------------- fimlora check on DoRA adapters


@pytest.fixture
def saved_dora(tmp_path):
    model = lora_dora()
    fimlora.apply_fim_ranks(model, lm_batches(), n_batches=2, progress=False)
    make_b_nonzero(model, lm_batches())
    model.save_pretrained(tmp_path)
    return tmp_path


def rewrite_tensors(path, edit):
    from safetensors.torch import load_file, save_file

    file = path / "adapter_model.safetensors"
    save_file(edit(load_file(file)), file)


def test_check_passes_on_resized_dora_adapter(saved_dora):
    report = check_adapter(saved_dora)
    assert report.ok, report.format()
    assert any(n.startswith("WARNING: served wrongly by vLLM <= 0.31: refuses it: use_dora=True (DoRA)")
               for n in report.notes), report.notes


MAGNITUDE = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"


@pytest.mark.parametrize("case", ["missing", "length", "not dora"])
def test_check_reports_dora_magnitude_problems(saved_dora, case):
    if case == "missing":
        rewrite_tensors(saved_dora, lambda sd: {k: v for k, v in sd.items() if k != MAGNITUDE})
        expected = r"model\.layers\.0\.self_attn\.q_proj: use_dora=True but no lora_magnitude_vector saved"
    elif case == "length":
        rewrite_tensors(saved_dora, lambda sd: {**sd, MAGNITUDE: sd[MAGNITUDE][:5].contiguous()})
        expected = (r"model\.layers\.0\.self_attn\.q_proj: lora_magnitude_vector has shape \[5\] but lora_B has d_out "
                    r"16; loading fails")
    else:
        cfg_path = saved_dora / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg_path.write_text(json.dumps({**cfg, "use_dora": False}))
        expected = r"model\.layers\.0\.self_attn\.q_proj: has a DoRA lora_magnitude_vector but use_dora is false"
    report = check_adapter(saved_dora)
    assert not report.ok
    assert any(re.match(expected, p) for p in report.problems), report.problems


def test_factors_of_the_wrong_shape_are_refused_up_front(monkeypatch):
    """Two nn.Linear factors, but A does not map d_in -> r: the factor-shape rule names the module and shapes."""
    model = lora_llama()
    info = lora_modules(model)[0]
    info.layer.lora_A["default"] = nn.Linear(info.in_features, info.r + 1, bias=False)
    monkeypatch.setattr(fimlora.api, "compute_fisher", no_calibration)
    needle = (rf"{re.escape(info.name)}: layer type .* is not supported: its LoRA factors are not A \(r, d_in\) and "
              rf"B \(d_out, r\) of the layer: r=4, \(d_in, d_out\)=\(16, 16\), lora_A maps 16 -> 5, lora_B 4 -> 16")
    with pytest.raises(ValueError, match=needle):
        lora_modules(model)
    with pytest.raises(ValueError, match=needle):
        fimlora.compute_allocation(model, lm_batches(), FimConfig(progress=False))
