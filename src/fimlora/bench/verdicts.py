"""FIM-LoRA (and each composite) against its baselines: win/tie/loss by seed noise, paired bootstraps over the test
examples, and a scoreboard with the false-discovery rate controlled."""

from __future__ import annotations

import math
import statistics

from .significance import paired_bootstrap
from .tables import (
    AVG,
    BASELINES,
    COMPOSITE_PARENTS,
    METHOD_LABEL,
    METHOD_ORDER,
    _eval_tasks,
    _points,
    _ranks,
    _score,
    _scores,
    _table,
    mean_std,
    select_runs,
    task_scores,
)

# Bootstrap resamples per comparison: p-values resolve to about 1e-4, and a report of a few hundred comparisons
# over a few hundred examples each stays within seconds.
BOOTSTRAP_RESAMPLES = 10_000
# The level at which the paired-test summary calls a difference significant.
SIGNIFICANCE_LEVEL = 0.05

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
    """:func:`~fimlora.bench.significance.paired_bootstrap` of ``a_runs`` against ``b_runs`` on ``task``
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
