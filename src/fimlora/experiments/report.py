"""``fimlora report``: the paper's tables (mean ± std over seeds) from a folder of run results.

A *run* is one result JSON as written by the sweep (``run_id``, ``experiment``, ``task``, ``method``, ``r``,
``seed``, ``status``, ``fim_variant``, ``metrics`` = {task: {metric: 0-1, ..., "n": test size, "primary":
headline metric}}, costs and rank maps). Metrics are stored as fractions and shown times 100.

Each task's column shows one metric (:func:`column_metric`): for GLUE through ``hf:glue:NAME`` the one
the paper's Table 1 shows (Matthews for CoLA, Pearson for STS-B, F1 for MRPC and QQP, accuracy for the
rest); for any other task the headline its results record, accuracy for results older than that.
GLUE runs of every experiment are also gathered into one table in the paper's Table 1 layout.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import warnings
from collections import defaultdict
from pathlib import Path

from ..extras import MissingExtraError, require
from ..io import atomic_write_text
from .metrics import GLUE_COLUMNS, GLUE_DISPLAY, METRIC_LABELS, METRICS, PAPER_METRIC, glue_task
from .registry import method_info, method_names
from .significance import paired_bootstrap

__all__ = ["load_results", "mean_std", "task_scores", "select_runs", "paired_comparison", "paired_scoreboard",
           "build_report", "write_report"]

# The methods in the report's order, their labels, each composite's two parents (what it is judged against) and the
# baselines FIM-LoRA is judged against, in the order the verdict lines name them: all declared in .registry.
METHOD_ORDER = list(method_names())
METHOD_LABEL = {name: method_info(name).label for name in METHOD_ORDER}
COMPOSITE_PARENTS = {name: method_info(name).parents for name in METHOD_ORDER if method_info(name).parents}
BASELINES = tuple(sorted((name for name in METHOD_ORDER if method_info(name).baseline is not None),
                         key=lambda name: method_info(name).baseline))

# Bootstrap resamples per comparison: p-values resolve to about 1e-4, and a report of a few hundred comparisons
# over a few hundred examples each stays within seconds.
BOOTSTRAP_RESAMPLES = 10_000
# The level at which the paired-test summary calls a difference significant.
SIGNIFICANCE_LEVEL = 0.05
# The column and verdict name of the per-seed mean over the evaluation tasks (the paper's Avg).
AVG = "Avg"

# JSON files a results folder may hold besides run results.
NOT_RUN_RESULTS = ("demo_results.json", "rank_map.json", "benchmarks.json")
# Folders the sweep keeps beside the results: work in progress, superseded runs, locks and saved adapters.
NOT_RESULT_FOLDERS = {".work", ".stale", ".locks", "adapters"}
CSV_FIELDS = ["table", "r", "method", "variant", "task", "mean", "std", "n", "metric"]
# What each metric's short label in a header means.
METRIC_NAMES = {"accuracy": "accuracy", "f1": "F1 of the positive class", "matthews": "Matthews correlation",
                "pearson": "Pearson correlation", "spearman": "Spearman correlation"}


# ----------------------------------------------------------------------------- loading


def load_results(results_dirs) -> list[dict]:
    """Every finished run JSON below the folder(s) (failed runs have ``.error.json`` and are skipped)."""
    if isinstance(results_dirs, (str, Path)):
        results_dirs = [results_dirs]
    runs = []
    paths = sorted(p for d in results_dirs for p in Path(d).rglob("*.json"))
    for path in paths:
        if path.name.endswith(".error.json") or NOT_RESULT_FOLDERS & set(path.parts):
            continue
        run = _read_run(path)
        if run is not None and run.get("status") in ("ok", "diverged"):
            runs.append(run)
    return runs


def _read_run(path: Path) -> dict | None:
    """The run in ``path``, or None (with a warning unless it is a known non-run file) when it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        warnings.warn(f"results: could not read {path} ({e}); left out of the report", stacklevel=3)
        return None
    if not isinstance(data, dict) or not data.get("run_id"):
        if path.name not in NOT_RUN_RESULTS:
            warnings.warn(f"results: {path} is not a run result (no run_id); left out of the report", stacklevel=3)
        return None
    return data


# ----------------------------------------------------------------------------- selecting runs and numbers


def mean_std(values: list[float]) -> tuple[float, float]:
    """(mean, sample std) of ``values``; std is 0 for one value, both are NaN for none."""
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def select_runs(runs: list[dict], method: str | None = None, r: int | None = None, variant: str | None = None,
                experiment: str | None = None) -> list[dict]:
    """The runs (in order) whose method, rank, variant key (see ``_variant_key``; "" for a plain run) and
    experiment equal each one given; None leaves that field free."""
    return [run for run in runs
            if (method is None or run["method"] == method) and (r is None or run["r"] == r)
            and (variant is None or _variant_key(run) == variant)
            and (experiment is None or run["experiment"] == experiment)]


def task_scores(runs: list[dict], task: str) -> list[float]:
    """The column metric (0-1, see :func:`column_metric`) on ``task`` of each run that finished ``ok`` and was
    scored on it, in run order."""
    return [a for a in (_score(run, task) for run in runs) if a is not None]


def column_metric(run: dict, task: str) -> str:
    """The metric ``task``'s column shows for ``run``: the paper's for a GLUE task, else the run's headline."""
    glue = glue_task(task)
    if glue in PAPER_METRIC:
        return PAPER_METRIC[glue]
    metrics = run["metrics"].get(task)
    return metrics.get("primary", "accuracy") if isinstance(metrics, dict) else "accuracy"


