#!/usr/bin/env bash
# The LLaMA-Factory recipe end to end, offline (docs/llamafactory.md): fimlora calibrates SmolLM2-135M-Instruct on
# the bundled examples/llamafactory/alpaca_tiny.json (project .venv), then LLaMA-Factory trains that adapter for 3
# steps on the CPU in a venv of its own (.venv-llamafactory from requirements-llamafactory.txt; llamafactory 0.9.5
# pins transformers/PEFT/TRL below the project's, so it never touches .venv), and the trained adapter is checked:
# the calibrated rank_pattern/alpha_pattern and tensor shapes, every LoRA-B trained. Optional, not part of .ci/run.
# Idempotent: a second run with unchanged requirements skips the installs. FIMLORA_LLAMAFACTORY_VENV moves the venv;
# FIMLORA_LLAMAFACTORY_OUT (default runs/llamafactory) is where the adapters go.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${FIMLORA_LLAMAFACTORY_VENV:-.venv-llamafactory}"
OUT="${FIMLORA_LLAMAFACTORY_OUT:-runs/llamafactory}"
PY="${PYTHON:-python3.11}"
TORCH_VERSION="${FIMLORA_TORCH_VERSION:-2.13.0}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.fimlora-llamafactory-$(cat requirements-llamafactory.txt scripts/test_llamafactory.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
  pip install "torch==${TORCH_VERSION}"
  pip install -r requirements-llamafactory.txt "torch==${TORCH_VERSION}"
  pip install --no-deps llamafactory==0.9.5
  rm -f "$VENV"/.fimlora-llamafactory-*
  touch "$stamp"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export DISABLE_VERSION_CHECK=1  # LLaMA-Factory's own check of its pins; the venv holds exactly those pins

# 1. Calibrate (project venv): the same model and rows LLaMA-Factory will train on.
.venv/bin/fimlora calibrate --model smollm2 --data examples/llamafactory/alpaca_tiny.json \
    --target-modules q_proj k_proj v_proj o_proj gate_proj up_proj down_proj \
    --r 8 --alpha 16 --n-batches 4 --batch-size 4 --max-length 128 --no-progress --overwrite --out "$OUT/fim"
BASE="$(.venv/bin/python -c 'import json, sys; print(json.load(open(sys.argv[1]))["base_model_name_or_path"])' \
    "$OUT/fim/adapter/adapter_config.json")"

# 2. Train that adapter with LLaMA-Factory (its venv; the torchaudio stand-in on the path).
PATH="$PWD/$VENV/bin:$PATH" PYTHONPATH="$PWD/examples/llamafactory/stubs" \
  "$VENV/bin/llamafactory-cli" train examples/llamafactory/llama_fim.yaml \
    model_name_or_path="$BASE" adapter_name_or_path="$OUT/fim/adapter" output_dir="$OUT/trained"

# 3. The trained adapter keeps the calibrated ranks and alphas, and every LoRA-B moved from 0.
.venv/bin/python - "$OUT/fim/adapter" "$OUT/trained" <<'PY'
import json, sys
from pathlib import Path
from safetensors.torch import load_file
fim, trained = (Path(p) for p in sys.argv[1:])
a, b = (json.loads((p / "adapter_config.json").read_text()) for p in (fim, trained))
assert a["rank_pattern"] == b["rank_pattern"] and a["alpha_pattern"] == b["alpha_pattern"], "patterns changed"
ta, tb = (load_file(p / "adapter_model.safetensors") for p in (fim, trained))
assert {k: v.shape for k, v in ta.items()} == {k: v.shape for k, v in tb.items()}, "tensor shapes changed"
untrained = [k for k, v in tb.items() if "lora_B" in k and not v.abs().sum() > 0]
assert not untrained, f"LoRA-B not trained: {untrained[:3]}"
ranks = sorted(set(a["rank_pattern"].values()))
print(f"OK: LLaMA-Factory trained the fimlora adapter, {len(a['rank_pattern'])} modules at ranks {ranks[0]}-{ranks[-1]}")
PY
