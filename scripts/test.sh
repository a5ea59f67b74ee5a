#!/usr/bin/env bash
# The test command: installs what it needs (scripts/setup.sh, a local .venv; nothing system-wide),
# lints, then runs the whole suite across the cores (pytest-xdist), each test under a time limit (pytest-timeout).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
.venv/bin/ruff check .
# One worker per core (FIMLORA_TEST_WORKERS overrides; 0 runs in this process); worksteal keeps the few slow
# tests from queueing behind each other on one worker.
exec .venv/bin/python -m pytest -q -n "${FIMLORA_TEST_WORKERS:-auto}" --dist worksteal "$@"