def _score(run: dict, task: str) -> float | None:
    """``run``'s column metric on ``task`` (0-1), None when it did not finish ok or has no such metric."""
    metrics = run["metrics"].get(task)
    metric = column_metric(run, task)
    if run["status"] != "ok" or not metrics or metric not in metrics:
        return None
    return float(metrics[metric])


def _task_metric(runs: list[dict], task: str) -> str:
    """The metric of ``task``'s column over ``runs`` (the first run scored on it decides; accuracy for none)."""
    return next((column_metric(run, task) for run in runs if task in run["metrics"]), "accuracy")


def _column_header(runs: list[dict], task: str) -> str:
    """A task's column name: GLUE's name and metric ("CoLA (Mcc)"); other tasks name a metric unless accuracy."""
    metric = _task_metric(runs, task)
    glue = glue_task(task)
    if glue is not None:
        return f"{GLUE_DISPLAY[glue]} ({METRIC_LABELS[metric]})"
    return task if metric == "accuracy" else f"{task} ({METRIC_LABELS.get(metric, metric)})"


def _unit(runs: list[dict], tasks: list[str]) -> str:
    """What a table's numbers are: "accuracy %" when every column is accuracy, else each column's metric."""
    metrics = {_task_metric(runs, task) for task in tasks}
    if metrics <= {"accuracy"}:
        return "accuracy %"
    return "% of each column's metric (" + "; ".join(f"{METRIC_LABELS.get(m, m)} = {METRIC_NAMES.get(m, m)}"
                                                     for m in METRICS if m in metrics) + ")"


def _missing_metric_note(runs: list[dict], tasks: list[str]) -> str:
    """A line naming the tasks some of whose ok runs lack the column's metric (results older than it)."""
    missing = []
    for task in tasks:
        lacking = [run for run in runs
                   if run["status"] == "ok" and task in run["metrics"] and _score(run, task) is None]
        if lacking:
            missing.append(f"{task}: {len(lacking)} run(s) have no {_task_metric(runs, task)} recorded "
                           "(made before it was; rerun them)")
    return ("Left out: " + "; ".join(missing) + ".") if missing else ""


def _seed_avgs(runs: list[dict], tasks: list[str]) -> list[float]:
    """Per seed, the mean column metric over ``tasks`` (the paper's Avg column), for seeds that have all of them.

    Works alike for a mixture (one run per seed scored on every task) and for one run per task.
    """
    per_seed: dict[int, dict[str, float]] = defaultdict(dict)
    for run in runs:
        for task in tasks:
            a = _score(run, task)
            if a is not None:
                per_seed[run["seed"]][task] = a
    return [statistics.fmean(by_task.values()) for by_task in per_seed.values() if len(by_task) == len(tasks)]


def _scores(runs: list[dict], task: str, tasks: list[str]) -> list[float]:
    """Column metrics on ``task``; for ``AVG``, the per-seed means over ``tasks``."""
    return _seed_avgs(runs, tasks) if task == AVG else task_scores(runs, task)


def _points(values: list[float]) -> list[float]:
    """Fractions as percentage points."""
    return [100 * value for value in values]


def _fmt(values: list[float], n_expected: int | None = None) -> str:
    """"mean ± std" in points, "(n=k)" when not every expected seed is there, "–" for none."""
    if not values:
        return "–"
    m, s = mean_std(_points(values))
    mark = "" if n_expected is None or len(values) == n_expected else f" (n={len(values)})"
    return f"{m:.2f} ± {s:.2f}{mark}"


def _value_order(value):
    """Numbers in numeric order (1, 2, 4, 16), then strings."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def _variant_key(run: dict) -> str:
    """The run's fim_grid settings as "k1=v1,k2=v2" (sorted keys); "" for a plain run."""
    variant = run.get("fim_variant") or {}
    return ",".join(f"{k}={variant[k]}" for k in sorted(variant))


def _row_order(runs: list[dict], row: tuple[str, str]):
    """Sort key of a (method, variant) row: the paper's method order, then the variant's values."""
    method, variant_key = row
    sample = next(run for run in runs if (run["method"], _variant_key(run)) == row)
    variant = sample.get("fim_variant") or {}
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else 99,
            tuple(_value_order(variant[k]) for k in sorted(variant)))


def _method_rows(runs: list[dict]) -> list[tuple[str, str]]:
    """(method, variant key) rows in the paper's method order."""
    rows = {(run["method"], _variant_key(run)) for run in runs}
    return sorted(rows, key=lambda row: _row_order(runs, row))


def _ranks(runs: list[dict]) -> list[int]:
    return sorted({run["r"] for run in runs})


def _label(method: str, variant: str) -> str:
    name = METHOD_LABEL.get(method, method)
    return f"{name} ({variant})" if variant else name


def _eval_tasks(runs: list[dict]) -> list[str]:
    """Every task the runs were scored on: GLUE tasks in the paper's column order, then the others first-seen."""
    tasks = []
    for run in runs:
        for task in run["metrics"]:
            if task not in tasks:
                tasks.append(task)
    order = {name: i for i, name in enumerate(GLUE_COLUMNS)}
    return sorted(tasks, key=lambda task: order.get(glue_task(task), len(order)))


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- methods x tasks


