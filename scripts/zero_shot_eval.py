"""The reference point before fine-tuning, on a config's own test sets (the same questions as its runs).

    .venv/bin/python scripts/zero_shot_eval.py configs/small_decoder.yaml      # ~2 min on one core
    .venv/bin/python scripts/zero_shot_eval.py configs/frontier_decoder.yaml   # ~20 s
    .venv/bin/python scripts/zero_shot_eval.py configs/frontier_encoder.yaml   # no model needed

A multiple-choice task is scored with the un-tuned model (log-likelihood of each choice, as the runs are). A
classification task has no un-tuned answer: its head is new and random, so its floor is the majority class's
share of the test set ("majority_class"), which is what a model that learned nothing but the label prior scores.
Prints one JSON object {task: {"accuracy" or "majority_class", "n"}, "Avg": mean of those numbers}.
"""

import collections
import json
import statistics
import sys

import torch

from fimlora.app.models import load_causal_lm, load_tokenizer
from fimlora.app.train import TrainSettings, evaluate
from fimlora.bench.config import load_config
from fimlora.bench.sweep import causal_lm_dtype, load_eval_tasks

SCORED_BY_MODEL = ("multiple_choice",)


def majority_class(task) -> dict:
    """The largest label's share of ``task.test`` (classification rows carry an integer ``label``)."""
    counts = collections.Counter(row["label"] for row in task.test)
    return {"majority_class": max(counts.values()) / len(task.test), "n": len(task.test)}


def main(path: str) -> dict:
    cfg = load_config(path)
    evals = load_eval_tasks(cfg)
    unsupported = [t.name for t in evals if t.kind not in SCORED_BY_MODEL + ("classification",)]
    if unsupported:
        raise ValueError(f"tasks: no un-tuned reference for {unsupported} (kinds: multiple_choice, classification)")
    out, model = {}, None
    settings = TrainSettings(**{**cfg.train, "progress": False})
    for task in evals:
        if task.kind == "classification":
            out[task.name] = majority_class(task)
            continue
        if model is None:
            tok = load_tokenizer(cfg.model)
            model = load_causal_lm(cfg.model, cfg.n_layers, dtype=causal_lm_dtype(settings.precision)).eval()
        result = evaluate(model, task, tok, settings)
        out[task.name] = {"accuracy": result["accuracy"], "n": result["n"]}
    out["Avg"] = statistics.fmean(next(v for k, v in m.items() if k != "n") for m in out.values())
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(main(sys.argv[1])))
