"""Settings of a FIM-LoRA calibration, validated on construction."""

from __future__ import annotations

import functools
import json
import math
import re
import textwrap
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

__all__ = [
    "FimConfig",
    "FIM_DEFAULTS",
    "setting_help",
    "ESTIMATORS",
    "AGGREGATIONS",
    "SCALE_MODES",
    "LOSS_REDUCTIONS",
    "BUDGET_UNITS",
    "VLLM_MAX_LORA_RANKS",
    "MIN_AUTO_BATCHES",
    "MIN_AUTO_BOOTSTRAP",
    "AUTO_RULE_NAMES",
    "LR_RULES",
    "LR_RULE_CHOICES",
    "lr_rule_table",
    "lr_rule_entry",
    "LR_FAMILIES",
    "check_int",
    "check_number",
    "check_choice",
    "check_fraction",
    "check_bool",
    "check_keys",
    "first_line",
]

ESTIMATORS = ("batch", "per_example")
AGGREGATIONS = ("mean", "max", "l2")
SCALE_MODES = ("preserve", "fixed_alpha")
LOSS_REDUCTIONS = ("mean", "sum")
BUDGET_UNITS = ("rank", "params")
# n_batches="auto" calibrates at least this many batches (a bootstrap of one unit says nothing).
MIN_AUTO_BATCHES = 2
DEFAULT_BOOTSTRAP = 200
# n_batches="auto" stops on a bootstrap of at least this many resamples. With fewer, agreement by chance decides:
# a resample of 2 batches is the point map itself with probability 1/2, so one resample says "stable" half the
# time whatever the data. At 20 the default stable_threshold (0.9) asks for 18 agreeing resamples of 20.
MIN_AUTO_BOOTSTRAP = 20
# The settings only n_batches="auto" reads: set away from their defaults without it, they would do nothing.
AUTO_ONLY_SETTINGS = ("max_batches", "auto_stable_share", "auto_rule")
# n_batches="auto"'s stop rules (the functions are fimlora.confidence.AUTO_RULES): "within_one" asks that most
# resamples keep most modules close to their rank (exact below rank 4, within one from 4 on), "exact" that most
# modules keep exactly their rank.
AUTO_RULE_NAMES = ("within_one", "exact")
# The learning-rate rules (fimlora.lr): "hessian" (constant / lambda_max of the LoRA Hessian) and "range" (constant *
# the LR of steepest descent in a short range test); "none" computes no recommendation.
LR_RULES = ("hessian", "range")
# Each rule has one fitted constant per model family (fimlora.lr.model_family): the Hessian's scale differs by a
# factor of about 50 between MiniLM's classifier loss and SmolLM2's next-token loss, so one constant cannot serve
# both (docs/lr_rule_judge_decoder.json). "encoder": every model that is not a causal LM.
LR_FAMILIES = ("encoder", "causal_lm")
LR_RULE_CHOICES = LR_RULES + ("none",)
# Calibration batches the learning-rate rule reads: one keeps its cost near a few calibration passes; the statistic
# varied by about 4% between MiniLM batches, far below the rule's resolution.
LR_BATCHES = 1
# The most Lanczos iterations ("hessian"; its tolerance usually stops it sooner) and the range test's steps.
LR_STEPS = {"hessian": 8, "range": 10}
# Each rule's fitted constant, where it was fitted and by which script; filling this file is all a fit needs to do.
LR_RULE_FILE = Path(__file__).with_name("lr_rule.json")
# The values vLLM accepts for --max-lora-rank (here, not in check.py, so FimConfig can validate against them).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), to quote inside our own."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


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


def check_fraction(name: str, value, below_one: bool = False, allow_none: bool = True) -> None:
    """A share: a number in (0, 1], a share of something that exists (a budget); with ``below_one`` in [0, 1),
    a share that may be none but never all (dropout, a held-out split, a schedule's phase). None passes when
    ``allow_none``."""
    if below_one:
        check_number(name, value, minimum=0, strict=False, allow_none=allow_none)
        if value is not None and value >= 1:
            raise ValueError(f"{name}: must be < 1, got {value!r}")
        return
    check_number(name, value, minimum=0, allow_none=allow_none)
    if value is not None and value > 1:
        raise ValueError(f"{name}: must be in (0, 1], got {value!r}")


