"""Reading a rank map: layer x module-type grid, terminal table, §4.4 statistics, heatmap."""

from __future__ import annotations

import math
import re
from pathlib import Path

from .allocation import RankAllocation
from .confidence import not_estimable_text, units_text
from .extras import require
from .lr import LrRecommendation

__all__ = ["split_name", "rank_grid", "rank_stats", "group_stats", "format_rank_table", "budget_text",
           "confidence_text", "plot_rank_map", "save_rank_map"]

_LAYER = re.compile(r"^(?P<prefix>.*?)\.(?P<idx>\d+)\.(?P<rest>.+)$")


def split_name(name: str) -> tuple[int | None, str]:
    """(layer index, module type): ``model.layers.3.self_attn.q_proj`` -> (3, ``self_attn.q_proj``).

    Modules outside the repeated layers (``bert.pooler.dense``) get layer None.
    """
    m = _LAYER.match(name)
    if not m:
        return None, name
    return int(m.group("idx")), m.group("rest")


def rank_grid(values: dict[str, float]) -> tuple[list[int], list[str], dict[tuple[int, str], float], dict[str, float]]:
    """(layers, types, grid[(layer, type)] -> value, others) for per-module values."""
    grid, others = {}, {}
    layers, types = [], []
    for name, v in values.items():
        layer, typ = split_name(name)
        if layer is None:
            others[name] = v
            continue
        grid[(layer, typ)] = v
        if layer not in layers:
            layers.append(layer)
        if typ not in types:
            types.append(typ)
    return sorted(layers), types, grid, others


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def group_stats(alloc: RankAllocation) -> dict:
    """:func:`rank_stats` of the allocation's ranks, with its base rank and budget."""
    return {**rank_stats(alloc.ranks), "base_r": alloc.base_r, "budget": alloc.budget}


def rank_stats(ranks: dict[str, int]) -> dict:
    """Mean rank per module type and per layer group (first, middle, last third of layers; the first and last
    groups are equal in size, so two layers are "first" and "last" and a middle group needs three) of a plain
    {module: rank} map (an allocation's, or a run's recorded rank map)."""
    layers, types, grid, _ = rank_grid(ranks)
    by_type = {t: _mean([grid[(l, t)] for l in layers if (l, t) in grid]) for t in types}
    groups = {}
    if layers:
        n = len(layers)
        k = max(1, round(n / 3))
        cuts = [0, k, max(k, n - k), n]
        for label, (a, b) in zip(("first", "middle", "last"), zip(cuts, cuts[1:])):
            ls = layers[a:b]
            if ls:
                vals = [grid[(l, t)] for l in ls for t in types if (l, t) in grid]
                groups[label] = {"layers": [ls[0], ls[-1]], "mean_rank": _mean(vals)}
    return {"mean_rank_by_type": by_type, "mean_rank_by_layer_group": groups}


def _short(t: str) -> str:
    return t.replace("self_attn.", "").replace("attention.self.", "").replace("attention.output.dense", "attn_out") \
        .replace("mlp.", "").replace("intermediate.dense", "ffn_in").replace("output.dense", "ffn_out")


def format_rank_table(alloc: RankAllocation) -> str:
    """Compact text table: rank by layer and module type, then the §4.4 statistics."""
    unstable = set(alloc.unstable_modules())
    # An unstable rank is shown as "3?": the bootstrap gives it in fewer than the threshold of resamples.
    cells_text = {n: f"{r}?" if n in unstable else str(r) for n, r in alloc.ranks.items()}
    layers, types, grid, others = rank_grid(cells_text)
    heads = [_short(t) for t in types]
    w = max([5] + [len(h) for h in heads])
    lines = [f"{'layer':>5} " + " ".join(f"{h:>{w}}" for h in heads)]
    for l in layers:
        cells = [f"{grid[(l, t)]:>{w}}" if (l, t) in grid else f"{'':>{w}}" for t in types]
        lines.append(f"{l:>5} " + " ".join(cells))
    for name, r in others.items():
        lines.append(f"{name}: {r}")
    stats = group_stats(alloc)
    lines.append("")
    by_type = stats["mean_rank_by_type"].items()
    by_group = stats["mean_rank_by_layer_group"].items()
    lines.append("mean rank by type:  " + ", ".join(f"{_short(t)} {v:.2f}" for t, v in by_type))
    lines.append("mean rank by layers: " + ", ".join(
        f"{g} ({v['layers'][0]}-{v['layers'][1]}) {v['mean_rank']:.2f}" for g, v in by_group))
    lines.append(f"{budget_text(alloc)} over {len(alloc.ranks)} modules (base r={alloc.base_r}, "
                 f"r_min={alloc.r_min}, r_max={alloc.r_max}); LoRA params spent {alloc.params_spent:,}")
    if alloc.confidence:
        lines.append(confidence_text(alloc))
    if alloc.lr:
        lines.append(LrRecommendation.from_dict(alloc.lr).text())
    dropped = [n for n, r in alloc.ranks.items() if r == 0]
    if dropped:
        lines.append(f"{len(dropped)} module(s) at rank 0 dropped (no adapter): " + ", ".join(dropped))
    return "\n".join(lines)


