"""How many steps a "long" budget needs: where a validation-loss curve levels off (issue 30's second budget).

A run with ``train.eval_steps`` records ``validation_loss_curve``, [[step, loss], ...] (the loss a mean over the
validation examples, as training's). The curve is noisy at a few hundred examples, so it is smoothed by a centred
moving mean over ``window`` evaluations (shorter at the ends); it has levelled off at the first step whose smoothed
loss has made ``share`` of the whole drop, L_s(t) <= L_s(0) - share * (L_s(0) - min_t L_s(t)).

:func:`levelled_off_step` is plain data in, plain data out; :func:`curve_section` is the report's section for an
experiment whose runs recorded curves (a table of each run's levelled-off step, and the curves drawn).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .figures import report_pyplot, save_figure
from .tables import _label, _table, safe_name

__all__ = ["smoothed", "levelled_off_step", "curve_section", "CURVE_WINDOW", "CURVE_SHARE"]

# The report's smoothing (5 evaluations: at eval_steps 25, 125 steps) and share of the drop (95%).
CURVE_WINDOW = 5
CURVE_SHARE = 0.95


def smoothed(values: Sequence[float], window: int) -> list[float]:
    """Centred moving mean over ``window`` (odd, >= 1) values, the window cut at both ends."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window: must be an odd integer >= 1, got {window!r}")
    half = window // 2
    out = []
    for i in range(len(values)):
        part = values[max(0, i - half):i + half + 1]
        out.append(sum(part) / len(part))
    return out


def levelled_off_step(curve: Sequence[Sequence[float]], window: int = CURVE_WINDOW, share: float = CURVE_SHARE) -> int:
    """The first step at which the smoothed validation loss has made ``share`` of its whole drop (module docstring).

    ``curve``: [[step, loss], ...] in step order, at least 2 points, finite losses. A curve that never drops
    (min = start) has levelled off at its first step.
    """
    if len(curve) < 2:
        raise ValueError(f"curve: needs at least 2 evaluations, got {len(curve)}")
    if not 0 < share <= 1:
        raise ValueError(f"share: must be in (0, 1], got {share!r}")
    steps = [int(s) for s, _ in curve]
    if steps != sorted(steps):
        raise ValueError(f"curve: steps must increase, got {steps}")
    losses = smoothed([float(v) for _, v in curve], window)
    target = losses[0] - share * (losses[0] - min(losses))
    return next(step for step, loss in zip(steps, losses) if loss <= target + 1e-12)


def curve_section(runs: list[dict], experiment: str, figures_dir: Path | None) -> list[str]:
    """The report's lines for the runs of ``experiment`` that recorded a validation-loss curve: per run, its
    steps, learning rate, first and last validation loss and the step where the curve levelled off; with a figures
    folder, every curve drawn (raw and smoothed) with that step marked."""
    with_curve = sorted((run for run in runs if run.get("validation_loss_curve")), key=lambda run: run["run_id"])
    if not with_curve:
        return []
    rows = []
    for run in with_curve:
        curve = run["validation_loss_curve"]
        rows.append([_label(run["method"], ""), str(run["r"]), str(run["seed"]), f"{run.get('learning_rate'):g}",
                     str(run["train_steps"]), f"{curve[0][1]:.3f}", f"{curve[-1][1]:.3f}",
                     str(levelled_off_step(curve)) if len(curve) > 1 else "–"])
    header = ["Method", "r", "seed", "LR", "steps", "val loss at 0", "val loss at end", "levelled off at step"]
    parts = ["### Validation loss during training", "",
             f"Validation loss every `train.eval_steps` steps. Levelled off: the first step where the loss, smoothed "
             f"over {CURVE_WINDOW} evaluations, has made {100 * CURVE_SHARE:.0f}% of its whole drop "
             f"(`fimlora.bench.budget.levelled_off_step`).", "", _table(header, rows), ""]
    if figures_dir is not None:
        fig = figures_dir / f"curves_{safe_name(experiment)}.png"
        if _draw_curves(with_curve, fig, f"{experiment}: validation loss"):
            parts += [f"![validation loss during training, {experiment}]({fig.parent.name}/{fig.name})", ""]
    return parts


def _draw_curves(runs: list[dict], fig: Path, title: str) -> bool:
    plt = report_pyplot("validation-loss", "the validation-loss curves")
    if plt is None:
        return False

    fig_obj, ax = plt.subplots(figsize=(7, 4.5))
    for i, run in enumerate(runs):
        steps = [s for s, _ in run["validation_loss_curve"]]
        losses = [v for _, v in run["validation_loss_curve"]]
        color = f"C{i % 10}"
        ax.plot(steps, losses, "-", color=color, alpha=0.3, linewidth=0.8)
        ax.plot(steps, smoothed(losses, CURVE_WINDOW), "-", color=color,
                label=f"{_label(run['method'], '')} r={run['r']} s={run['seed']} lr={run.get('learning_rate'):g}")
        if len(steps) > 1:
            ax.axvline(levelled_off_step(run["validation_loss_curve"]), color=color, linestyle=":")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title(title)
    ax.legend(fontsize="small")
    save_figure(plt, fig_obj, fig)
    return True
