"""Multiple-choice scoring: each context once with its KV cache shared by the choices, against one forward per choice.

    .venv/bin/python benchmarks/bench_scoring.py                       # SmolLM2 (30 layers), 100 sst2_mc + 100 obqa
    .venv/bin/python benchmarks/bench_scoring.py --smoke --out /tmp/s.json   # seconds; used by the tests

``choice_logliks(shared_context=False)`` runs every (context, choice) as its own right-padded sequence and the
vocabulary head at every position; ``shared_context=True`` runs each context once (left-padded, logits of its last
position only), copies its cache to the choices and runs only their tokens. Both are timed in one process on the
same examples, alternating, ``--repeats`` times; the claim is the ratio of medians (time is noisy here: never an
absolute number). The log-likelihoods of the two paths are compared too (max |difference|, and whether every
prediction agrees), so a faster path that scores otherwise would show.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def measure(model, tok, examples, batch_size: int, repeats: int) -> dict:
    from fimlora.app.scoring import choice_logliks

    times = {"flat": [], "shared": []}
    scores = {}
    for _ in range(repeats):
        for path in ("flat", "shared"):
            start = time.perf_counter()
            scores[path] = choice_logliks(model, tok, examples, batch_size=batch_size, max_length=256,
                                          shared_context=path == "shared")
            times[path].append(time.perf_counter() - start)
    diff = max(abs(scores["flat"][k] - scores["shared"][k]) for k in scores["flat"])

    def predictions(s):
        return [max(range(len(e["choices"])), key=lambda c: s[(i, c)]) for i, e in enumerate(examples)]

    positions = {path: 0 for path in times}
    for e in examples:
        ctx = len(tok(e["context"], add_special_tokens=False)["input_ids"])
        conts = [len(tok(" " + c, add_special_tokens=False)["input_ids"]) for c in e["choices"]]
        positions["flat"] += sum(ctx + c for c in conts)
        positions["shared"] += ctx + sum(conts)
    flat, shared = statistics.median(times["flat"]), statistics.median(times["shared"])
    return {"examples": len(examples), "choices": sum(len(e["choices"]) for e in examples),
            "positions": positions, "flat_s": times["flat"], "shared_s": times["shared"],
            "speedup": flat / shared, "max_abs_diff": diff,
            "same_predictions": predictions(scores["flat"]) == predictions(scores["shared"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="2 layers, 8 examples per task, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16, help="the harness's eval batch size")
    parser.add_argument("--out", default=None, help="JSON with the measurements")
    args = parser.parse_args(argv)
    from fimlora.app.models import load_causal_lm, load_tokenizer
    from fimlora.app.tasks import load_task
    from fimlora.io import package_versions

    torch.set_num_threads(1)
    n_layers, n_test, repeats = (2, 8, 1) if args.smoke else (None, 100, args.repeats)
    model = load_causal_lm("smollm2", n_layers).eval()
    tok = load_tokenizer("smollm2")
    rows = {}
    for task_name in ("sst2_mc", "obqa"):
        task = load_task(task_name, seed=0, max_test=n_test)
        rows[task_name] = measure(model, tok, task.test, args.batch_size, repeats)
    print("| task | examples | choices | positions run (one per choice / shared) | median time ratio | "
          "max abs loglik diff | same predictions |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['examples']} | {r['choices']} | {r['positions']['flat']:,} / "
              f"{r['positions']['shared']:,} | {r['speedup']:.2f}x | {r['max_abs_diff']:.2g} | "
              f"{'yes' if r['same_predictions'] else 'NO'} |")
    if args.out:
        record = {"command": " ".join(["benchmarks/bench_scoring.py", *(argv or sys.argv[1:])]),
                  "date": time.strftime("%Y-%m-%d"), "layers": n_layers or "all", "repeats": repeats,
                  "batch_size": args.batch_size, "versions": package_versions(), "rows": rows}
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