def confidence_text(alloc: RankAllocation) -> str:
    """One line on the bootstrap: the stable share and what "?" marks."""
    c = alloc.confidence
    if not c.get("estimable", True):
        return f"stable: {not_estimable_text(c['n_units'], c['unit'])}"
    n_unstable = len(alloc.unstable_modules())
    return (f"stable: {100 * c['stable_share']:.0f}% of modules keep their rank in >= {100 * c['threshold']:.0f}% "
            f"of {c['n_resamples']} bootstrap resamples of the {units_text(c['n_units'], c['unit'])}; "
            + (f"? marks the {n_unstable} that do not" if n_unstable else "none is marked ?"))


def budget_text(alloc: RankAllocation) -> str:
    """The budget with its unit: ``budget 56 ranks`` or ``budget 1,024 params``."""
    if alloc.budget_unit == "params":
        return f"budget {alloc.budget:,} params"
    return f"budget {alloc.budget} ranks"


def _plotting():
    """matplotlib's ``Figure`` and ``rc_context``, or an ImportError naming the extra to install."""
    matplotlib = require("matplotlib", "plot", "plot_rank_map: drawing the rank map")
    from matplotlib.figure import Figure

    return Figure, matplotlib.rc_context


def save_rank_map(allocation: RankAllocation, folder: str | Path) -> tuple[list[Path], list[str]]:
    """Write ``rank_map.json``, then ``rank_map.png`` when it can be drawn; returns (files written, notes).

    The JSON comes first, so a missing matplotlib or a model without numbered layers costs only the picture.
    """
    folder = Path(folder)
    files = [folder / "rank_map.json"]
    allocation.to_json(files[0])
    try:
        files.append(plot_rank_map(allocation, folder / "rank_map.png"))
    except (ImportError, ValueError) as e:  # no matplotlib; or no numbered layers, so no grid to draw
        return files, [f"rank_map.png skipped: {e}"]
    return files, []


def _name_at(ranks: dict[str, int], layer: int, typ: str) -> str | None:
    return next((n for n in ranks if split_name(n) == (layer, typ)), None)


def _title(alloc: RankAllocation) -> str:
    stable = ""
    if alloc.confidence and not alloc.confidence.get("estimable", True):
        stable = "; stability not estimable"
    elif alloc.confidence:
        stable = f"; {100 * alloc.confidence['stable_share']:.0f}% stable, ? = unstable rank"
    lr = f"\n{LrRecommendation.from_dict(alloc.lr).short_text()}" if alloc.lr else ""
    return (f"FIM-LoRA rank map ({budget_text(alloc)}, {alloc.params_spent:,} params spent, "
            f"r={alloc.base_r}, r_min={alloc.r_min}, r_max={alloc.r_max}{stable}){lr}")


def plot_rank_map(alloc: RankAllocation | dict[str, int], path: str | Path, scores: bool | dict[str, float] = True,
                  title: str | None = None) -> Path:
    """Heatmap of layer x module type with the rank in each cell; scores (log10) as a second panel.

    ``alloc``: an allocation, or a plain {module: rank} map (a run's recorded rank map), drawn without the
    allocation's budget, bounds and stability; ``scores``: whether to draw the allocation's scores, or the
    {module: score} to draw (False: none).

    The image is (1.1 * types * panels + 2) x (0.35 * layers + 2.2) inches at 120 dpi; the format follows the
    suffix (``.png``, ``.svg``, ...). SVG keeps text as text, so the ranks stay searchable.
    Raises ValueError when no module name has a layer index, ImportError without matplotlib.
    """
    allocation = alloc if isinstance(alloc, RankAllocation) else None
    ranks = allocation.ranks if allocation else dict(alloc)
    layers, types, grid, _ = rank_grid(ranks)
    if not layers:
        raise ValueError(
            f"rank map: no module name has a layer index (like model.layers.3.self_attn.q_proj), got "
            f"{list(ranks)[:3]}; nothing to plot as a grid"
        )
    Figure, rc_context = _plotting()
    panels = [("rank", ranks)]
    score_map = (allocation.scores if allocation else {}) if scores is True else (scores or {})
    if score_map:
        panels.append(("log10 score", {n: math.log10(s) if s > 0 else float("nan") for n, s in score_map.items()}))
    unstable = set(allocation.unstable_modules()) if allocation else set()
    # Text turns dark above the middle of the rank range.
    middle = ((allocation.r_min + allocation.r_max) if allocation else (min(ranks.values()) + max(ranks.values()))) / 2
    # A bare Figure, not pyplot: no global backend switch and no figure registry in the caller's process.
    fig = Figure(figsize=(1.1 * len(types) * len(panels) + 2, 0.35 * len(layers) + 2.2))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (label, values) in zip(axes[0], panels):
        _, _, g, _ = rank_grid(values)
        data = [[g.get((l, t), float("nan")) for t in types] for l in layers]
        im = ax.imshow(data, aspect="auto", cmap="viridis", origin="upper")
        ax.set_xticks(range(len(types)), [_short(t) for t in types], rotation=45, ha="right")
        ax.set_yticks(range(len(layers)), [str(l) for l in layers])
        ax.set_ylabel("layer")
        ax.set_title(label)
        if label == "rank":
            for i, row in enumerate(data):
                for j, v in enumerate(row):
                    if v == v:
                        # Same "?" as the table: the bootstrap does not give this cell its rank often enough.
                        text = f"{int(v)}?" if _name_at(ranks, layers[i], types[j]) in unstable else str(int(v))
                        ax.text(j, i, text, ha="center", va="center", fontsize=7,
                                color="white" if v < middle else "black")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title or (_title(allocation) if allocation else "rank map"), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with rc_context({"svg.fonttype": "none"}):
        fig.savefig(path, dpi=120)
    return path
