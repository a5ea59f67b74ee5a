"""The learning-rate section of a report for configs with an ``lr_grid`` (:mod:`.lr_protocol`).

Per task and rank: each method's chosen learning rate, its validation curve over the grid (the first seed), and
its test score at the chosen rate over every seed; with a figures folder, the curves drawn (validation score
against learning rate, log scale, one line per method, the chosen rate marked).
"""

from __future__ import annotations

from pathlib import Path

from .figures import report_pyplot, save_figure
from .lr_protocol import LrChoice, at_chosen_lr, cell_of
from .tables import _label, _points, _table, _unit, mean_std, safe_name, task_scores

__all__ = ["lr_section", "draw_lr_curves", "lr_rule_section"]


def _cells(choices: dict[tuple, LrChoice | None], task: str, r: int) -> list[tuple[tuple, LrChoice | None]]:
    return [(cell, choice) for cell, choice in choices.items() if cell[1] == task and cell[3] == r]


def _variant_label(cell: tuple) -> str:
    return _label(cell[2], ", ".join(f"{k}={v}" for k, v in cell[4]))


def lr_section(runs: list[dict], kept: list[dict], choices: dict[tuple, LrChoice | None], experiment: str,
               figures_dir: Path | None) -> list[str]:
    """The section's lines. ``runs``: every run of the experiment; ``kept``: those at their cell's chosen rate."""
    if not choices:
        return []
    grid = sorted({float(lr) for choice in choices.values() if choice for lr in choice.curve})
    parts = ["### Learning rates (each method's own, chosen on validation data)", "",
             "Each cell trained its first seed at every rate of the grid and kept the rate of highest validation "
             "score (validation split carved from the training data; the test set is not looked at); its other "
             "seeds trained at that rate. Curve: validation score (points) of the first seed at each rate, the "
             "chosen one in bold; test: mean ± std over every seed at the chosen rate.", ""]
    tasks = sorted({cell[1] for cell in choices})
    ranks = sorted({cell[3] for cell in choices})
    undecided = [cell for cell, choice in choices.items() if choice is None]
    for task in tasks:
        for r in ranks:
            cells = _cells(choices, task, r)
            if not cells:
                continue
            rows = []
            for cell, choice in cells:
                at = [run for run in kept if cell_of(run) == cell]
                m, s = mean_std(_points(task_scores(at, task))) if at else (float("nan"), float("nan"))
                curve = ["–" if choice is None else _curve_cell(choice, lr) for lr in grid]
                rows.append([_variant_label(cell), "undecided" if choice is None else f"{choice.learning_rate:g}",
                             *curve, f"{m:.1f} ± {s:.1f} (n={len(at)})" if at else "–"])
            header = ["Method", "chosen LR", *(f"val @ {lr:g}" for lr in grid),
                      f"test at chosen LR ({_unit(kept, [task])})"]
            parts += [f"#### {task}, r = {r}", "", _table(header, rows), ""]
            if figures_dir is not None:
                fig = figures_dir / f"lr_{safe_name(experiment)}_{safe_name(task)}_r{r}.png"
                if draw_lr_curves(cells, fig, f"{experiment}: {task}, r = {r}"):
                    parts += [f"![validation score against learning rate, {task}, r = {r}]"
                              f"({fig.parent.name}/{fig.name})", ""]
    if undecided:
        parts += [f"{len(undecided)} cell(s) have no chosen rate yet (a choosing run missing, failed or diverged "
                  f"at every rate): {', '.join(_variant_label(c) + f' {c[1]} r={c[3]}' for c in undecided)}.", ""]
    return parts


def _curve_cell(choice: LrChoice, lr: float) -> str:
    value = {float(k): v for k, v in choice.curve.items()}.get(lr)
    if value is None:
        return "diverged"
    text = f"{100 * value:.1f}"
    return f"**{text}**" if lr == choice.learning_rate else text


def draw_lr_curves(cells: list[tuple[tuple, LrChoice | None]], fig: Path, title: str) -> bool:
    """Validation score against learning rate (log scale), a line per method, the chosen rate circled; False
    (the report goes on without it) when matplotlib is missing."""
    plt = report_pyplot("learning-rate", "the learning-rate curves")
    if plt is None:
        return False

    fig_obj, ax = plt.subplots(figsize=(7, 4.5))
    for i, (cell, choice) in enumerate(cells):
        if choice is None:
            continue
        points = sorted((float(lr), v) for lr, v in choice.curve.items() if v is not None)
        line = "-" if i < 10 else "--"
        ax.plot([lr for lr, _ in points], [100 * v for _, v in points], line, marker="o", markersize=3,
                color=f"C{i % 10}", label=_variant_label(cell))
        best = {float(k): v for k, v in choice.curve.items()}[choice.learning_rate]
        ax.plot([choice.learning_rate], [100 * best], "o", markersize=9, markerfacecolor="none", color=f"C{i % 10}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("validation score (%)")
    ax.set_title(title)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    save_figure(plt, fig_obj, fig)
    return True


def lr_rule_section(runs: list[dict]) -> list[str]:
    """Training at the recommended learning rate (runs of an ``lr_rule`` config) against the grid's best (the runs
    of an ``lr_grid`` config at their cell's chosen rate) for every (task, method, r, variant) both have: test
    mean ± std over seeds of each, the difference, and whether it is within one seed std (the larger of the two)."""
    ruled = [run for run in runs if (run.get("method_info") or {}).get("lr_recommendation")]
    if not ruled:
        return []
    kept, choices = at_chosen_lr([run for run in runs if (run.get("config") or {}).get("lr_grid")])
    rows = []
    for key in sorted({_key(run) for run in ruled}, key=str):
        task, method, r, variant = key
        mine = [run for run in ruled if _key(run) == key]
        best = [run for run in kept if _key(run) == key]
        if not best:
            continue
        chosen = {choice.learning_rate for cell, choice in choices.items() if choice and cell[1:] == key}
        recommended = sorted({run["learning_rate"] for run in mine})
        rule = mine[0]["method_info"]["lr_recommendation"]["rule"]
        (m1, s1), (m2, s2) = (mean_std(_points(task_scores(x, task))) for x in (mine, best))
        within = abs(m1 - m2) <= max(s1, s2)
        rows.append([task, _label(method, ", ".join(f"{k}={v}" for k, v in variant)), str(r), rule,
                     "–".join(f"{lr:.2g}" for lr in (recommended[0], recommended[-1]) if lr) if len(recommended) > 1
                     else f"{recommended[0]:.2g}",
                     f"{m1:.1f} ± {s1:.1f} (n={len(mine)})", ", ".join(f"{lr:g}" for lr in sorted(chosen)),
                     f"{m2:.1f} ± {s2:.1f} (n={len(best)})", f"{m1 - m2:+.1f}", "yes" if within else "no"])
    if not rows:
        return []
    header = ["task", "Method", "r", "rule", "recommended LR", "test at recommended", "grid's chosen LR",
              "test at chosen", "difference", "within one seed std"]
    return ["## The recommended learning rate against each grid's best", "",
            "Runs of an `lr_rule` config train at the rate `fimlora` recommends for the prepared adapter "
            "(`fimlora.lr.compute_lr_recommendation`, the rule's constant from `lr_rule.json`; one rate per seed, "
            "since each seed's adapter is measured); the grid's best is the same cell of an `lr_grid` config at its "
            "chosen rate. Scores in points, mean ± std over seeds.", "", _table(header, rows), ""]


def _key(run: dict) -> tuple:
    return (run["task"], run["method"], run["r"], tuple(sorted((run.get("fim_variant") or {}).items())))