def main_tables(runs: list[dict], csv_rows: list[dict], table: str = "main",
                tasks: list[str] | None = None) -> list[str]:
    """Methods x tasks, mean ± std over seeds, with Avg; one table per rank. Appends each cell to ``csv_rows``
    (under ``table``). ``tasks`` fixes the columns (a task no run has shows "–"); default: every task scored."""
    out = []
    for r in _ranks(runs):
        at_r = select_runs(runs, r=r)
        columns = tasks if tasks is not None else _eval_tasks(at_r)
        n_seeds = len({run["seed"] for run in at_r})
        rows = [_main_row(at_r, method, variant, columns, n_seeds, csv_rows, table)
                for method, variant in _method_rows(at_r)]
        note = _missing_metric_note(at_r, columns)
        out.append(f"#### r = {r} ({_unit(at_r, columns)}, mean ± std over {n_seeds} seeds; trainable parameters)\n\n"
                   + _table(["Method", *(_column_header(at_r, t) for t in columns), AVG, "params"], rows)
                   + (f"\n\n{note}" if note else ""))
    return out


def _main_row(at_r: list[dict], method: str, variant: str, tasks: list[str], n_seeds: int,
              csv_rows: list[dict], table: str = "main") -> list[str]:
    """One method's row of a main table (label, a cell per task, Avg), its cells also appended to ``csv_rows``."""
    sel = select_runs(at_r, method=method, variant=variant)
    r = at_r[0]["r"]
    cells = []
    for task in tasks:
        values = task_scores(sel, task)
        cells.append(_fmt(values, n_seeds))
        m, s = mean_std(_points(values))
        csv_rows.append({"table": table, "r": r, "method": method, "variant": variant, "task": task,
                         "mean": m, "std": s, "n": len(values), "metric": _task_metric(at_r, task)})
    diverged = sum(1 for run in sel if run["status"] == "diverged")
    label = _label(method, variant) + (f" ⚠ {diverged} diverged" if diverged else "")
    return [label, *cells, _fmt(_seed_avgs(sel, tasks), n_seeds), _params_cell(sel)]


def _params_cell(runs: list[dict]) -> str:
    """The runs' trainable parameter count, or its range when the runs differ (random ranks, other seeds)."""
    params = sorted({run["trainable_params"] for run in runs})
    if not params:
        return "–"
    return f"{params[0]:,}" + (f"–{params[-1]:,}" if len(params) > 1 else "")


def glue_table(runs: list[dict], csv_rows: list[dict]) -> list[str]:
    """The paper's Table 1 from the GLUE runs of every experiment: MNLI, SST-2, CoLA, MRPC, QQP, QNLI, STS-B,
    RTE and Avg (the per-seed mean of the eight, so a seed missing any task has none), one table per rank."""
    glue = [run for run in runs if any(glue_task(task) in GLUE_COLUMNS for task in run["metrics"])]
    plain = select_runs(glue, variant="")
    if not plain:
        return []
    seen = _eval_tasks(plain)
    # A GLUE task no run has keeps its column, so the layout is always the paper's.
    columns = [next((t for t in seen if glue_task(t) == name), f"glue:{name}") for name in GLUE_COLUMNS]
    legend = ("Columns as in the paper's Table 1, each with the metric the paper shows: "
              + ", ".join(f"{GLUE_DISPLAY[n]} {METRIC_NAMES[PAPER_METRIC[n]]}" for n in GLUE_COLUMNS)
              + " (MNLI matched; mismatched accuracy, MRPC/QQP accuracy, STS-B Spearman and CoLA accuracy are "
              "in the result files). Avg is the mean of the eight per seed.")
    return ["## GLUE (the paper's Table 1 layout)", "", legend, ""] + [
        t + "\n" for t in main_tables(plain, csv_rows, table="glue", tasks=columns)]


def rank_sweep(runs: list[dict]) -> list[str]:
    """Methods x ranks, one table per task (a mixture: one table of the Avg); none for a single rank."""
    ranks = _ranks(runs)
    if len(ranks) < 2:
        return []
    tasks = _eval_tasks(runs)
    # A mixture run is scored on every eval task: its sweep is the Avg column (per task is in the main tables).
    mixture = len(tasks) > 1 and all(len(run["metrics"]) > 1 for run in runs if run["status"] == "ok")
    out = []
    for task in [AVG] if mixture else tasks:
        rows = [[_label(method, variant),
                 *(_fmt(_scores(select_runs(runs, method=method, r=r, variant=variant), task, tasks))
                   for r in ranks)]
                for method, variant in _method_rows(runs)]
        title = f"Avg over {len(tasks)} tasks" if mixture else _column_header(runs, task)
        out.append(f"#### {title}\n\n" + _table(["Method", *[f"r = {r}" for r in ranks]], rows))
    return out


# ----------------------------------------------------------------------------- FIM-LoRA against the baselines


def fim_vs_random(runs: list[dict]) -> str:
    """Per rank, on how many tasks plain FIM-LoRA's mean beats random-rank's, and the differences in points."""
    lines = []
    for r in _ranks(runs):
        wins = ties = losses = 0
        detail = []
        for task in _eval_tasks(select_runs(runs, r=r)):
            fim = task_scores(select_runs(runs, method="fim", r=r, variant=""), task)
            rnd = task_scores(select_runs(runs, method="random", r=r), task)
            if not fim or not rnd:
                continue
            mf, mr = statistics.fmean(fim), statistics.fmean(rnd)
            if math.isclose(mf, mr, abs_tol=1e-9):
                ties += 1
            elif mf > mr:
                wins += 1
            else:
                losses += 1
            detail.append(f"{task} {100 * (mf - mr):+.2f}")
        if wins + ties + losses:
            lines.append(f"- r = {r}: FIM-LoRA beats random-rank on {wins} of {wins + ties + losses} tasks "
                         f"(ties {ties}); mean difference per task: {', '.join(detail)}")
    return "\n".join(lines)


