"""Benchmarks are not tests: this only keeps the benchmark script from rotting (tiny sizes, one repeat)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_benchmark_script_smoke(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_calibration", ROOT / "benchmarks" / "bench_calibration.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "b.md"
    committed = ROOT / "results" / "small_encoder"  # the replication's result JSONs are in the repo
    assert bench.main(["--smoke", "--out", str(out), "--results", str(committed), str(tmp_path / "none")]) == 0
    text = out.read_text()
    for heading in ("## 1. Calibration vs its floor", "## 2. Against PEFT's EVA", "## 3. Peak memory",
                    "## 4. Allocator and resize scale", "## 5. Calibration as a share"):
        assert heading in text
    assert "| tiny llama 2x64 |" in text
    assert "| small_encoder | minilm | 18 | 8 | 100 | 8% |" in text  # 3 tasks x 2 ranks x 3 seeds
