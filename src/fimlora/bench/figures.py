"""The report's figures: opening pyplot for a file (or warning that the figure is left out) and writing it."""

from __future__ import annotations

import warnings
from pathlib import Path

from ..extras import MissingExtraError, require

__all__ = ["report_pyplot", "save_figure"]


def report_pyplot(figure: str, drawing: str):
    """``matplotlib.pyplot`` on the file-only Agg backend, or None with the warning "report: ``figure`` figure left
    out" when the ``plot`` extra is missing (``drawing``: what it was for): the report's tables carry the numbers,
    a missing extra only costs the picture. The warning points at the caller of the drawing function."""
    try:
        matplotlib = require("matplotlib", "plot", f"report: drawing {drawing}")
    except MissingExtraError as e:
        warnings.warn(f"report: {figure} figure left out: {e}", stacklevel=4)
        return None
    matplotlib.use("Agg")  # files only: no display on a headless machine
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt, fig_obj, path: Path) -> None:
    """Lay out, write (120 dpi, the folder made) and close ``fig_obj``."""
    fig_obj.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig_obj.savefig(path, dpi=120)
    plt.close(fig_obj)
