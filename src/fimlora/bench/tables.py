"""The report's tables: selecting runs, their numbers (mean ± std over seeds, in points), and the methods x tasks,
GLUE, rank-sweep, ablation, frontier and cost tables, each as Markdown.

A run is a :class:`~fimlora.bench.results.RunResult` or a plain dict with the same keys; metrics are stored as
fractions and shown times 100.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

from ..app.metrics import GLUE_COLUMNS, GLUE_DISPLAY, METRIC_LABELS, METRICS, PAPER_METRIC, glue_task
from .registry import method_info, method_names

# The methods in the report's order, their labels, each composite's two parents (what it is judged against) and the
# baselines FIM-LoRA is judged against, in the order the verdict lines name them: all declared in .registry.
METHOD_ORDER = list(method_names())
METHOD_LABEL = {name: method_info(name).label for name in METHOD_ORDER}
COMPOSITE_PARENTS = {name: method_info(name).parents for name in METHOD_ORDER if method_info(name).parents}
BASELINES = tuple(sorted((name for name in METHOD_ORDER if method_info(name).baseline is not None),
                         key=lambda name: method_info(name).baseline))
# The column and verdict name of the per-seed mean over the evaluation tasks (the paper's Avg).
AVG = "Avg"
# What each metric's short label in a header means.
METRIC_NAMES = {"accuracy": "accuracy", "f1": "F1 of the positive class", "matthews": "Matthews correlation",
                "pearson": "Pearson correlation", "spearman": "Spearman correlation"}

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
    variant = run["fim_variant"]
    return ",".join(f"{k}={variant[k]}" for k in sorted(variant))


def _row_order(runs: list[dict], row: tuple[str, str]):
    """Sort key of a (method, variant) row: the paper's method order, then the variant's values."""
    method, variant_key = row
    sample = next(run for run in runs if (run["method"], _variant_key(run)) == row)
    variant = sample["fim_variant"]
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
        size = params_label(at_r).replace("params", "parameters")
        out.append(f"#### r = {r} ({_unit(at_r, columns)}, mean ± std over {n_seeds} seeds; {size})\n\n"
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


def safe_name(text: str) -> str:
    """``text`` as a file name part (an experiment or task name is the user's)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def run_params(run: dict) -> int:
    """A run's size: its parameters as served (the saved adapter: PiSSA and LoRA-GA saved as plain LoRA have rank
    2r) where the result records them, else its trainable parameters (results made before they were recorded)."""
    served = run.get("served_params")
    return run["trainable_params"] if served is None else served


def params_label(runs: list[dict]) -> str:
    """What :func:`run_params` counts for these runs, as a column header."""
    if all(run.get("served_params") is not None for run in runs):
        return "params as served"
    return "trainable params"


def _params_cell(runs: list[dict]) -> str:
    """The runs' parameter count (:func:`run_params`), or its range when the runs differ (random ranks, seeds)."""
    params = sorted({run_params(run) for run in runs})
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

# ----------------------------------------------------------------------------- ablations


def ablation_tables(runs: list[dict]) -> list[str]:
    """Tables over fim_grid variants: a 2-D grid when two settings vary, else a 1-D sweep per setting."""
    fim = [run for run in runs if run["method"] == "fim" and run["fim_variant"]]
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
    return _table(["Method", "calibration s (mean)", "training s (mean)", params_label(runs), "notes"], rows)


# ----------------------------------------------------------------------------- the accuracy-size frontier


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
                           "params": statistics.fmean(run_params(run) for run in sel),
                           "scores": {column: _scores(sel, column, tasks) for column in columns}})
    return points


def frontier_table(runs: list[dict], points: list[dict], tasks: list[str]) -> str:
    """The frontier as a table: a row per point (method, r, trainable parameters), mean ± std over seeds per
    column."""
    columns = tasks + ([AVG] if len(tasks) > 1 else [])
    n_seeds = len({run["seed"] for run in runs})
    rows = [[_label(p["method"], p["variant"]), str(p["r"]), f"{p['params']:,.0f}",
             *(_fmt(p["scores"][column], n_seeds) for column in columns)] for p in points]
    header = ["Method", "r", f"{params_label(runs)} (mean)",
              *(AVG if column == AVG else _column_header(runs, column) for column in columns)]
    return _table(header, rows)
