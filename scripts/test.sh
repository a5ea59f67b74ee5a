#!/usr/bin/env bash
# The test command: installs what it needs (scripts/setup.sh, a local .venv; nothing system-wide),
# lints, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