def check_keys(where: str, block, known, what: str = "setting(s)") -> None:
    """``block`` is a mapping whose keys are all in ``known``; the error names ``where``, the unknown keys and the
    known ones (a typo like ``eva: {roh: 9}`` stops the sweep instead of running with a default)."""
    if not isinstance(block, Mapping):
        raise ValueError(f"{where}: must be a mapping of settings, got {block!r}")
    unknown = sorted(set(block) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown {what} {unknown}; known: {sorted(known)}")


def check_bool(name: str, value) -> None:
    """A real bool: YAML's ``"no"`` in quotes is a string, and a string is always truthy."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}: must be true or false, got {value!r}")


@functools.cache
def lr_rule_table() -> dict:
    """``lr_rule.json``, checked: ``{"rules": {rule: {family: {"constant": float > 0 or null, "fitted_on": str or
    null, "script": str or null[, "warning": str or null]}}}, "default_rule": rule}`` with one entry per rule of
    ``LR_RULES`` and per family of ``LR_FAMILIES``. A null constant means the rule is not fitted for that family yet:
    its statistic is still computed and reported, its learning rate is None. A ``warning`` is what judging the
    fitted constant on a task it was not fitted on found, when it failed there: every recommendation of that rule
    for that family comes with it."""
    where = str(LR_RULE_FILE)
    table = json.loads(LR_RULE_FILE.read_text(encoding="utf-8"))
    check_keys(where, table, ("rules", "default_rule"))
    check_keys(f"{where}: rules", table["rules"], LR_RULES, "rule(s)")
    for rule in LR_RULES:
        families = table["rules"].get(rule)
        if families is None:
            raise ValueError(f"{where}: rules: must have an entry for {rule!r}, got {sorted(table['rules'])}")
        check_keys(f"{where}: rules.{rule}", families, LR_FAMILIES, "model family(ies)")
        for family in LR_FAMILIES:
            entry = families.get(family)
            if entry is None:
                raise ValueError(f"{where}: rules.{rule}: must have an entry for model family {family!r}, got "
                                 f"{sorted(families)}")
            check_keys(f"{where}: rules.{rule}.{family}", entry, ("constant", "fitted_on", "script", "warning"))
            check_number(f"{where}: rules.{rule}.{family}.constant", entry.get("constant"), minimum=0,
                         allow_none=True)
            if not isinstance(entry.get("warning"), (str, type(None))):
                raise ValueError(f"{where}: rules.{rule}.{family}.warning: must be a string or null, got "
                                 f"{entry['warning']!r}")
    check_choice(f"{where}: default_rule", table["default_rule"], LR_RULE_CHOICES)
    return table


def lr_rule_entry(rule: str, family: str) -> dict:
    """``lr_rule.json``'s entry of ``rule`` for model ``family``: {"constant", "fitted_on", "script", "warning"}
    (``warning`` None when the file has none)."""
    check_choice("rule", rule, LR_RULES)
    check_choice("family", family, LR_FAMILIES)
    return {"warning": None, **lr_rule_table()["rules"][rule][family]}


def setting(default, help: str):
    """A :class:`FimConfig` field: its default and its help, the one text of what the setting means (the class's
    docs and the ``fimlora`` command's flags show it)."""
    return field(default=default, metadata={"help": help})


@dataclass
class FimConfig:
    """How to calibrate and allocate; validated on construction.

    Each setting's meaning is its field's ``help`` (:func:`setting_help`), which the ``fimlora`` command's flags
    show too; the "Attributes" section below is made from them.
    """

    n_batches: int | str = setting(8, (
        'calibration batches N (the paper\'s default 8), or ``"auto"``: calibrate batch by batch and stop '
        'once the rank map is settled by ``auto_rule`` (default: in at least ``stable_threshold`` of the '
        'bootstrap resamples, at least ``auto_stable_share`` of the modules are close to their rank in '
        'the map), after at least 2 and at most ``max_batches`` batches. Needs ``aggregation="mean"``.'))
    max_batches: int = setting(32, (
        'the cap of ``n_batches="auto"`` (default 32). It, ``auto_stable_share`` and ``auto_rule`` are '
        'read by ``"auto"`` only: with a number of batches, setting them away from their defaults is an '
        'error, not a setting that silently does nothing.'))
    bootstrap: int | None = setting(None, (
        'resamples of the calibration units (batches, or examples for ``per_example``) behind the rank '
        "map's confidence (:mod:`fimlora.confidence`); ``None`` = 200 where supported (``mean`` "
        'aggregation; ``max``/``l2`` are not means over units and get none), 0 = off. '
        '``n_batches="auto"`` stops on this bootstrap, so it needs ``None`` or at least '
        '``MIN_AUTO_BOOTSTRAP`` (20).'))
    stable_threshold: float = setting(0.9, (
        "a module's rank is stable when the bootstrap gives it in at least this share of resamples "
        "(default 0.9)."))
    auto_stable_share: float = setting(0.9, (
        '``n_batches="auto"`` stops when ``auto_rule`` finds at least this share of the modules settled '
        '(0.9).'))
    auto_rule: str = setting("within_one", (
        'when ``n_batches="auto"`` stops. ``"within_one"`` (default): in at least ``stable_threshold`` '
        'of the resamples, at least ``auto_stable_share`` of the modules are close to their rank p in '
        'the map: |R - p| <= 1 where p >= 4, R = p where p < 4, so no module is dropped or added '
        '(:func:`fimlora.confidence.within_one_share`). ``"exact"``: at least ``auto_stable_share`` of '
        'the modules get exactly their rank in at least ``stable_threshold`` of the resamples (the '
        'earlier rule; at r = 8 it ran to the cap in every benchmark setup, docs/benchmarks.md section '
        '7).'))
    r_min: int = setting(1, (
        "smallest rank any module may get (>= 0). With 0, a module allocated rank 0 loses its adapter "
        "(its LoRA layer becomes the base layer again; see :mod:`fimlora.resize`)."))
    r_max: int | None = setting(None, (
        "largest rank; ``None`` means 2 * the config's base rank r."))
    budget: int | None = setting(None, (
        'total rank over all modules (``budget_unit="rank"``) or total LoRA parameters (``"params"``); '
        "``None`` means the current adapter's size in that unit: the sum of current ranks (L * r for "
        'uniform LoRA) or sum_m r_m * (d_in + d_out).'))
    budget_unit: str = setting("rank", (
        '``"rank"`` (every unit of rank costs the same) or ``"params"`` (a unit of rank in module m '
        'costs d_in + d_out parameters; the ranks spend at most ``budget``).'))
    budget_fraction: float | None = setting(None, (
        "the budget as a fraction in (0, 1] of the default budget (the current adapter's size in "
        "``budget_unit``), rounded down; exclusive with ``budget``."))
    max_lora_rank: int | None = setting(None, (
        "serve with vLLM at this ``--max-lora-rank`` (one of ``VLLM_MAX_LORA_RANKS``): r_max defaults to "
        "it, and an explicit r_max may not exceed it; a LoRA config r above K is written as r = K with "
        "lora_alpha scaled to keep lora_alpha / r (:func:`fimlora.allocation.serving_base`)."))
    estimator: str = setting("batch", (
        '``"batch"`` squares each mini-batch gradient (the paper\'s); ``"per_example"`` averages squared '
        'per-example gradients (eq. 1).'))
    aggregation: str = setting("mean", (
        'module score from its Fisher matrix: ``"mean"``, ``"max"`` or ``"l2"``.'))
    scale: str = setting("preserve", (
        '``"preserve"`` keeps alpha_m / r_m (or / sqrt(r_m) with rsLoRA) equal to the module\'s old '
        'value; ``"fixed_alpha"`` keeps alpha_m and lets the scale move.'))
    loss_reduction: str = setting("mean", (
        'how the loss combines examples, ``"mean"`` (HF models) or ``"sum"``; the per-example estimator '
        'needs it to undo the 1/batch factor.'))
    train_mode: bool = setting(False, (
        "keep dropout on during calibration (default off: deterministic scores)."))
    loss_scale: float | None = setting(None, (
        "multiply the loss by this before backward and divide gradients after; ``None`` = 1 for "
        "fp32/bf16 and 1024 for fp16 models (avoids gradient underflow)."))
    seed: int = setting(0, (
        "seeds the initialisation of new A rows, so every process gets identical rows, and the bootstrap "
        "(>= 0)."))
    lr_rule: str = setting(lr_rule_table()["default_rule"], (
        'how the recommended AdamW learning rate for the resized adapter is estimated (:mod:`fimlora.lr`): '
        '``"hessian"``: constant / lambda_max, the largest eigenvalue of the Hessian of the mean calibration '
        'loss in the LoRA A and B weights (Lanczos iteration on Hessian-vector products); ``"range"``: constant * '
        'the learning rate of steepest loss descent in a short AdamW range test, the adapter restored exactly '
        'after; ``"none"``: no recommendation. Default: ``lr_rule.json``\'s ``default_rule``. A rule whose '
        'constant is not fitted yet reports its statistic and no learning rate.'))
    lr_batches: int = setting(LR_BATCHES, (
        f"the first calibration batches the learning-rate rule reads (default {LR_BATCHES}; >= 1)."))
    lr_steps: int | None = setting(None, (
        f'the most Lanczos iterations (``"hessian"``, default {LR_STEPS["hessian"]}) or the range test\'s steps '
        f'(``"range"``, default {LR_STEPS["range"]}); ``None`` = the rule\'s default.'))
    adapter_name: str = setting("default", (
        "the PEFT adapter to calibrate and resize."))
    progress: bool = setting(True, (
        "show a progress bar."))

    def __post_init__(self) -> None:
        if isinstance(self.n_batches, int) and not isinstance(self.n_batches, bool):
            check_int("n_batches", self.n_batches, minimum=1)
        elif self.n_batches != "auto":
            raise ValueError(f"n_batches: must be a positive integer or 'auto', got {self.n_batches!r}")
        check_int("max_batches", self.max_batches, minimum=MIN_AUTO_BATCHES)
        check_int("bootstrap", self.bootstrap, minimum=0, allow_none=True)
        if self.n_batches == "auto" and self.bootstrap is not None and self.bootstrap < MIN_AUTO_BOOTSTRAP:
            raise ValueError(f"bootstrap: n_batches='auto' stops on a bootstrap of the batches so far, which needs "
                             f"at least {MIN_AUTO_BOOTSTRAP} resamples (None = {DEFAULT_BOOTSTRAP}), "
                             f"got {self.bootstrap}")
        check_fraction("stable_threshold", self.stable_threshold)
        check_fraction("auto_stable_share", self.auto_stable_share)
        check_choice("auto_rule", self.auto_rule, AUTO_RULE_NAMES)
        self._check_auto_only()
        check_int("r_min", self.r_min, minimum=0)
        check_int("r_max", self.r_max, minimum=1, allow_none=True)
        if self.r_max is not None and self.r_max < self.r_min:
            raise ValueError(f"r_max: must be >= r_min, got r_max={self.r_max} < r_min={self.r_min}")
        check_int("budget", self.budget, minimum=1, allow_none=True)
        check_choice("budget_unit", self.budget_unit, BUDGET_UNITS)
        check_fraction("budget_fraction", self.budget_fraction)
        if self.budget is not None and self.budget_fraction is not None:
            raise ValueError(f"budget, budget_fraction: give at most one, got budget={self.budget} and "
                             f"budget_fraction={self.budget_fraction}")
        check_int("max_lora_rank", self.max_lora_rank, minimum=1, allow_none=True)
        if self.max_lora_rank is not None:
            check_choice("max_lora_rank", self.max_lora_rank, VLLM_MAX_LORA_RANKS)
        if self.max_lora_rank is not None and self.r_max is not None and self.r_max > self.max_lora_rank:
            raise ValueError(f"r_max: must be <= max_lora_rank, or vLLM cannot serve the adapter; got "
                             f"r_max={self.r_max} > max_lora_rank={self.max_lora_rank}")
        if self.max_lora_rank is not None and self.r_min > self.max_lora_rank:
            raise ValueError(f"r_min: must be <= max_lora_rank, got r_min={self.r_min} > "
                             f"max_lora_rank={self.max_lora_rank}")
        check_choice("estimator", self.estimator, ESTIMATORS)
        check_choice("aggregation", self.aggregation, AGGREGATIONS)
        if self.aggregation != "mean" and (self.n_batches == "auto" or self.bootstrap):
            what = "n_batches='auto'" if self.n_batches == "auto" else f"bootstrap={self.bootstrap}"
            raise ValueError(f"aggregation: {what} needs aggregation='mean' (the bootstrap resamples per-unit means; "
                             f"a max or norm of the mean Fisher is not a mean over units), got {self.aggregation!r}")
        check_choice("scale", self.scale, SCALE_MODES)
        check_choice("loss_reduction", self.loss_reduction, LOSS_REDUCTIONS)
        check_number("loss_scale", self.loss_scale, minimum=0, allow_none=True)
        # Non-negative: numpy's bootstrap generator refuses a negative seed, and it runs after the whole calibration.
        check_int("seed", self.seed, minimum=0)
        if not isinstance(self.adapter_name, str) or not self.adapter_name:
            raise ValueError(f"adapter_name: must be a non-empty string, got {self.adapter_name!r}")
        check_bool("train_mode", self.train_mode)
        check_choice("lr_rule", self.lr_rule, LR_RULE_CHOICES)
        check_int("lr_batches", self.lr_batches, minimum=1)
        check_int("lr_steps", self.lr_steps, minimum=2, allow_none=True)
        check_bool("progress", self.progress)

    def _check_auto_only(self) -> None:
        if self.n_batches == "auto":
            return
        defaults = {f.name: f.default for f in fields(self)}
        changed = {name: getattr(self, name) for name in AUTO_ONLY_SETTINGS if getattr(self, name) != defaults[name]}
        if changed:
            given = ", ".join(f"{name}={value!r}" for name, value in changed.items())
            it = "it" if len(changed) == 1 else "them"
            raise ValueError(f"{', '.join(changed)}: only n_batches='auto' uses {it}, got {given} with "
                             f"n_batches={self.n_batches!r}; set n_batches='auto' or leave {it} at the default")

    @property
    def resamples(self) -> int:
        """Bootstrap resamples to run: ``bootstrap``, or 200 by default where the aggregation supports it."""
        if self.bootstrap is not None:
            return self.bootstrap
        return DEFAULT_BOOTSTRAP if self.aggregation == "mean" else 0

    def to_dict(self) -> dict:
        return asdict(self)


# Every FimConfig setting's default, by name (one table for the CLI, the harness's fim: blocks and the docs).
FIM_DEFAULTS = {f.name: f.default for f in fields(FimConfig)}


def setting_help(name: str, plain: bool = False) -> str:
    """The help of FimConfig setting ``name``; ``plain`` drops the reST markup (``x``, :func:`y`) for a terminal."""
    text = next(f for f in fields(FimConfig) if f.name == name).metadata["help"]
    return re.sub(r":\w+:`~?([^`]+)`", r"\1", text).replace("``", "") if plain else text


FimConfig.__doc__ += "\n    Attributes:\n" + "".join(
    textwrap.fill(f"{f.name}: {setting_help(f.name)}", width=115, initial_indent=" " * 8,
                  subsequent_indent=" " * 12) + "\n" for f in fields(FimConfig))
