"""``fimlora report``: the paper's tables (mean ± std over seeds) from a folder of run results.

The tables are built in :mod:`.tables`, the verdicts and paired tests in :mod:`.verdicts`; this module puts them
in sections, adds the rank maps and the frontier plot, and writes the Markdown and CSV.

A *run* is one result (:class:`~fimlora.bench.results.RunResult`) as written by the sweep (``run_id``,
``experiment``, ``task``, ``method``, ``r``, ``seed``, ``status``, ``fim_variant``, ``metrics`` = {task: {metric:
0-1, ..., "n": test size, "primary": headline metric}}, costs and rank maps). Metrics are stored as fractions and
shown times 100.

Each task's column shows one metric (:func:`column_metric`): for GLUE through ``hf:glue:NAME`` the one
the paper's Table 1 shows (Matthews for CoLA, Pearson for STS-B, F1 for MRPC and QQP, accuracy for the
rest); for any other task the headline its results record, accuracy for results older than that.
GLUE runs of every experiment are also gathered into one table in the paper's Table 1 layout.
"""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path

from ..extras import MissingExtraError
from ..io import atomic_write_text
from .budget import curve_section
from .figures import report_pyplot, save_figure
from .lr_protocol import at_chosen_lr
from .lr_report import lr_rule_section, lr_section
from .results import load_results
from .tables import (
    AVG,
    COMPOSITE_PARENTS,
    _eval_tasks,
    _label,
    _points,
    _ranks,
    _unit,
    _variant_key,
    ablation_tables,
    cost_table,
    frontier_points,
    frontier_table,
    glue_table,
    main_tables,
    mean_std,
    params_label,
    rank_sweep,
    safe_name,
    select_runs,
    task_scores,
)
from .verdicts import fim_vs_random, paired_comparison, paired_scoreboard, scoreboard_table, verdicts

__all__ = ["load_results", "mean_std", "task_scores", "select_runs", "paired_comparison", "paired_scoreboard",
           "rank_sweep", "scoreboard_table", "verdicts", "build_report", "write_report"]

CSV_FIELDS = ["table", "r", "method", "variant", "task", "mean", "std", "n", "metric"]


# ----------------------------------------------------------------------------- rank maps


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
        fig = figures_dir / f"rank_map_{safe_name(run['experiment'])}_{run['task'].replace('+', '_')}_r{run['r']}.png"
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



# ----------------------------------------------------------------------------- the accuracy-size frontier

FRONTIER_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h")



def draw_frontier(points: list[dict], columns: list[str], fig: Path, title: str,
                  size: str = "trainable parameters") -> bool:
    """One panel per column (each task, and Avg), a line per method: mean score in points against trainable
    parameters (log scale), seed std as error bars. False (the report goes on without it) when matplotlib is
    missing."""
    plt = report_pyplot("frontier", "the accuracy-size frontier")
    if plt is None:
        return False

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
        ax.set_xlabel(size)
        ax.set_ylabel("score (%)")
        ax.set_title(name)
    # Beside the panels, not on one: with a dozen methods an inner legend hides the points it names.
    axes[0][-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig_obj.suptitle(title)
    save_figure(plt, fig_obj, fig)
    return True


def frontier_section(runs: list[dict], experiment: str, figures_dir: Path | None) -> list[str]:
    """The frontier's lines: its table and, with ``figures_dir``, its plot linked below; none for one size."""
    if len(_ranks(runs)) < 2:
        return []
    tasks = _eval_tasks(runs)
    points = frontier_points(runs, tasks)
    size = params_label(runs).replace("params", "parameters")
    parts = [f"### Accuracy-size frontier ({_unit(runs, tasks)}, mean ± std over seeds, against {size})", "",
             frontier_table(runs, points, tasks), ""]
    doubled = sorted({_label(run["method"], "") for run in runs
                      if run.get("served_params") is not None and run["served_params"] > run["trainable_params"]})
    if doubled:
        parts += [f"{', '.join(doubled)}: served as plain LoRA of rank 2r for the unchanged base (their init "
                  "rewrote the base weights), so their parameters as served exceed what they trained.", ""]
    if figures_dir is not None:
        fig = figures_dir / f"frontier_{safe_name(experiment)}.png"
        columns = tasks + ([AVG] if len(tasks) > 1 else [])
        if draw_frontier(points, columns, fig, f"{experiment}: score against {size}", size):
            parts += [f"![accuracy-size frontier {experiment}]({fig.parent.name}/{fig.name})", ""]
    return parts


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
    rule = lr_rule_section(runs)
    if rule:
        parts += [""] + rule
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
    fim_grid ablations, rank maps and cost; for an ``lr_grid`` config the tables show each cell's runs at its
    chosen learning rate, and a learning-rate section shows the choices and curves."""
    parts = ["", f"## {experiment}", ""]
    every_run = runs
    runs, choices = at_chosen_lr(runs)
    plain = [run for run in runs if not run["fim_variant"] or _explicit_variant(run)]
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
    parts += lr_section(every_run, runs, choices, experiment, figures_dir)
    parts += curve_section(every_run, experiment, figures_dir)
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
                  "`fimlora.bench.significance.paired_bootstrap`, 10,000 resamples): the difference in "
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
