"""The un-tuned model's accuracy on a decoder config's eval tasks (same questions as its runs).

    .venv/bin/python scripts/zero_shot_eval.py configs/small_decoder.yaml   # ~2 min on one core

A reference point for docs/results.md: how far fine-tuning moved the model at all.
Prints one JSON object {task: {"accuracy", "n"}, "Avg": mean accuracy}.
"""

import json
import statistics
import sys

import torch

from fimlora.experiments.config import load_config
from fimlora.experiments.models import load_causal_lm, load_tokenizer
from fimlora.experiments.sweep import causal_lm_dtype, load_mixture_eval_tasks
from fimlora.experiments.train import TrainSettings, evaluate


def main(path: str) -> dict:
    cfg = load_config(path)
    evals = load_mixture_eval_tasks(cfg)  # the runs' own questions
    settings = TrainSettings(**{**cfg.train, "progress": False})
    tok = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model, cfg.n_layers, dtype=causal_lm_dtype(settings.precision)).eval()
    out = {t.name: evaluate(model, t, tok, settings) for t in evals}
    out["Avg"] = statistics.fmean(m["accuracy"] for m in out.values())
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(main(sys.argv[1])))