def verdicts(runs: list[dict]) -> str:
    """FIM-LoRA against each baseline per task and rank: a difference of means within the larger seed
    std of the two is called a tie; under each per-task line, a paired bootstrap over the test examples of the
    seeds both methods have (:func:`paired_comparison`); plus the typical seed noise and the test-set resolution.
    Each composite (``fim_eva``, ``fim_rslora``, ...) is judged the same way against the two methods it combines."""
    lines = []
    noise: list[float] = []
    for r in _ranks(runs):
        tasks = _eval_tasks(select_runs(runs, r=r))
        # With several tasks the Avg column is judged too: it is the paper's headline, and per-task test sets
        # can be small.
        for task in tasks + ([AVG] if len(tasks) > 1 else []):
            per_method = _method_means(runs, r, task, tasks, noise)
            subjects = [("fim", BASELINES)] + [(c, p) for c, p in COMPOSITE_PARENTS.items()]
            for subject, against in subjects:
                if subject not in per_method:
                    continue
                lines.append(_verdict_line(per_method, r, task, subject, against))
                if task != AVG:  # the bootstrap pairs test examples; Avg pools tasks, which share none
                    lines += [f"  - {line}" for line in _bootstrap_lines(runs, r, task, subject, against)]
    if noise:
        lines.append(f"- Seed noise: the std over seeds of one method on one task is {statistics.median(noise):.2f} "
                     f"points (median; range {min(noise):.2f}–{max(noise):.2f}).")
    sizes = _test_sizes(runs)
    if sizes:
        # Seeds share one test set, so seed std misses test-sampling noise; say how coarse a test set is.
        lines.append("- Test-set resolution: one test example is worth " + ", ".join(
            f"{100 / n:.2f} points on {task} (n = {n})" for task, n in sizes.items()) + ".")
    return "\n".join(lines)


def paired_scoreboard(runs: list[dict], pairs: list[tuple[str, str]] | None = None,
                      alpha: float = SIGNIFICANCE_LEVEL) -> list[dict]:
    """Per (subject, baseline) pair, over every (rank, task) cell where the plain runs of both have per-example
    correctness: in how many cells the subject is significantly better or worse at level ``alpha``, first per
    comparison (the bootstrap p-values of :func:`paired_comparison`) and then with the Benjamini-Hochberg
    false-discovery rate controlled over all cells of all pairs together (``scipy.stats.false_discovery_control``),
    and the mean paired difference over the cells (points). ``pairs`` defaults to FIM-LoRA against every baseline.

    Returns [{"subject", "baseline", "cells", "better", "worse", "better_fdr", "worse_fdr", "mean_difference"}] in
    the order of ``pairs``, plain data; pairs with no testable cell are left out."""
    from scipy.stats import false_discovery_control

    pairs = [("fim", base) for base in BASELINES] if pairs is None else pairs
    tests: list[tuple[tuple[str, str], dict]] = []
    for r in _ranks(runs):
        for task in _eval_tasks(select_runs(runs, r=r)):
            for subject, base in pairs:
                subject_runs = select_runs(runs, method=subject, r=r, variant="")
                base_runs = select_runs(runs, method=base, r=r, variant="")
                if not task_scores(base_runs, task) or not task_scores(subject_runs, task):
                    continue
                result = paired_comparison(subject_runs, base_runs, task)
                if isinstance(result, dict):
                    tests.append(((subject, base), result))
    if not tests:
        return []
    adjusted = false_discovery_control([t["p_value"] for _, t in tests], method="bh")
    rows = []
    for pair in pairs:
        mine = [(t, q) for (p, t), q in zip(tests, adjusted) if p == pair]
        if not mine:
            continue
        rows.append({"subject": pair[0], "baseline": pair[1], "cells": len(mine),
                     "better": sum(t["p_value"] < alpha and t["difference"] > 0 for t, _ in mine),
                     "worse": sum(t["p_value"] < alpha and t["difference"] < 0 for t, _ in mine),
                     "better_fdr": sum(q < alpha and t["difference"] > 0 for t, q in mine),
                     "worse_fdr": sum(q < alpha and t["difference"] < 0 for t, q in mine),
                     "mean_difference": 100 * statistics.fmean(t["difference"] for t, _ in mine)})
    return rows


def scoreboard_table(rows: list[dict]) -> str:
    """:func:`paired_scoreboard`'s rows as a markdown table."""
    header = ["comparison", "cells (rank x task)", f"better, p < {SIGNIFICANCE_LEVEL}",
              f"worse, p < {SIGNIFICANCE_LEVEL}", "better / worse after FDR (BH)", "mean paired difference (points)"]
    body = [[f"{METHOD_LABEL[row['subject']]} vs {METHOD_LABEL[row['baseline']]}", str(row["cells"]),
             str(row["better"]), str(row["worse"]), f"{row['better_fdr']} / {row['worse_fdr']}",
             f"{row['mean_difference']:+.2f}"] for row in rows]
    return _table(header, body)


def _bootstrap_lines(runs: list[dict], r: int, task: str, subject: str, against: tuple[str, ...]) -> list[str]:
    """One line per baseline present: the paired bootstrap of ``subject`` against it, or why there is none."""
    subject_runs = select_runs(runs, method=subject, r=r, variant="")
    out = []
    for base in against:
        base_runs = select_runs(runs, method=base, r=r, variant="")
        if not task_scores(base_runs, task):
            continue
        result = paired_comparison(subject_runs, base_runs, task)
        out.append(f"vs {METHOD_LABEL[base]}: " + (result if isinstance(result, str) else _bootstrap_text(result)))
    return out


