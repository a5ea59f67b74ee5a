#!/usr/bin/env bash
# The GPU check of issue #15 in one command: a Llama-3-8B-shaped model with random bf16 weights on one CUDA GPU,
# LoRA r = 16 on all seven projections, 8 batches of 4 x 2048 tokens; calibration time against its floor (both
# estimators), peak torch.cuda.max_memory_allocated against one LoRA training step, QLoRA nf4 (if bitsandbytes
# imports), EVA (if it fits the time budget). No network, no download; the phases stop within a 7-minute budget
# (--budget-s), so that the whole command stays under 8 minutes on one H200 (not yet run on a GPU).
# Writes docs/benchmarks_gpu.json and the "## GPU" section of docs/benchmarks.md (the other sections are kept).
#
#   bash benchmarks/gpu_check.sh                  # on a machine with a CUDA build of torch in .venv
#   bash benchmarks/gpu_check.sh --cpu-tiny       # the same code on the CPU at a tiny shape, into a temp folder
#   bash benchmarks/gpu_check.sh --help           # budget, repeats, --skip eva qlora, output paths
#
# Exit status: 0 when every phase ran or was skipped with its reason recorded, 1 if a phase ran out of memory or
# failed (the JSON and the section are still written), 2 when torch sees no CUDA device (unless --cpu-tiny).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# FIMLORA_PYTHON: another interpreter with fimlora's requirements (e.g. a conda env with a CUDA torch).
PY="${FIMLORA_PYTHON:-.venv/bin/python}"
if [[ -z "${FIMLORA_PYTHON:-}" && ! -x .venv/bin/python ]]; then
  echo "gpu_check: no .venv here; running scripts/setup.sh (it needs the network once; if its torch then sees no" \
       "CUDA device, install a CUDA build of torch into .venv)" >&2
  bash scripts/setup.sh
fi
# Everything is built locally: no hub access, ever.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
# Expandable segments keep the caching allocator from fragmenting between the phases' differently sized tensors
# (max_memory_allocated, which the check reports, counts allocated bytes and does not depend on it).
if [[ -z "${PYTORCH_CUDA_ALLOC_CONF:-}" && -z "${PYTORCH_ALLOC_CONF:-}" ]]; then
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
fi
exec "$PY" benchmarks/gpu_check.py "$@"
