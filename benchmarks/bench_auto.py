"""Calibration that stops when the rank map is stable, against N = 8 and against EVA's own stopping rule.

    .venv/bin/python benchmarks/bench_auto.py                          # ~15 min on 2 CPU cores; section 7
    .venv/bin/python benchmarks/bench_auto.py --smoke --out /tmp/b.md  # under a minute; used by the tests

Per setup (the experiment suites' own model, data, batch size and LoRA config, r = 8) and seed, each method is
prepared exactly as the sweep prepares it (fimlora.experiments.methods.prepare_method) on the same calibration
batches: FIM-LoRA with N = 8 batches, FIM-LoRA with ``n_batches="auto"`` (stops when at least 90% of the
modules keep their rank in at least 90% of 200 bootstrap resamples of the batches so far; 2 to 32 batches),
and PEFT's EVA (rho 2) with its own rule (it replays the batches until its SVD components converge). Reported:
batches used (FIM) and forward passes (EVA, counted on the model), wall seconds, and the ratios to FIM-LoRA at
N = 8 measured in the same run. Accuracy after training with "auto" is in docs/results.md (the *_beyond
experiments); this script trains nothing.

The section is written between marker lines into --out (docs/benchmarks.md) before its "## GPU" section;
bench_calibration.py keeps it when it regenerates the other sections.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT), str(HERE)]

from sections import put_section, wrap  # noqa: E402

NAME = "bench_auto.py"
# (label, config, task label or None for the config's mixture)
SETUPS = {
    "full": [("MiniLM / SST-2", "configs/small_encoder.yaml", "sst2"),
             ("MiniLM / TREC-6", "configs/small_encoder.yaml", "trec6"),
             ("SmolLM2 / commonsense mixture", "configs/small_decoder.yaml", None)],
    "smoke": [("MiniLM (1 layer) / SST-2", "configs/small_encoder.yaml", "sst2")],
}
SEEDS = {"full": [42, 1337, 2024], "smoke": [42]}
RANK = 8
# The smoke run shrinks the setup: one layer, a small training split.
SMOKE_OVERRIDES = {"n_layers": 1, "data": {"max_train": 96, "max_test": 16, "data_seed": 0}}
METHODS = (("FIM-LoRA, N = 8", "fim", {}), ("FIM-LoRA, auto", "fim", {"n_batches": "auto"}), ("EVA", "eva", None))


def measure_setup(config_path: str, task: str | None, seed: int, smoke: bool) -> dict:
    """One setup and seed: every method's calibration as the sweep prepares it, on the same batches."""
    from dataclasses import asdict, replace

    from fimlora.experiments.builders import build_base_model, build_calibration_loader, build_tokenizer
    from fimlora.experiments.config import ExperimentConfig, RunSpec, load_config
    from fimlora.experiments.methods import prepare_method
    from fimlora.experiments.sweep import _load_tasks, _method_spec, causal_lm_dtype
    from fimlora.experiments.train import TrainSettings

    cfg = load_config(ROOT / config_path)
    if smoke:
        cfg = ExperimentConfig(**{**asdict(cfg), **SMOKE_OVERRIDES})
    label = task or cfg.task_labels[0]
    settings = TrainSettings(**{**cfg.train, "seed": seed, "progress": False})
    train_task, _ = _load_tasks(cfg, RunSpec(label, "fim", RANK, seed))
    tok = build_tokenizer(cfg.model)
    batches = functools.partial(build_calibration_loader, train_task, tok, settings.batch_size, settings.max_length,
                                seed)
    out = {}
    for name, method, fim in METHODS:
        spec = _method_spec(cfg, RunSpec(label, method, RANK, seed), train_task.kind, len(train_task.train), settings)
        if fim is not None:
            spec = replace(spec, fim={**spec.fim, **fim})
        base = build_base_model(cfg.model, train_task, cfg.n_layers, seed, causal_lm_dtype(settings.precision))
        start = time.perf_counter()
        _, info, _ = prepare_method(spec, base, batches)
        out[name] = {"seconds": time.perf_counter() - start, "calibration_seconds": info["calibration_seconds"],
                     "batches": info.get("n_batches_used"), "forward_passes": info.get("eva_forward_passes"),
                     "stop_reason": info.get("stop_reason"), "stable_share": info.get("stable_share")}
    return out


def measure(size: str) -> dict:
    from fimlora.io import package_versions

    rows = []
    for label, config, task in SETUPS[size]:
        for seed in SEEDS[size]:
            print(f"{label}, seed {seed}", flush=True)
            rows.append({"setup": label, "config": config, "task": task, "seed": seed,
                         "methods": measure_setup(config, task, seed, size == "smoke")})
    return {"date": time.strftime("%Y-%m-%d"), "rank": RANK, "size": size, "versions": package_versions(),
            "rows": rows}


def _spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}–{max(xs):.2f})"


def render_section(data: dict, command: str, note: str) -> str:
    """Section 7 of docs/benchmarks.md from :func:`measure`'s output."""
    lines = ["## 7. Calibrating until the rank map is stable (`n_batches=\"auto\"`) against N = 8 and EVA", "",
             f"Generated by `{command}` on {data['date']}; r = {data['rank']}; "
             + ", ".join(f"{k} {v}" for k, v in data["versions"].items()) + f".{' ' + note if note else ''}", "",
             "Per setup, over seeds: batches used by FIM-LoRA with `n_batches=\"auto\"` (stop: at least 90% of the "
             "modules keep their rank in at least 90% of 200 bootstrap resamples; 2 to 32 batches), EVA's forward "
             "passes until its components converge (counted on the model: EVA replays its batches), and each "
             "method's calibration seconds as a ratio to FIM-LoRA with N = 8 in the same run (median, min–max).", "",
             "| setup | seeds | auto: batches used | auto: stopped because | auto / N = 8 time | "
             "EVA forward passes | EVA / N = 8 time |", "|---|---|---|---|---|---|---|"]
    for setup in dict.fromkeys(r["setup"] for r in data["rows"]):
        rows = [r["methods"] for r in data["rows"] if r["setup"] == setup]
        fixed = [m["FIM-LoRA, N = 8"]["calibration_seconds"] for m in rows]
        auto = [m["FIM-LoRA, auto"] for m in rows]
        eva = [m["EVA"] for m in rows]
        stops = sorted({a["stop_reason"].split(":")[0] for a in auto})
        lines.append(
            f"| {setup} | {len(rows)} | {', '.join(str(a['batches']) for a in auto)} | {', '.join(stops)} | "
            f"{_spread([a['calibration_seconds'] / f for a, f in zip(auto, fixed)])} | "
            f"{', '.join(str(e['forward_passes']) for e in eva)} | "
            f"{_spread([e['calibration_seconds'] / f for e, f in zip(eva, fixed)])} |")
    return wrap(NAME, "\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="one tiny setup and seed: checks the script runs")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--note", default="", help="a sentence about the machine during the run")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    data = measure("smoke" if args.smoke else "full")
    command = "python benchmarks/bench_auto.py" + (" --smoke" if args.smoke else "")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = out.read_text() if out.exists() else ""
    out.write_text(put_section(text, render_section(data, command, args.note), NAME))
    out.with_name(out.stem + "_auto.json").write_text(json.dumps(data, indent=2))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