def _bootstrap_text(result: dict) -> str:
    """"paired bootstrap, S seeds x n examples: +d points, 95% CI [lo, hi], p = P"."""
    return (f"paired bootstrap, {result['n_seeds']} seed(s) x {result['n_examples']} examples: "
            f"{100 * result['difference']:+.2f} accuracy points, {100 * result['confidence']:.0f}% CI "
            f"[{100 * result['ci_low']:+.2f}, {100 * result['ci_high']:+.2f}], p = {result['p_value']:.4f}")


def paired_comparison(a_runs: list[dict], b_runs: list[dict], task: str) -> dict | str:
    """:func:`~fimlora.experiments.significance.paired_bootstrap` of ``a_runs`` against ``b_runs`` on ``task``
    over the seeds both finished ok (accuracy of a minus b, fractions), or a line saying why it is n/a.

    Pairs per seed, so a seed only one method has is left out (a bootstrap needs both sides of every pair)."""
    a, b = _correct_by_seed(a_runs, task), _correct_by_seed(b_runs, task)
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return "paired bootstrap n/a: no seed finished ok for both"
    lacking = [seed for seed in seeds if a[seed] is None or b[seed] is None]
    if lacking:
        return (f"paired bootstrap n/a: results lack per-example correctness (made before issue 22 recorded "
                f"`correct`; seed(s) {lacking}; rerun them)")
    sizes = {len(a[seed]) for seed in seeds} | {len(b[seed]) for seed in seeds}
    if len(sizes) > 1:
        return f"paired bootstrap n/a: the runs were scored on different test sets (sizes {sorted(sizes)})"
    return paired_bootstrap([a[s] for s in seeds], [b[s] for s in seeds], n_resamples=BOOTSTRAP_RESAMPLES)


def _correct_by_seed(runs: list[dict], task: str) -> dict[int, list[int] | None]:
    """{seed: the run's per-example correctness on ``task``, None where its result does not record it} for the
    runs that finished ok and were scored on ``task``."""
    return {run["seed"]: run["metrics"][task].get("correct")
            for run in runs if _score(run, task) is not None}


def _method_means(runs: list[dict], r: int, task: str, tasks: list[str], noise: list[float]) -> dict:
    """{method: (mean, std) in points} of the plain runs at rank ``r`` on ``task``; appends each per-task seed
    std (several seeds, not Avg) to ``noise``."""
    per_method = {}
    for method in METHOD_ORDER:
        values = _scores(select_runs(runs, method=method, r=r, variant=""), task, tasks)
        if values:
            per_method[method] = mean_std(_points(values))
            if len(values) > 1 and task != AVG:
                noise.append(per_method[method][1])
    return per_method


def _verdict_line(per_method: dict, r: int, task: str, subject: str = "fim",
                  against: tuple[str, ...] = BASELINES) -> str:
    """"- task, r = r: FIM-LoRA m ± s: win/tie/loss vs each baseline (difference)"; for a composite against its
    two parents, with whether it beats both, either or neither."""
    fm, fs = per_method[subject]
    parts, wins = [], []
    for base in against:
        if base not in per_method:
            continue
        bm, bs = per_method[base]
        diff = fm - bm
        word = "tie" if abs(diff) <= max(fs, bs) else ("win" if diff > 0 else "loss")
        wins.append(word == "win")
        parts.append(f"{word} vs {METHOD_LABEL[base]} ({diff:+.2f})")
    line = f"- {task}, r = {r}: {METHOD_LABEL[subject]} {fm:.2f} ± {fs:.2f}: " + "; ".join(parts)
    if subject in COMPOSITE_PARENTS and len(wins) == 2:
        line += f" → beats {['neither', 'one of them', 'both'][sum(wins)]}"
    return line


def _test_sizes(runs: list[dict]) -> dict[str, int]:
    """{task: number of test examples} from the metrics' ``n`` (the largest seen per task)."""
    sizes: dict[str, int] = {}
    for run in runs:
        for task, metrics in run["metrics"].items():
            if isinstance(metrics, dict) and metrics.get("n"):
                sizes[task] = max(sizes.get(task, 0), int(metrics["n"]))
    return sizes


# ----------------------------------------------------------------------------- ablations


def ablation_tables(runs: list[dict]) -> list[str]:
    """Tables over fim_grid variants: a 2-D grid when two settings vary, else a 1-D sweep per setting."""
    fim = [run for run in runs if run["method"] == "fim" and run.get("fim_variant")]
    if not fim:
        return []
    out = []
    keys = sorted({k for run in fim for k in run["fim_variant"]})
    for task in _eval_tasks(fim):
        for r in _ranks(fim):
            at_r = select_runs(fim, r=r)
            if len(keys) == 2:
                out.append(_grid_table(at_r, task, r, *keys))
            else:
                out += [_setting_table(at_r, task, r, key) for key in keys]
    return out


def _with_settings(runs: list[dict], settings: dict) -> list[dict]:
    """The runs whose fim_variant has each of ``settings`` ({setting: value})."""
    return [run for run in runs if all(run["fim_variant"][k] == value for k, value in settings.items())]


def _setting_values(runs: list[dict], key: str) -> list:
    return sorted({run["fim_variant"][key] for run in runs}, key=_value_order)


def _grid_table(runs: list[dict], task: str, r: int, a: str, b: str) -> str:
    """The column metric on ``task`` with setting ``a`` down and setting ``b`` across."""
    b_values = _setting_values(runs, b)
    rows = [[f"{a} = {a_value}",
             *(_fmt(task_scores(_with_settings(runs, {a: a_value, b: b_value}), task)) for b_value in b_values)]
            for a_value in _setting_values(runs, a)]
    return (f"#### {_column_header(runs, task)}, r = {r}: {a} x {b}\n\n"
            + _table([f"{a} \\ {b}", *[f"{b} = {b_value}" for b_value in b_values]], rows))


