"""The fair learning-rate protocol: each method chooses its own learning rate, on validation data.

A config with ``lr_grid: [...]`` (and ``data.max_validation``) runs in two steps per *cell* (task, method,
rank, FIM variant):

1. **Choose.** The config's first seed trains at every grid value; each run is scored on the validation split
   carved from the training data (never on the test set). The chosen learning rate is the one of highest
   validation score (:func:`validation_score`); a tie goes to the smaller learning rate, a diverged run scores
   nothing.
2. **Repeat.** The other seeds train at the chosen learning rate only, with the same steps and batch (the same
   token budget) as every other method. The cell's result is its seeds at the chosen rate: the choosing run of the
   first seed plus the repeats. Its test score was not looked at in the choice.

This module holds the rule (plain data in, plain data out); :mod:`.sweep` plans and runs the repeats and
:mod:`.report` reads the choices back with the same function, so the sweep and the report cannot disagree.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

__all__ = ["LrChoice", "validation_score", "choose_learning_rate", "cell_of", "choices_by_cell", "at_chosen_lr"]


@dataclass(frozen=True)
class LrChoice:
    """A cell's chosen learning rate. ``curve``: {learning rate: validation score, None where the run diverged},
    in grid order; ``seed``: the seed whose runs chose it; ``metric``: what the score is (the validation
    split's headline metric, averaged over the run's eval tasks)."""

    learning_rate: float
    seed: int
    metric: str
    curve: dict

    def to_dict(self) -> dict:
        return asdict(self)


def validation_score(run: Mapping) -> tuple[float, str] | None:
    """(score, metric name) of a run on its validation split: the mean over eval tasks of each task's headline
    metric (``primary``), higher is better (a loss is negated); None for a diverged run or one with no
    validation metrics."""
    if run.get("status") != "ok":
        return None
    metrics = run.get("validation_metrics") or {}
    values, names = [], set()
    for task_metrics in metrics.values():
        name = task_metrics.get("primary", "loss" if "loss" in task_metrics else None)
        value = task_metrics.get(name) if name else None
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        values.append(-value if name == "loss" else float(value))
        names.add(name)
    if not values:
        return None
    return sum(values) / len(values), "/".join(sorted(names))


def cell_of(run: Mapping) -> tuple:
    """The cell a result belongs to: (experiment, task, method, r, sorted FIM variant)."""
    return (run.get("experiment", ""), run["task"], run["method"], run["r"],
            tuple(sorted((run.get("fim_variant") or {}).items())))


def choose_learning_rate(grid_runs: Iterable[Mapping], grid: list[float], seed: int) -> LrChoice | None:
    """The learning rate of highest validation score among ``grid_runs`` (one cell's runs of ``seed`` at the grid
    values; runs of other seeds or rates off the grid are ignored); None until every grid value has a finished run,
    or when every one diverged. Ties go to the smaller learning rate (the safer one to train at)."""
    by_lr = {}
    for run in grid_runs:
        lr = run.get("learning_rate")
        if run.get("seed") == seed and lr in grid:
            by_lr[lr] = run
    if set(by_lr) != set(grid):
        return None
    scored = {lr: validation_score(by_lr[lr]) for lr in sorted(grid)}
    finite = [(score[0], -lr) for lr, score in scored.items() if score is not None]
    if not finite:
        return None
    best = -max(finite)[1]
    metric = next(score[1] for score in scored.values() if score is not None)
    return LrChoice(best, seed, metric, {lr: (None if s is None else s[0]) for lr, s in scored.items()})


def choices_by_cell(runs: Iterable[Mapping]) -> dict[tuple, LrChoice | None]:
    """{cell: its choice (None while undecided)} for every cell of the runs made under an ``lr_grid`` config
    (the grid and seeds are read from the config each result recorded)."""
    groups: dict[tuple, list] = {}
    settings: dict[tuple, tuple] = {}
    for run in runs:
        config = run.get("config") or {}
        if not config.get("lr_grid"):
            continue
        cell = cell_of(run)
        groups.setdefault(cell, []).append(run)
        settings[cell] = (list(config["lr_grid"]), config["seeds"][0])
    return {cell: choose_learning_rate(group, *settings[cell]) for cell, group in groups.items()}


def at_chosen_lr(runs: list[Mapping]) -> tuple[list[Mapping], dict[tuple, LrChoice | None]]:
    """(the runs a table should show, the choices): runs made without an ``lr_grid`` pass through; of a grid
    config's runs only those at their cell's chosen learning rate stay (every seed), and none of an undecided
    cell."""
    choices = choices_by_cell(runs)
    kept = []
    for run in runs:
        if not (run.get("config") or {}).get("lr_grid"):
            kept.append(run)
            continue
        choice = choices.get(cell_of(run))
        if choice is not None and run.get("learning_rate") == choice.learning_rate:
            kept.append(run)
    return kept, choices
