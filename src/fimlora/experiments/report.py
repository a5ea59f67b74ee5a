"""``fimlora report``: the paper's tables (mean ± std over seeds) from a folder of run results."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import warnings
from collections import defaultdict
from pathlib import Path

from ..io import atomic_write_text

__all__ = ["load_results", "mean_std", "build_report", "write_report"]

METHOD_ORDER = ["lora", "adalora", "eva", "random", "fim"]
METHOD_LABEL = {"lora": "LoRA", "adalora": "AdaLoRA", "eva": "EVA", "random": "Random-rank", "fim": "FIM-LoRA"}


# JSON files a results folder may hold besides run results.
NOT_RUN_RESULTS = ("demo_results.json", "rank_map.json", "benchmarks.json")


def load_results(results_dirs) -> list[dict]:
    """Every finished run JSON below the folder(s) (failed runs have ``.error.json`` and are skipped)."""
    if isinstance(results_dirs, (str, Path)):
        results_dirs = [results_dirs]
    out = []
    paths = sorted(p for d in results_dirs for p in Path(d).rglob("*.json"))
    for p in paths:
        if p.name.endswith(".error.json") or {".work", ".stale", ".locks", "adapters"} & set(p.parts):
            continue
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            warnings.warn(f"results: could not read {p} ({e}); left out of the report", stacklevel=2)
            continue
        if not isinstance(d, dict) or not d.get("run_id"):
            if p.name not in NOT_RUN_RESULTS:
                warnings.warn(f"results: {p} is not a run result (no run_id); left out of the report", stacklevel=2)
            continue
        if d.get("status") in ("ok", "diverged"):
            out.append(d)
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: list[float], n_expected: int | None = None) -> str:
    if not values:
        return "–"
    m, s = mean_std([100 * v for v in values])
    mark = "" if n_expected is None or len(values) == n_expected else f" (n={len(values)})"
    return f"{m:.2f} ± {s:.2f}{mark}"


def _acc(run: dict, task: str) -> float | None:
    m = run["metrics"].get(task)
    if run["status"] != "ok" or not m or "accuracy" not in m:
        return None
    return float(m["accuracy"])


def _seed_avgs(runs: list[dict], tasks: list[str]) -> list[float]:
    """Per seed, the mean accuracy over ``tasks`` (the paper's Avg column), for seeds that have all of them.

    Works alike for a mixture (one run per seed scored on every task) and for one run per task.
    """
    per_seed: dict[int, dict[str, float]] = defaultdict(dict)
    for x in runs:
        for t in tasks:
            a = _acc(x, t)
            if a is not None:
                per_seed[x["seed"]][t] = a
    return [statistics.fmean(v.values()) for v in per_seed.values() if len(v) == len(tasks)]


def _value_order(v):
    """Numbers in numeric order (1, 2, 4, 16), then strings."""
    return (0, float(v), "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0.0, str(v))


def _variant_key(run: dict) -> str:
    v = run.get("fim_variant") or {}
    return ",".join(f"{k}={v[k]}" for k in sorted(v))


def _method_rows(runs: list[dict]) -> list[tuple[str, str]]:
    """(method, variant) rows in the paper's method order."""
    def order(k):
        method, _ = k
        sample = next(r for r in runs if (r["method"], _variant_key(r)) == k)
        v = sample.get("fim_variant") or {}
        return (METHOD_ORDER.index(method) if method in METHOD_ORDER else 99,
                tuple(_value_order(v[key]) for key in sorted(v)))

    return sorted({(r["method"], _variant_key(r)) for r in runs}, key=order)


def _label(method: str, variant: str) -> str:
    name = METHOD_LABEL.get(method, method)
    return f"{name} ({variant})" if variant else name


def _eval_tasks(runs: list[dict]) -> list[str]:
    tasks = []
    for r in runs:
        for t in r["metrics"]:
            if t not in tasks:
                tasks.append(t)
    return tasks


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main_tables(runs: list[dict], csv_rows: list[dict]) -> list[str]:
    """Methods x tasks, mean ± std over seeds, with Avg; one table per rank."""
    out = []
    for r in sorted({x["r"] for x in runs}):
        at_r = [x for x in runs if x["r"] == r]
        tasks = _eval_tasks(at_r)
        n_seeds = len({x["seed"] for x in at_r})
        rows = []
        for method, variant in _method_rows(at_r):
            sel = [x for x in at_r if x["method"] == method and _variant_key(x) == variant]
            cells = []
            for t in tasks:
                vals = [a for a in (_acc(x, t) for x in sel) if a is not None]
                cells.append(_fmt(vals, n_seeds))
                m, s = mean_std([100 * v for v in vals])
                csv_rows.append({"table": "main", "r": r, "method": method, "variant": variant, "task": t,
                                 "mean": m, "std": s, "n": len(vals)})
            avgs = _seed_avgs(sel, tasks)
            diverged = sum(1 for x in sel if x["status"] == "diverged")
            label = _label(method, variant) + (f" ⚠ {diverged} diverged" if diverged else "")
            rows.append([label, *cells, _fmt(avgs, n_seeds)])
        out.append(f"#### r = {r} (accuracy %, mean ± std over {n_seeds} seeds)\n\n"
                   + _table(["Method", *tasks, "Avg"], rows))
    return out


def rank_sweep(runs: list[dict]) -> list[str]:
    ranks = sorted({x["r"] for x in runs})
    if len(ranks) < 2:
        return []
    out = []
    tasks = _eval_tasks(runs)
    # A mixture run is scored on every eval task: its sweep is the Avg column (per task is in the main tables).
    mixture = len(tasks) > 1 and all(len(x["metrics"]) > 1 for x in runs if x["status"] == "ok")
    for t in ["Avg"] if mixture else tasks:
        rows = []
        for method, variant in _method_rows(runs):
            cells = []
            for r in ranks:
                sel = [x for x in runs if x["method"] == method and x["r"] == r and _variant_key(x) == variant]
                vals = _seed_avgs(sel, tasks) if mixture else [a for a in (_acc(x, t) for x in sel) if a is not None]
                cells.append(_fmt(vals))
            rows.append([_label(method, variant), *cells])
        title = f"Avg over {len(tasks)} tasks" if mixture else t
        out.append(f"#### {title}\n\n" + _table(["Method", *[f"r = {r}" for r in ranks]], rows))
    return out


def fim_vs_random(runs: list[dict]) -> str:
    lines = []
    for r in sorted({x["r"] for x in runs}):
        wins = ties = losses = 0
        detail = []
        for t in _eval_tasks([x for x in runs if x["r"] == r]):
            f = [a for a in (_acc(x, t) for x in runs if x["method"] == "fim" and x["r"] == r and not _variant_key(x))
                 if a is not None]
            rnd = [a for a in (_acc(x, t) for x in runs if x["method"] == "random" and x["r"] == r) if a is not None]
            if not f or not rnd:
                continue
            mf, mr = statistics.fmean(f), statistics.fmean(rnd)
            if math.isclose(mf, mr, abs_tol=1e-9):
                ties += 1
            elif mf > mr:
                wins += 1
            else:
                losses += 1
            detail.append(f"{t} {100 * (mf - mr):+.2f}")
        if wins + ties + losses:
            lines.append(f"- r = {r}: FIM-LoRA beats random-rank on {wins} of {wins + ties + losses} tasks "
                         f"(ties {ties}); mean difference per task: {', '.join(detail)}")
    return "\n".join(lines)


def verdicts(runs: list[dict]) -> str:
    """FIM-LoRA against each baseline per task and rank: a difference of means within the larger seed
    std of the two is called a tie; plus the typical seed noise."""
    lines = []
    noise = []
    for r in sorted({x["r"] for x in runs}):
        tasks = _eval_tasks([x for x in runs if x["r"] == r])
        # With several tasks the Avg column is judged too: it is the paper's headline, and per-task test sets
        # can be small.
        for t in tasks + (["Avg"] if len(tasks) > 1 else []):
            per_method = {}
            for method in METHOD_ORDER:
                sel = [x for x in runs if x["method"] == method and x["r"] == r and not _variant_key(x)]
                vals = _seed_avgs(sel, tasks) if t == "Avg" else [a for a in (_acc(x, t) for x in sel) if a is not None]
                if vals:
                    per_method[method] = mean_std([100 * v for v in vals])
                    if len(vals) > 1 and t != "Avg":
                        noise.append(per_method[method][1])
            if "fim" not in per_method:
                continue
            fm, fs = per_method["fim"]
            parts = []
            for base in ("lora", "random", "eva", "adalora"):
                if base not in per_method:
                    continue
                bm, bs = per_method[base]
                d = fm - bm
                word = "tie" if abs(d) <= max(fs, bs) else ("win" if d > 0 else "loss")
                parts.append(f"{word} vs {METHOD_LABEL[base]} ({d:+.2f})")
            lines.append(f"- {t}, r = {r}: FIM-LoRA {fm:.2f} ± {fs:.2f}: " + "; ".join(parts))
    if noise:
        lines.append(f"- Seed noise: the std over seeds of one method on one task is {statistics.median(noise):.2f} "
                     f"points (median; range {min(noise):.2f}–{max(noise):.2f}).")
    sizes = _test_sizes(runs)
    if sizes:
        # Seeds share one test set, so seed std misses test-sampling noise; say how coarse a test set is.
        lines.append("- Test-set resolution: one test example is worth " + ", ".join(
            f"{100 / n:.2f} points on {t} (n = {n})" for t, n in sizes.items()) + ".")
    return "\n".join(lines)


def _test_sizes(runs: list[dict]) -> dict[str, int]:
    """{task: number of test examples} from the metrics' ``n`` (the largest seen per task)."""
    sizes: dict[str, int] = {}
    for x in runs:
        for t, m in x["metrics"].items():
            if isinstance(m, dict) and m.get("n"):
                sizes[t] = max(sizes.get(t, 0), int(m["n"]))
    return sizes


def ablation_tables(runs: list[dict]) -> list[str]:
    """Tables over fim_grid variants: a 2-D grid when two settings vary, else a 1-D sweep."""
    fim = [x for x in runs if x["method"] == "fim" and x.get("fim_variant")]
    if not fim:
        return []
    out = []
    keys = sorted({k for x in fim for k in x["fim_variant"]})
    for t in _eval_tasks(fim):
        for r in sorted({x["r"] for x in fim}):
            sel = [x for x in fim if x["r"] == r]
            if len(keys) == 2:
                a, b = keys
                va = sorted({x["fim_variant"][a] for x in sel}, key=_value_order)
                vb = sorted({x["fim_variant"][b] for x in sel}, key=_value_order)
                rows = []
                for u in va:
                    cells = []
                    for v in vb:
                        vals = [y for y in (_acc(x, t) for x in sel if x["fim_variant"][a] == u
                                            and x["fim_variant"][b] == v) if y is not None]
                        cells.append(_fmt(vals))
                    rows.append([f"{a} = {u}", *cells])
                out.append(f"#### {t}, r = {r}: {a} x {b}\n\n" + _table([f"{a} \\ {b}", *[f"{b} = {v}" for v in vb]],
                                                                         rows))
            else:
                for k in keys:
                    vals_k = sorted({x["fim_variant"][k] for x in sel}, key=_value_order)
                    rows = []
                    for u in vals_k:
                        vals = [y for y in (_acc(x, t) for x in sel if x["fim_variant"][k] == u) if y is not None]
                        rows.append([f"{k} = {u}", _fmt(vals)])
                    out.append(f"#### {t}, r = {r}: {k}\n\n" + _table([k, "Acc. (%)"], rows))
    return out


def rank_map_stats(runs: list[dict], figures_dir: Path | None) -> list[str]:
    from ..allocation import RankAllocation
    from ..rankmap import group_stats, plot_rank_map

    out = []
    seen = set()
    for x in sorted(runs, key=lambda x: (x["task"], x["r"], x["seed"])):
        if x["method"] != "fim" or _variant_key(x) or (x["task"], x["r"]) in seen:
            continue
        seen.add((x["task"], x["r"]))
        ranks = x["rank_map_before_training"]
        scores = x["method_info"].get("scores") or {n: 0.0 for n in ranks}
        base = x["r"]
        alloc = RankAllocation(scores=scores, ranks=ranks, alphas={n: 1.0 for n in ranks},
                               old_ranks={n: base for n in ranks}, old_alphas={n: 1.0 for n in ranks},
                               shapes={n: [0, 0] for n in ranks}, budget=sum(ranks.values()),
                               r_min=min(ranks.values()), r_max=max(ranks.values()), base_r=base, base_alpha=1.0)
        s = group_stats(alloc)
        by_type = ", ".join(f"{k} {v:.2f}" for k, v in s["mean_rank_by_type"].items())
        by_group = ", ".join(f"{g} (layers {v['layers'][0]}-{v['layers'][1]}) {v['mean_rank']:.2f}"
                             for g, v in s["mean_rank_by_layer_group"].items())
        text = (f"- **{x['task']}, r = {base}, seed {x['seed']}**: mean rank by type: {by_type}; "
                f"by layer group: {by_group}")
        if figures_dir is not None:
            fig = figures_dir / f"rank_map_{x['task'].replace('+', '_')}_r{base}.png"
            try:
                plot_rank_map(alloc, fig, scores="scores" in x["method_info"])
                text += f"\n\n  ![rank map {x['task']} r={base}]({fig.parent.name}/{fig.name})"
            except ValueError:
                pass
        out.append(text)
    return out


def cost_table(runs: list[dict]) -> str:
    rows = []
    for method, variant in _method_rows(runs):
        sel = [x for x in runs if x["method"] == method and _variant_key(x) == variant]
        calib = statistics.fmean(x["calibration_seconds"] for x in sel)
        train = statistics.fmean(x["train_seconds"] for x in sel)
        params = sorted({x["trainable_params"] for x in sel})
        extra = ""
        fwd = [x["method_info"].get("eva_forward_batches") for x in sel if x["method_info"].get("eva_forward_batches")]
        if fwd:
            extra = f"EVA forward batches: {min(fwd)}–{max(fwd)}"
        rows.append([_label(method, variant), f"{calib:.2f}", f"{train:.1f}",
                     f"{params[0]:,}" + (f"–{params[-1]:,}" if len(params) > 1 else ""), extra])
    return _table(["Method", "calibration s (mean)", "training s (mean)", "trainable params", "notes"], rows)


def build_report(results_dir, figures_dir: Path | None = None, title: str | None = None,
                 commands: list[str] | None = None, preface: str | None = None) -> tuple[str, str]:
    """(markdown, csv) for every run below ``results_dir``."""
    runs = load_results(results_dir)
    if not runs:
        raise ValueError(f"results: no finished run JSON under {results_dir}")
    csv_rows: list[dict] = []
    parts = [f"# {title or 'FIM-LoRA results'}", ""]
    if commands:
        parts += ["Produced by:", "", "```bash", *commands, "```", ""]
    if preface:
        parts += [preface.strip(), ""]
    experiments = sorted({x["experiment"] for x in runs})
    v = runs[0]["versions"]
    m = runs[0]["machine"]
    parts.append(f"{len(runs)} runs from experiment(s) {', '.join(experiments)}; "
                 f"torch {v.get('torch')}, transformers {v.get('transformers')}, peft {v.get('peft')}; "
                 f"{m.get('processor')} x{m.get('cpu_count')}, CUDA: {m.get('cuda')}.")
    for exp in experiments:
        sel = [x for x in runs if x["experiment"] == exp]
        parts += ["", f"## {exp}", ""]
        plain = [x for x in sel if not _variant_key(x)]
        if plain:
            parts += ["### Methods x tasks", ""]
            parts += [t + "\n" for t in main_tables(plain, csv_rows)]
            sweep = rank_sweep(plain)
            if sweep:
                parts += ["### Rank sweep (accuracy %, mean ± std over seeds)", ""] + [t + "\n" for t in sweep]
            v = verdicts(plain)
            if v:
                parts += ["### Where FIM-LoRA wins, ties or loses (difference in points; a tie is a difference "
                          "within the larger seed std)", "", v, ""]
            fr = fim_vs_random(plain)
            if fr:
                parts += ["### FIM-LoRA vs random-rank (same allocator, same budget)", "", fr, ""]
        abl = ablation_tables(sel)
        if abl:
            parts += ["### FIM-LoRA ablations (accuracy %, mean ± std over seeds)", ""] + [t + "\n" for t in abl]
        stats = rank_map_stats(sel, figures_dir)
        if stats:
            parts += ["### Rank maps (§4.4 statistics: mean rank by module type and by layer third)", ""] + stats + [""]
        parts += ["### Cost", "", cost_table(sel), ""]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["table", "r", "method", "variant", "task", "mean", "std", "n"])
    w.writeheader()
    w.writerows(csv_rows)
    return "\n".join(parts) + "\n", buf.getvalue()


def write_report(results_dirs: list[Path], out: str | Path | None = None, title: str | None = None,
                 commands: list[str] | None = None, preface_path: str | Path | None = None) -> Path:
    """Write the report (Markdown, default ``<first results folder>/report.md``) and its CSV next to it."""
    results_dirs = [Path(d) for d in ([results_dirs] if isinstance(results_dirs, (str, Path)) else results_dirs)]
    for d in results_dirs:
        if not d.is_dir():
            raise FileNotFoundError(f"results_dir: {d} is not a folder")
    out = Path(out) if out else results_dirs[0] / "report.md"
    preface = Path(preface_path).read_text(encoding="utf-8") if preface_path else None
    results_dir = results_dirs
    figures = out.parent / (out.stem + "_figures")
    md, table_csv = build_report(results_dir, figures, title, commands, preface)
    atomic_write_text(out, md)
    atomic_write_text(out.with_suffix(".csv"), table_csv)
    return out