def _setting_table(runs: list[dict], task: str, r: int, key: str) -> str:
    """The column metric on ``task`` for each value of one setting."""
    rows = [[f"{key} = {value}", _fmt(task_scores(_with_settings(runs, {key: value}), task))]
            for value in _setting_values(runs, key)]
    metric = _task_metric(runs, task)
    value_header = "Acc. (%)" if metric == "accuracy" else f"{METRIC_LABELS.get(metric, metric)} (%)"
    return f"#### {_column_header(runs, task)}, r = {r}: {key}\n\n" + _table([key, value_header], rows)


# ----------------------------------------------------------------------------- rank maps and cost


def rank_map_stats(runs: list[dict], figures_dir: Path | None) -> list[str]:
    """For the first plain FIM-LoRA run (lowest seed) of each task and rank: mean rank by module type and by
    layer group, and its rank-map figure in ``figures_dir`` when given and drawable."""
    out = []
    seen = set()
    for run in sorted(runs, key=lambda run: (run["task"], run["r"], run["seed"])):
        if run["method"] != "fim" or _variant_key(run) or (run["task"], run["r"]) in seen:
            continue
        seen.add((run["task"], run["r"]))
        out.append(_rank_map_entry(run, figures_dir))
    return out


def _rank_map_entry(run: dict, figures_dir: Path | None) -> str:
    """One bullet of the rank-map section, with the figure's Markdown image link when it was drawn."""
    from ..rankmap import rank_stats

    ranks = run["rank_map_before_training"]
    stats = rank_stats(ranks)
    by_type = ", ".join(f"{k} {mean:.2f}" for k, mean in stats["mean_rank_by_type"].items())
    by_group = ", ".join(f"{g} (layers {grp['layers'][0]}-{grp['layers'][1]}) {grp['mean_rank']:.2f}"
                         for g, grp in stats["mean_rank_by_layer_group"].items())
    text = (f"- **{run['task']}, r = {run['r']}, seed {run['seed']}**: mean rank by type: {by_type}; "
            f"by layer group: {by_group}")
    if figures_dir is not None:
        # Named by experiment too: one report holds several experiments with the same task and rank.
        fig = figures_dir / f"rank_map_{_safe_name(run['experiment'])}_{run['task'].replace('+', '_')}_r{run['r']}.png"
        if _draw_rank_map(ranks, fig, run["method_info"].get("scores") or False):
            text += f"\n\n  ![rank map {run['task']} r={run['r']}]({fig.parent.name}/{fig.name})"
    return text


def _draw_rank_map(ranks: dict[str, int], fig: Path, scores: dict[str, float] | bool) -> bool:
    """Draw the rank map {module: rank} (with the run's scores, when it recorded them) to ``fig``; False (the
    report goes on without it) when it cannot be drawn."""
    from ..rankmap import plot_rank_map

    try:
        plot_rank_map(ranks, fig, scores=scores)
    except MissingExtraError as e:
        # The tables are the report; a missing plotting extra only costs the figures.
        warnings.warn(f"report: rank-map figures left out: {e}", stacklevel=4)
        return False
    except ValueError:
        return False  # module names without a layer index: nothing to draw
    return True


def _eva_note(runs: list[dict]) -> str:
    """EVA's forward passes, as counted on the model; results written before that counted batches drawn from
    the loader, which EVA replays from memory, so they are named as what they are (a lower bound)."""
    for key, label in (("eva_forward_passes", "EVA forward passes"),
                       ("eva_forward_batches", "EVA loader batches drawn (a lower bound on its forward passes)")):
        counts = [run["method_info"][key] for run in runs if run["method_info"].get(key)]
        if counts:
            return f"{label}: {min(counts)}–{max(counts)}"
    return ""


def cost_table(runs: list[dict]) -> str:
    """Mean calibration and training seconds and trainable parameters per (method, variant) row."""
    rows = []
    for method, variant in _method_rows(runs):
        sel = select_runs(runs, method=method, variant=variant)
        calib = statistics.fmean(run["calibration_seconds"] for run in sel)
        train = statistics.fmean(run["train_seconds"] for run in sel)
        rows.append([_label(method, variant), f"{calib:.2f}", f"{train:.1f}", _params_cell(sel), _eva_note(sel)])
    return _table(["Method", "calibration s (mean)", "training s (mean)", "trainable params", "notes"], rows)


# ----------------------------------------------------------------------------- the accuracy-size frontier

FRONTIER_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h")


def frontier_points(runs: list[dict], tasks: list[str]) -> list[dict]:
    """One point per (method, variant, r): {"method", "variant", "r", "params", "scores": {column: [0-1 per seed]}}
    in the paper's method order, then by size. ``params`` is the mean trainable parameter count of the runs that
    finished ok: every run records it (``method_info.params_spent`` only the allocating methods, and without the
    classifier head every method trains alike), so it is the one x axis all methods share."""
    points = []
    columns = tasks + ([AVG] if len(tasks) > 1 else [])
    for method, variant in _method_rows(runs):
        for r in _ranks(select_runs(runs, method=method, variant=variant)):
            sel = [run for run in select_runs(runs, method=method, r=r, variant=variant) if run["status"] == "ok"]
            if not sel:
                continue
            points.append({"method": method, "variant": variant, "r": r,
                           "params": statistics.fmean(run["trainable_params"] for run in sel),
                           "scores": {column: _scores(sel, column, tasks) for column in columns}})
    return points


