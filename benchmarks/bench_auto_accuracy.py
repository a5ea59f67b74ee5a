"""Does ``n_batches="auto"`` train as well as N = 8? A paired comparison on one MiniLM setup.

    .venv/bin/python benchmarks/bench_auto_accuracy.py                          # ~10-15 min on 2 shared cores
    .venv/bin/python benchmarks/bench_auto_accuracy.py --smoke --out /tmp/b.md  # about a minute

MiniLM / SST-2 (configs/small_encoder.yaml, r = 8, its 100 training steps), per seed: FIM-LoRA with N = 8 and
with ``n_batches="auto"`` (the library's default rule), each prepared, trained and evaluated exactly as the
sweep does it (same seed, so the same LoRA A draw, calibration batches, training order and test examples),
except that the trained model is scored in memory instead of after a save and reload. The difference in
accuracy (auto - N = 8, mean over seeds) gets a 95% paired bootstrap interval over the test examples: one
resample draws test examples with replacement and uses them for every seed and both methods, so the example
difficulty cancels. Writes its own marked section after section 7 of --out.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT), str(HERE)]

from sections import section_script_main, wrap  # noqa: E402

NAME = "bench_auto_accuracy.py"
CONFIG, TASK, RANK = "configs/small_encoder.yaml", "sst2", 8
SEEDS = {"full": [42, 1337, 2024], "smoke": [42]}
# The smoke run: one layer, a tiny split, a few steps.
SMOKE_OVERRIDES = {"n_layers": 1, "data": {"max_train": 96, "max_test": 32, "data_seed": 0}}
SMOKE_TRAIN = {"max_steps": 3}
VARIANTS = (("N = 8", {}), ("auto", {"n_batches": "auto"}))
RESAMPLES, LEVEL = 2000, 0.95


def train_and_score(size: str, seed: int, fim: dict) -> dict:
    """One run as fimlora.bench.sweep.run_one does it; per-example correctness on the test split."""
    import functools
    from dataclasses import asdict, replace

    from transformers import set_seed

    from fimlora.app.builders import build_base_model, build_calibration_loader, build_tokenizer
    from fimlora.app.train import TrainSettings, finetune, predict
    from fimlora.bench.config import ExperimentConfig, RunSpec, load_config
    from fimlora.bench.methods import prepare_method
    from fimlora.bench.sweep import _load_tasks, _method_spec, causal_lm_dtype

    cfg = load_config(ROOT / CONFIG)
    train = dict(cfg.train)
    if size == "smoke":
        cfg = ExperimentConfig(**{**asdict(cfg), **SMOKE_OVERRIDES})
        train.update(SMOKE_TRAIN)
    settings = TrainSettings(**{**train, "seed": seed, "progress": False})
    run = RunSpec(TASK, "fim", RANK, seed)
    train_task, eval_tasks = _load_tasks(cfg, run)
    tok = build_tokenizer(cfg.model)
    batches = functools.partial(build_calibration_loader, train_task, tok, settings.batch_size, settings.max_length,
                                seed)
    set_seed(seed)
    spec = _method_spec(cfg, run, train_task.kind, len(train_task.train), settings)
    spec = replace(spec, fim={**spec.fim, **fim})
    base = build_base_model(cfg.model, train_task, cfg.n_layers, seed, causal_lm_dtype(settings.precision))
    model, info, callbacks = prepare_method(spec, base, batches)
    import tempfile

    with tempfile.TemporaryDirectory() as work:
        out = finetune(model, train_task, tok, settings, work, callbacks=callbacks)
    (task,) = eval_tasks
    preds, refs = predict(model, task, task.test, tok, settings)
    return {"correct": [int(p == r) for p, r in zip(preds, refs)], "batches": info.get("n_batches_used"),
            "stop_reason": info.get("stop_reason"), "ranks": info.get("allocated_ranks"),
            "train_loss": out["train_loss"], "diverged": out["diverged"]}


def paired_interval(a: list[list[int]], b: list[list[int]], resamples: int = RESAMPLES, level: float = LEVEL,
                    seed: int = 0) -> tuple[float, float, float]:
    """mean_s (acc_a,s - acc_b,s) and its paired bootstrap interval over test examples: the harness's
    :func:`fimlora.bench.significance.paired_bootstrap` (examples resampled, seeds pooled)."""
    from fimlora.bench.significance import paired_bootstrap

    r = paired_bootstrap(a, b, n_resamples=resamples, seed=seed, confidence=level)
    return r["difference"], r["ci_low"], r["ci_high"]


def measure(size: str) -> dict:
    from fimlora.io import package_versions

    runs = []
    for seed in SEEDS[size]:
        for name, fim in VARIANTS:
            print(f"seed {seed}, {name}", flush=True)
            runs.append({"seed": seed, "variant": name, **train_and_score(size, seed, fim)})
    return {"date": time.strftime("%Y-%m-%d"), "size": size, "versions": package_versions(), "runs": runs}


def render_section(data: dict, command: str, note: str) -> str:
    runs = data["runs"]
    seeds = list(dict.fromkeys(r["seed"] for r in runs))
    by = {(r["seed"], r["variant"]): r for r in runs}
    auto = [by[s, "auto"]["correct"] for s in seeds]
    fixed = [by[s, "N = 8"]["correct"] for s in seeds]
    diff, lo, hi = paired_interval(auto, fixed)
    n = len(auto[0])

    def acc(r):
        return 100 * sum(r["correct"]) / len(r["correct"])

    lines = ["### 7b. Accuracy: `n_batches=\"auto\"` against N = 8, paired", "",
             f"Generated by `{command}` on {data['date']}. MiniLM / SST-2, r = {RANK}, the encoder suite's "
             f"training (seeds {', '.join(map(str, seeds))}; {n} test examples); each pair shares its seed, LoRA A "
             "draw, calibration batches, training order and test examples. Interval: paired bootstrap over test "
             f"examples ({RESAMPLES} resamples, {100 * LEVEL:.0f}%), the same examples for every seed and both "
             f"methods.{' ' + note if note else ''}", "",
             "| seed | auto: batches | N = 8 accuracy | auto accuracy | modules with a different rank |",
             "|---|---|---|---|---|"]
    for s in seeds:
        a, f = by[s, "auto"], by[s, "N = 8"]
        changed = sum(a["ranks"][m] != f["ranks"][m] for m in f["ranks"])
        lines.append(f"| {s} | {a['batches']} | {acc(f):.1f} | {acc(a):.1f} | {changed} of {len(f['ranks'])} |")
    verdict = "a tie: the interval contains 0" if lo <= 0 <= hi else "not a tie: the interval excludes 0"
    lines += ["", f"auto - N = 8: {100 * diff:+.2f} accuracy points, {100 * LEVEL:.0f}% interval "
              f"[{100 * lo:+.2f}, {100 * hi:+.2f}]; {verdict}. Over {len(seeds)} seeds only the test examples are "
              "resampled, so the interval leaves out seed-to-seed training noise."]
    return wrap(NAME, "\n".join(lines) + "\n")


def main(argv=None) -> int:
    return section_script_main(argv, __doc__, NAME, "auto_accuracy", ROOT / "docs" / "benchmarks.md", measure,
                               render_section)


if __name__ == "__main__":
    sys.exit(main())
