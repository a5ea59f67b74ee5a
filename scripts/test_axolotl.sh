#!/usr/bin/env bash
# The optional axolotl lane: a separate venv (.venv-axolotl; axolotl pins its own transformers/PEFT/TRL, so it
# never goes into .venv) from requirements-axolotl.txt, fimlora installed there without its dependencies, then
# the tests marked `axolotl` (real `python -m axolotl.cli.train` runs on a tiny LLaMA, on the CPU).
# Idempotent: a second run with unchanged requirements skips the install. FIMLORA_AXOLOTL_VENV moves the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FIMLORA_AXOLOTL_VENV:-.venv-axolotl}"
PY="${PYTHON:-python3.11}"  # axolotl 0.19.0 is the last release for Python 3.11 (0.20+ needs 3.12)
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.fimlora-axolotl-$(cat requirements-axolotl.txt pyproject.toml scripts/test_axolotl.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
  pip install "torch==2.13.0"
  pip install --no-deps -r requirements-axolotl.txt
  pip install --no-deps -e .
  rm -f "$VENV"/.fimlora-axolotl-*
  touch "$stamp"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
"$VENV/bin/python" -c "import axolotl.integrations.base, axolotl.core.builders, fimlora.integrations.axolotl"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider -m axolotl tests/lib/test_axolotl.py "$@"