def frontier_table(runs: list[dict], points: list[dict], tasks: list[str]) -> str:
    """The frontier as a table: a row per point (method, r, trainable parameters), mean ± std over seeds per
    column."""
    columns = tasks + ([AVG] if len(tasks) > 1 else [])
    n_seeds = len({run["seed"] for run in runs})
    rows = [[_label(p["method"], p["variant"]), str(p["r"]), f"{p['params']:,.0f}",
             *(_fmt(p["scores"][column], n_seeds) for column in columns)] for p in points]
    header = ["Method", "r", "trainable params (mean)",
              *(AVG if column == AVG else _column_header(runs, column) for column in columns)]
    return _table(header, rows)


def draw_frontier(points: list[dict], columns: list[str], fig: Path, title: str) -> bool:
    """One panel per column (each task, and Avg), a line per method: mean score in points against trainable
    parameters (log scale), seed std as error bars. False (the report goes on without it) when matplotlib is
    missing."""
    try:
        matplotlib = require("matplotlib", "plot", "report: drawing the accuracy-size frontier")
    except MissingExtraError as e:
        # The table is the frontier; a missing plotting extra only costs the figure.
        warnings.warn(f"report: frontier figure left out: {e}", stacklevel=3)
        return False
    matplotlib.use("Agg")  # files only: no display on a headless machine
    import matplotlib.pyplot as plt

    fig_obj, axes = plt.subplots(1, len(columns), figsize=(5 * len(columns), 4), squeeze=False)
    rows = list(dict.fromkeys((p["method"], p["variant"]) for p in points))
    for ax, name in zip(axes[0], columns):
        for i, (method, variant) in enumerate(rows):
            mine = [p for p in points if (p["method"], p["variant"]) == (method, variant) and p["scores"][name]]
            if not mine:
                continue
            stats = [mean_std(_points(p["scores"][name])) for p in mine]
            # The default colour cycle has 10 colours and a suite has up to 13 lines: marker and dash tell the
            # lines that share a colour apart.
            ax.errorbar([p["params"] for p in mine], [m for m, _ in stats], yerr=[s for _, s in stats],
                        color=f"C{i % 10}", marker=FRONTIER_MARKERS[i % len(FRONTIER_MARKERS)],
                        linestyle="-" if i < 10 else "--", capsize=3, label=_label(method, variant))
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("score (%)")
        ax.set_title(name)
    # Beside the panels, not on one: with a dozen methods an inner legend hides the points it names.
    axes[0][-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig_obj.suptitle(title)
    fig_obj.tight_layout()
    fig.parent.mkdir(parents=True, exist_ok=True)
    fig_obj.savefig(fig, dpi=120)
    plt.close(fig_obj)
    return True


def frontier_section(runs: list[dict], experiment: str, figures_dir: Path | None) -> list[str]:
    """The frontier's lines: its table and, with ``figures_dir``, its plot linked below; none for one size."""
    if len(_ranks(runs)) < 2:
        return []
    tasks = _eval_tasks(runs)
    points = frontier_points(runs, tasks)
    parts = [f"### Accuracy-size frontier ({_unit(runs, tasks)}, mean ± std over seeds, against trainable "
             "parameters)", "", frontier_table(runs, points, tasks), ""]
    if figures_dir is not None:
        fig = figures_dir / f"frontier_{_safe_name(experiment)}.png"
        columns = tasks + ([AVG] if len(tasks) > 1 else [])
        if draw_frontier(points, columns, fig, f"{experiment}: score against trainable parameters"):
            parts += [f"![accuracy-size frontier {experiment}]({fig.parent.name}/{fig.name})", ""]
    return parts


def _safe_name(text: str) -> str:
    """``text`` as a file name part (an experiment name is the user's)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


# ----------------------------------------------------------------------------- the report


def build_report(results_dir, figures_dir: Path | None = None, title: str | None = None,
                 commands: list[str] | None = None, preface: str | None = None) -> tuple[str, str]:
    """(markdown, csv) for every run below ``results_dir``; the CSV has one row per main-table cell."""
    runs = load_results(results_dir)
    if not runs:
        folders = ", ".join(str(d) for d in ([results_dir] if isinstance(results_dir, (str, Path)) else results_dir))
        raise ValueError(f"results: no finished run JSON under {folders}")
    csv_rows: list[dict] = []
    experiments = sorted({run["experiment"] for run in runs})
    parts = _header(runs, experiments, title, commands, preface)
    glue = glue_table(runs, csv_rows)
    if glue:
        parts += [""] + glue
    for experiment in experiments:
        parts += _experiment_section(select_runs(runs, experiment=experiment), experiment, figures_dir, csv_rows)
    return "\n".join(parts) + "\n", _csv_text(csv_rows)


def _header(runs: list[dict], experiments: list[str], title: str | None, commands: list[str] | None,
            preface: str | None) -> list[str]:
    """Title, the producing commands, the preface and one line on versions and machine (from the first run)."""
    parts = [f"# {title or 'FIM-LoRA results'}", ""]
    if commands:
        parts += ["Produced by:", "", "```bash", *commands, "```", ""]
    if preface:
        parts += [preface.strip(), ""]
    versions = runs[0]["versions"]
    machine = runs[0]["machine"]
    parts.append(f"{len(runs)} runs from experiment(s) {', '.join(experiments)}; "
                 f"torch {versions.get('torch')}, transformers {versions.get('transformers')}, "
                 f"peft {versions.get('peft')}; "
                 f"{machine.get('processor')} x{machine.get('cpu_count')}, CUDA: {machine.get('cuda')}.")
    return parts


def _experiment_section(runs: list[dict], experiment: str, figures_dir: Path | None,
                        csv_rows: list[dict]) -> list[str]:
    """The lines of one experiment's section: method tables (plain methods and explicit FIM variants),
    fim_grid ablations, rank maps and cost."""
    parts = ["", f"## {experiment}", ""]
    plain = [run for run in runs if not run.get("fim_variant") or _explicit_variant(run)]
    if plain:
        parts += _plain_sections(plain, csv_rows)
        parts += frontier_section(plain, experiment, figures_dir)
    ablations = ablation_tables([run for run in runs if not _explicit_variant(run)])
    if ablations:
        unit = _unit(runs, _eval_tasks(runs))
        parts += [f"### FIM-LoRA ablations ({unit}, mean ± std over seeds)", ""] + [t + "\n" for t in ablations]
    stats = rank_map_stats(runs, figures_dir)
    if stats:
        parts += ["### Rank maps (§4.4 statistics: mean rank by module type and by layer third)", ""] + stats + [""]
    parts += ["### Cost", "", cost_table(runs), ""]
    return parts


def _explicit_variant(run: dict) -> bool:
    """A variant from the config's ``fim_variants`` list is a method of its own (its own row in the method
    tables); ``fim_grid`` variants are an ablation (the ablation tables)."""
    return bool((run.get("config") or {}).get("fim_variants"))


def _plain_sections(plain: list[dict], csv_rows: list[dict]) -> list[str]:
    """Methods x tasks, the rank sweep, the verdicts and FIM-LoRA vs random-rank, each when it has content."""
    parts = ["### Methods x tasks", ""]
    parts += [t + "\n" for t in main_tables(plain, csv_rows)]
    sweep = rank_sweep(plain)
    if sweep:
        unit = _unit(plain, _eval_tasks(plain))
        parts += [f"### Rank sweep ({unit}, mean ± std over seeds)", ""] + [t + "\n" for t in sweep]
    verdict_text = verdicts(plain)
    if verdict_text:
        parts += ["### Where FIM-LoRA wins, ties or loses (difference in points; a tie is a difference "
                  "within the larger seed std)", "", VERDICT_LEGEND, "", verdict_text, ""]
    board = paired_scoreboard(plain)
    if board:
        parts += ["### Paired tests at a glance (FIM-LoRA against each peer over every rank and task)", "",
                  SCOREBOARD_LEGEND, "", scoreboard_table(board), ""]
    composites = paired_scoreboard(plain, [(c, p) for c, parents in COMPOSITE_PARENTS.items() for p in parents])
    if composites:
        parts += ["### Paired tests at a glance: each composite against the two methods it combines", "",
                  COMPOSITE_LEGEND, "", scoreboard_table(composites), ""]
    versus_random = fim_vs_random(plain)
    if versus_random:
        parts += ["### FIM-LoRA vs random-rank (same allocator, same budget)", "", versus_random, ""]
    return parts


# What the scoreboard counts, and why it has a corrected column.
SCOREBOARD_LEGEND = ("Each cell is one rank and one task, judged by the paired bootstrap above. A report makes many "
                     "comparisons, so about one in twenty would come out p < 0.05 with no real difference; the FDR "
                     "column counts only the cells that stay significant when the Benjamini-Hochberg false-discovery "
                     "rate is held at 5% over every cell of this table (`scipy.stats.false_discovery_control`).")
# How to read a composite's two rows: which half of it carries a difference.
COMPOSITE_LEGEND = ("Against FIM-LoRA, a composite differs only in its initialisation or scale (same ranks): that row "
                    "is what the other method's init adds to FIM ranks. Against the other method, it differs only "
                    "in its ranks (same init rule): that row is what FIM's ranks do for that init. FDR as above, "
                    "over this table's cells.")
# What the indented lines under each verdict are, and what their p-values are not.
VERDICT_LEGEND = ("Under each task's line: a paired bootstrap over its test examples, pooled over the seeds both "
                  "methods have (resampling examples, the same draws for every seed; "
                  "`fimlora.experiments.significance.paired_bootstrap`, 10,000 resamples): the difference in "
                  "accuracy in points, its 95% percentile interval and the two-sided p-value, not corrected for "
                  "the number of comparisons in this report. Seed std measures training noise on one test set; "
                  "the bootstrap measures how far that test set's size lets a difference be told from none.")


def _csv_text(csv_rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows(csv_rows)
    return buf.getvalue()


def write_report(results_dirs: list[Path], out: str | Path | None = None, title: str | None = None,
                 commands: list[str] | None = None, preface_path: str | Path | None = None) -> Path:
    """Write the report (Markdown, default ``<first results folder>/report.md``) and its CSV next to it;
    rank-map figures go to ``<report stem>_figures/``."""
    results_dirs = [Path(d) for d in ([results_dirs] if isinstance(results_dirs, (str, Path)) else results_dirs)]
    for d in results_dirs:
        if not d.is_dir():
            raise FileNotFoundError(f"results_dir: {d} is not a folder")
    out = Path(out) if out else results_dirs[0] / "report.md"
    preface = Path(preface_path).read_text(encoding="utf-8") if preface_path else None
    figures = out.parent / (out.stem + "_figures")
    md, table_csv = build_report(results_dirs, figures, title, commands, preface)
    atomic_write_text(out, md)
    atomic_write_text(out.with_suffix(".csv"), table_csv)
    return out
