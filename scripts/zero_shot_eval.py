"""The un-tuned model's accuracy on a decoder config's eval tasks (same questions as its runs).

    .venv/bin/python scripts/zero_shot_eval.py configs/small_decoder.yaml   # ~2 min on one core

A reference point for docs/results.md: how far fine-tuning moved the model at all.
Prints one JSON object {task: {"accuracy", "n"}, "Avg": mean accuracy}.
"""

import json
import statistics
import sys

import torch

from fimlora.data import load_task
from fimlora.experiment import load_config
from fimlora.models import load_causal_lm, load_tokenizer
from fimlora.train import TrainSettings, evaluate


def main(path: str) -> dict:
    cfg = load_config(path)
    if not cfg.mixture:
        raise SystemExit(f"{path}: zero-shot reference needs a decoder config with a mixture, got tasks {cfg.tasks}")
    settings = TrainSettings(**{**cfg.train, "progress": False})
    tok = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model, cfg.n_layers, dtype=torch.float32).eval()
    seed = cfg.data.get("data_seed", 0)  # the same split and subsample as run_one's eval tasks
    out = {name: evaluate(model, load_task(name, seed=seed, max_test=cfg.data.get("max_test")), tok, settings)
           for name in cfg.mixture["eval"]}
    out["Avg"] = statistics.fmean(m["accuracy"] for m in out.values())
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(main(sys.argv[1])))
