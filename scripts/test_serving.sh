#!/usr/bin/env bash
# The llama.cpp serving lane: installs llama-cpp-python (requirements-serving.txt) into ./.venv, extracts llama.cpp's
# own convert_lora_to_gguf.py from the same pinned sdist, and runs the tests marked llamacpp (tests/serving/):
# a fimlora adapter on SmolLM2 converted by llama.cpp's converter and run by llama.cpp, against PEFT.
# The first run compiles llama.cpp (measured: 16 minutes on 2 cores shared with other work; CMAKE_BUILD_PARALLEL_LEVEL
# defaults to every core); later runs reuse pip's cached wheel (or one in PIP_FIND_LINKS) and the tests take about a
# minute (SmolLM2 converted once to an F32 GGUF, two adapters converted and run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Portable CPU build: no -march=native (the x86-64 baseline ggml picks then is AVX2/FMA/F16C), no BLAS, and only the
# library (no server, tools, tests or multimodal), which is all llama_cpp needs.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_BLAS=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install -r requirements-serving.txt

# The converters ship in the sdist only (the wheel holds the library): unpack them beside the repo, once per version.
version="$(sed -n 's/^llama-cpp-python==//p' requirements-serving.txt)"
dest=.cache/serving/llama.cpp
if [ "$(cat "$dest/VERSION" 2>/dev/null)" != "$version" ]; then
  rm -rf .cache/serving && mkdir -p .cache/serving/sdist
  pip download --no-deps --no-binary :all: "llama-cpp-python==$version" -d .cache/serving/sdist
  root="llama_cpp_python-$version/vendor/llama.cpp"
  tar -xzf ".cache/serving/sdist/llama_cpp_python-$version.tar.gz" -C .cache/serving \
    "$root/convert_lora_to_gguf.py" "$root/convert_hf_to_gguf.py" "$root/conversion" "$root/gguf-py"
  mv ".cache/serving/$root" "$dest"
  rm -rf ".cache/serving/llama_cpp_python-$version" .cache/serving/sdist
  echo "$version" > "$dest/VERSION"
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider -m llamacpp tests/serving "$@"
