"""Settings of a FIM-LoRA calibration, validated on construction."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

__all__ = [
    "FimConfig",
    "ESTIMATORS",
    "AGGREGATIONS",
    "SCALE_MODES",
    "LOSS_REDUCTIONS",
    "check_int",
    "check_number",
    "check_choice",
    "check_bool",
]

ESTIMATORS = ("batch", "per_example")
AGGREGATIONS = ("mean", "max", "l2")
SCALE_MODES = ("preserve", "fixed_alpha")
LOSS_REDUCTIONS = ("mean", "sum")


def check_int(name: str, value, minimum: int | None = None, allow_none: bool = False) -> None:
    """An integer (``True`` is not one), optionally ``>= minimum``; the error names the field."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")


def check_number(name: str, value, minimum: float | None = None, strict: bool = True,
                 allow_none: bool = False) -> None:
    """A finite real number (not a bool, not NaN), optionally above (``strict``) or at least ``minimum``."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number, got {value!r}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{name}: must be {'>' if strict else '>='} {minimum:g}, got {value!r}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}: must be one of {list(choices)}, got {value!r}")


def check_bool(name: str, value) -> None:
    """A real bool: YAML's ``"no"`` in quotes is a string, and a string is always truthy."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}: must be true or false, got {value!r}")


@dataclass
class FimConfig:
    """How to calibrate and allocate.

    Attributes:
        n_batches: calibration batches N (the paper's default 8).
        r_min: smallest rank any module may get (>= 1).
        r_max: largest rank; ``None`` means 2 * the config's base rank r.
        budget: total rank over all modules; ``None`` means the sum of current ranks
            (L * r for uniform LoRA).
        estimator: ``"batch"`` squares each mini-batch gradient (the paper's);
            ``"per_example"`` averages squared per-example gradients (eq. 1).
        aggregation: module score from its Fisher matrix: ``"mean"``, ``"max"`` or ``"l2"``.
        scale: ``"preserve"`` keeps alpha_m / r_m (or / sqrt(r_m) with rsLoRA) equal to
            the module's old value; ``"fixed_alpha"`` keeps alpha_m and lets the scale move.
        loss_reduction: how the loss combines examples, ``"mean"`` (HF models) or ``"sum"``;
            the per-example estimator needs it to undo the 1/batch factor.
        train_mode: keep dropout on during calibration (default off: deterministic scores).
        loss_scale: multiply the loss by this before backward and divide gradients after;
            ``None`` = 1 for fp32/bf16 and 1024 for fp16 models (avoids gradient underflow).
        seed: seeds the initialisation of new A rows, so every process gets identical rows.
        adapter_name: the PEFT adapter to calibrate and resize.
        progress: show a progress bar.
    """

    n_batches: int = 8
    r_min: int = 1
    r_max: int | None = None
    budget: int | None = None
    estimator: str = "batch"
    aggregation: str = "mean"
    scale: str = "preserve"
    loss_reduction: str = "mean"
    train_mode: bool = False
    loss_scale: float | None = None
    seed: int = 0
    adapter_name: str = "default"
    progress: bool = True

    def __post_init__(self) -> None:
        check_int("n_batches", self.n_batches, minimum=1)
        check_int("r_min", self.r_min, minimum=1)
        check_int("r_max", self.r_max, minimum=1, allow_none=True)
        if self.r_max is not None and self.r_max < self.r_min:
            raise ValueError(f"r_max: must be >= r_min, got r_max={self.r_max} < r_min={self.r_min}")
        check_int("budget", self.budget, minimum=1, allow_none=True)
        check_choice("estimator", self.estimator, ESTIMATORS)
        check_choice("aggregation", self.aggregation, AGGREGATIONS)
        check_choice("scale", self.scale, SCALE_MODES)
        check_choice("loss_reduction", self.loss_reduction, LOSS_REDUCTIONS)
        check_number("loss_scale", self.loss_scale, minimum=0, allow_none=True)
        check_int("seed", self.seed)
        if not isinstance(self.adapter_name, str) or not self.adapter_name:
            raise ValueError(f"adapter_name: must be a non-empty string, got {self.adapter_name!r}")
        check_bool("train_mode", self.train_mode)
        check_bool("progress", self.progress)

    def to_dict(self) -> dict:
        return asdict(self)
