"""Multiple-choice scoring: each context once with its KV cache shared by the choices, and the vocabulary head only
where a choice token is predicted, against one forward per choice with the head everywhere.

    .venv/bin/python benchmarks/bench_scoring.py    # SmolLM2 (30 layers), 100 sst2_mc + 100 obqa, every path
    .venv/bin/python benchmarks/bench_scoring.py --paths shared shared_head   # the two a decoder run chooses from
    .venv/bin/python benchmarks/bench_scoring.py --smoke --out /tmp/s.json --doc /tmp/b.md   # seconds

The paths (:data:`PATHS`), all ``fimlora.app.scoring.choice_logliks``: ``flat`` runs every (context, choice) as
its own right-padded sequence; ``shared`` runs each context once (left-padded, logits of its last position only),
copies its cache to the choices and runs only their tokens; ``*_head`` run the vocabulary head (and the
log-softmax) only at the positions that predict a choice token, the others at every position of the forward
(``head_only_where_scored=False``). All are timed in one process on the same examples, alternating,
``--repeats`` times; the claim is the ratio of medians against the first path (time is noisy here: never an
absolute number). The log-likelihoods are compared with the first path's too (max |difference|, and whether every
prediction agrees), so a faster path that scores otherwise would show. The raw data go to ``--out``
(docs/bench_scoring.json), the table between its markers in ``--doc`` (docs/benchmarks.md), with a decoder run's
time (``--run-wall-seconds``, the frontier_decoder suite's median run, less the median here of the path it scored
with) turned into runs per hour.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT / "src"), str(HERE)]

from sections import put_section, wrap  # noqa: E402

NAME = "bench_scoring.py"
# name: (shared_context, head_only_where_scored), the choice_logliks arguments of each path.
# The sst2_mc test sentences a frontier_decoder run scores.
RUN_EXAMPLES = 100
PATHS = {"flat": (False, False), "flat_head": (False, True), "shared": (True, False), "shared_head": (True, True)}


def measure(model, tok, examples, batch_size: int, repeats: int, paths: list[str]) -> dict:
    """Each path's seconds per repeat, its speedup against ``paths[0]`` (ratio of medians), the positions the
    forwards run and the largest log-likelihood difference against ``paths[0]``."""
    from fimlora.app.scoring import choice_logliks

    times = {path: [] for path in paths}
    scores = {}
    for _ in range(repeats):
        for path in paths:
            shared, head = PATHS[path]
            start = time.perf_counter()
            scores[path] = choice_logliks(model, tok, examples, batch_size=batch_size, max_length=256,
                                          shared_context=shared, head_only_where_scored=head)
            times[path].append(time.perf_counter() - start)

    def predictions(s):
        return [max(range(len(e["choices"])), key=lambda c: s[(i, c)]) for i, e in enumerate(examples)]

    positions = {"one per choice": 0, "shared": 0, "scored": 0}
    for e in examples:
        ctx = len(tok(e["context"], add_special_tokens=False)["input_ids"])
        conts = [len(tok(" " + c, add_special_tokens=False)["input_ids"]) for c in e["choices"]]
        positions["one per choice"] += sum(ctx + c for c in conts)
        positions["shared"] += ctx + sum(conts)
        positions["scored"] += sum(conts)
    reference = paths[0]
    median = {path: statistics.median(t) for path, t in times.items()}
    return {"examples": len(examples), "choices": sum(len(e["choices"]) for e in examples),
            "positions": positions, "seconds": times, "median_s": median,
            "speedup": {path: median[reference] / median[path] for path in paths},
            "max_abs_diff": {path: max(abs(scores[reference][k] - scores[path][k]) for k in scores[reference])
                             for path in paths},
            "same_predictions": {path: predictions(scores[reference]) == predictions(scores[path])
                                 for path in paths}}


def runs_per_hour(run_seconds: float, scoring_seconds: float) -> float:
    """3600 / (a decoder run's time without scoring + the scoring's): runs per hour on one core."""
    return 3600.0 / (run_seconds + scoring_seconds)


def render(record: dict) -> str:
    """The section of docs/benchmarks.md: one row per (task, path), then runs per hour of a decoder run."""
    paths, rows = record["paths"], record["rows"]
    lines = [f"## 8. Multiple-choice scoring (SmolLM2, {record['layers']} layers, CPU, one thread)", "",
             f"`{record['command']}` ({record['date']}, median of {record['repeats']}, batch size "
             f"{record['batch_size']}). Paths: {', '.join(f'`{p}`' for p in paths)} (see the script's docstring); "
             f"speedup and differences against `{paths[0]}`.", "",
             "| task | examples | choices | positions run (one per choice / shared / scored) | path | median s | "
             "speedup | max abs loglik diff | same predictions |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        pos = r["positions"]
        for path in paths:
            lines.append(f"| {name} | {r['examples']} | {r['choices']} | {pos['one per choice']:,} / "
                         f"{pos['shared']:,} / {pos['scored']:,} | `{path}` | {r['median_s'][path]:.1f} | "
                         f"{r['speedup'][path]:.2f}x | {r['max_abs_diff'][path]:.2g} | "
                         f"{'yes' if r['same_predictions'][path] else 'NO'} |")
    decoder = record.get("decoder_runs")
    if decoder:
        lines += ["", f"A frontier_decoder run (sst2_mc, 100 test sentences) takes {decoder['wall_seconds']:.0f} s "
                      f"({decoder['source']}), scored with `{decoder['scored_with']}`: "
                      f"{decoder['run_seconds']:.0f} s without its scoring. With each path's sst2_mc scoring time "
                      f"(above, scaled to {RUN_EXAMPLES} sentences) added, runs per hour on one core:", "",
                  "| path | runs per hour |", "|---|---|"]
        lines += [f"| `{path}` | {value:.1f} |" for path, value in decoder["runs_per_hour"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="2 layers, 8 examples per task, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16, help="the harness's eval batch size")
    parser.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS),
                        help="the first is the one the others are compared with")
    parser.add_argument("--max-test", type=int, default=100, help="test examples per task")
    parser.add_argument("--run-wall-seconds", type=float, default=None,
                        help="a decoder run's wall seconds, scoring included, for runs per hour")
    parser.add_argument("--run-scored-with", choices=list(PATHS), default="shared",
                        help="the path those runs scored with (its median here is taken off the wall time)")
    parser.add_argument("--run-source", default="", help="where --run-wall-seconds comes from")
    parser.add_argument("--out", default=None, help="JSON with the measurements (docs/bench_scoring.json)")
    parser.add_argument("--doc", default=None, help="the page whose marked section gets the table "
                                                     "(docs/benchmarks.md)")
    args = parser.parse_args(argv)
    from fimlora.app.models import load_causal_lm, load_tokenizer
    from fimlora.app.tasks import load_task
    from fimlora.io import package_versions

    torch.set_num_threads(1)
    n_layers, n_test, repeats = (2, 8, 1) if args.smoke else (None, args.max_test, args.repeats)
    model = load_causal_lm("smollm2", n_layers).eval()
    tok = load_tokenizer("smollm2")
    rows = {}
    for task_name in ("sst2_mc", "obqa"):
        task = load_task(task_name, seed=0, max_test=n_test)
        rows[task_name] = measure(model, tok, task.test, args.batch_size, repeats, args.paths)
    record = {"command": " ".join(["benchmarks/bench_scoring.py", *(argv if argv is not None else sys.argv[1:])]),
              "date": time.strftime("%Y-%m-%d"), "layers": n_layers or "all", "repeats": repeats,
              "batch_size": args.batch_size, "paths": args.paths, "versions": package_versions(), "rows": rows}
    if args.run_wall_seconds is not None:
        # A decoder run scores 100 sst2_mc sentences; the time here is scaled to them (linear in the examples).
        scale = RUN_EXAMPLES / rows["sst2_mc"]["examples"]
        scoring = {path: seconds * scale for path, seconds in rows["sst2_mc"]["median_s"].items()}
        run_seconds = args.run_wall_seconds - scoring[args.run_scored_with]
        record["decoder_runs"] = {
            "wall_seconds": args.run_wall_seconds, "scored_with": args.run_scored_with, "run_seconds": run_seconds,
            "source": args.run_source, "scoring_seconds": scoring,
            "runs_per_hour": {path: runs_per_hour(run_seconds, scoring[path]) for path in args.paths}}
    section = render(record)
    print(section)
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    if args.doc:
        doc = Path(args.doc)
        text = doc.read_text() if doc.exists() else ""
        doc.write_text(put_section(text, wrap(NAME, section), NAME))
    return 0


if __name__ == "__main__":
    sys.exit(main())
