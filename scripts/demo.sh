#!/usr/bin/env bash
# The main job: installs what it needs, then runs the offline FIM-LoRA demo on real MiniLM + SST-2.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/fimlora demo "$@"
