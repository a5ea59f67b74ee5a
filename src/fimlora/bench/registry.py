"""Every method of the harness, declared once: its name, report label and place, the settings blocks a run of it
depends on (each with its schema and defaults), the methods a composite combines, and its preparation.

Config validation (:mod:`.config`), the settings hash, the sweep and the report all read these records, so adding
a method is one :func:`register_method` call here (and a ``_prepare_*`` function when no existing one fits). This
module imports nothing heavy (no torch): a config is validated before any model code loads.

A settings block (``eva: {rho: 1.0}`` in a config) is a :class:`SettingsBlock`: each key's validator and the value
a run uses when the config leaves the key out. The config records a block exactly as written (plus the few values
a block declares as written in, see ``config_default`` and ``written_when_used``), because every result's settings
hash is taken over the recorded config: filling in defaults there would make every finished result stale.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..config import FimConfig, check_choice, check_fraction, check_int, check_keys, check_number

__all__ = ["Setting", "SettingsBlock", "MethodInfo", "register_block", "register_method", "method_names",
           "method_info", "settings_blocks", "settings_block", "check_keys", "check_block", "number", "integer",
           "choice", "fraction", "positive_numbers", "CALIBRATION_BATCHES", "EVA_RHO", "GORA_SIGNS",
           "GORA_SIGN_DEFAULT", "GORA_SIGN_BEFORE", "GORA_MIN_RANK_RATIO", "GORA_MAX_RANK_RATIO", "GORA_LR"]

Validator = Callable[[str, object], None]


# ----------------------------------------------------------------------------- validators


def number(minimum: float | None = None, strict: bool = True) -> Validator:
    """A finite number, above (``strict``) or at least ``minimum``."""
    return lambda name, value: check_number(name, value, minimum=minimum, strict=strict)


def integer(minimum: int | None = None, allow_none: bool = False) -> Validator:
    return lambda name, value: check_int(name, value, minimum=minimum, allow_none=allow_none)


def choice(choices: tuple) -> Validator:
    return lambda name, value: check_choice(name, value, choices)


def positive_numbers(name: str, value) -> None:
    """A non-empty list of finite numbers > 0."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{name}: must be a non-empty list of numbers > 0, got {value!r}")
    for i, v in enumerate(value):
        check_number(f"{name}[{i}]", v, minimum=0)


def fraction(name: str, value) -> None:
    """A share in [0, 1) (:func:`fimlora.config.check_fraction` with ``below_one``)."""
    check_fraction(name, value, below_one=True, allow_none=False)


def check_block(block_name: str, block, schema: Mapping[str, Validator | Setting]) -> None:
    """A settings mapping: known keys only, each value checked by its validator (errors name ``block.key``)."""
    check_keys(block_name, block, schema)
    for key, value in block.items():
        rule = schema[key]
        (rule.check if isinstance(rule, Setting) else rule)(f"{block_name}.{key}", value)


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Setting:
    """One key of a settings block: its validator and the value a run uses when the block leaves it out (None:
    the implementation's own default, e.g. PEFT's)."""

    check: Validator
    default: object = None


@dataclass(frozen=True)
class SettingsBlock:
    """A config's settings block for one method family.

    ``check``: a rule across keys, after each key passed its own. ``config_default``: the block a config that
    leaves it out records. ``written_when_used``: keys whose default is written into the config when one of the
    config's methods reads the block (a result without the key was made before it existed, see ``before``).
    ``before``: {key: the value results recorded before the key existed were made with}; at that value the key
    stays out of the settings hash, so those results keep theirs."""

    name: str
    settings: Mapping[str, Setting]
    check: Callable[[Mapping], None] | None = None
    config_default: Mapping = field(default_factory=dict)
    written_when_used: tuple[str, ...] = ()
    before: Mapping = field(default_factory=dict)

    def validate(self, block) -> None:
        check_block(self.name, block, self.settings)
        if self.check is not None:
            self.check(block)

    def value(self, block: Mapping, key: str):
        """``block[key]``, or the setting's default when the block leaves it out."""
        return block.get(key, self.settings[key].default)

    def hashed(self, block: Mapping) -> dict:
        """The block as it enters the settings hash: keys at their ``before`` value left out."""
        return {k: v for k, v in block.items() if k not in self.before or v != self.before[k]}


@dataclass(frozen=True)
class MethodInfo:
    """One method. ``label``: its name in the report; reports list methods in registration order.
    ``prepare``: "module:function" under :mod:`fimlora.bench` (imported only when a run prepares), a
    function (spec, base model, calibration batches factory) -> (peft model, info, trainer callbacks).
    ``blocks``: the config's settings blocks a run's result depends on ("fim" is FimConfig's; the others are
    registered :class:`SettingsBlock`); they enter its settings hash. ``parents``: for a composite (FIM ranks +
    another method's init or scale), the two methods it is judged against. ``baseline``: FIM-LoRA's verdicts judge
    it against this method, in ascending ``baseline`` order; None: not a baseline."""

    name: str
    label: str
    prepare: str
    blocks: tuple[str, ...] = ()
    parents: tuple[str, ...] = ()
    baseline: int | None = None

    def prepare_function(self) -> Callable:
        module, function = self.prepare.split(":")
        return getattr(importlib.import_module(f"fimlora.bench.{module}"), function)


_METHODS: dict[str, MethodInfo] = {}
_BLOCKS: dict[str, SettingsBlock] = {}


def register_block(block: SettingsBlock) -> SettingsBlock:
    if block.name in _BLOCKS:
        raise ValueError(f"block: {block.name!r} is registered already")
    _BLOCKS[block.name] = block
    return block


def register_method(info: MethodInfo) -> MethodInfo:
    """Add a method; its blocks must be registered (or "fim") and its parents registered before it."""
    if info.name in _METHODS:
        raise ValueError(f"method: {info.name!r} is registered already")
    unknown = [b for b in info.blocks if b != "fim" and b not in _BLOCKS]
    if unknown:
        raise ValueError(f"{info.name}.blocks: must be 'fim' or registered blocks {sorted(_BLOCKS)}, got {unknown}")
    missing = [p for p in info.parents if p not in _METHODS]
    if missing:
        raise ValueError(f"{info.name}.parents: must be registered methods, got {missing}")
    _METHODS[info.name] = info
    return info


def method_names() -> tuple[str, ...]:
    """Every method, in registration order (the report's order)."""
    return tuple(_METHODS)


def method_info(name: str) -> MethodInfo:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"method: must be one of {list(_METHODS)}, got {name!r}") from None


def settings_blocks() -> tuple[SettingsBlock, ...]:
    return tuple(_BLOCKS.values())


def settings_block(name: str) -> SettingsBlock:
    return _BLOCKS[name]


# ----------------------------------------------------------------------------- the blocks

# Calibration batches of every data-driven method: FimConfig's n_batches default, also LoRA-GA's and GoRA's.
CALIBRATION_BATCHES = FimConfig.n_batches

# PEFT's EVA default: components r * rho per layer.
EVA_RHO = 2.0
register_block(SettingsBlock("eva", {"rho": Setting(number(minimum=0), EVA_RHO)}, config_default={"rho": EVA_RHO}))

# AdaLoRA's schedule as fractions of the run's optimizer steps (:func:`~fimlora.bench.methods.adalora_schedule`)
# and PEFT's orthogonality weight.
register_block(SettingsBlock("adalora", {
    "init_r_ratio": Setting(number(minimum=1, strict=False), 1.5),
    "tinit_ratio": Setting(fraction, 0.1),
    "tfinal_ratio": Setting(fraction, 0.2),
    "deltaT": Setting(integer(minimum=1), 10),
    "orth_reg_weight": Setting(number(minimum=0, strict=False), 0.5),
}))

# PiSSA's randomized SVD iterations; None: the exact SVD (init "pissa").
register_block(SettingsBlock("pissa", {"niter": Setting(integer(minimum=1, allow_none=True))}))

# LoRA-GA: None leaves the setting to PEFT's LoraGAConfig (direction ArB2r, scale stable, stable_gamma 16).
register_block(SettingsBlock("lora_ga", {
    "direction": Setting(choice(("ArBr", "A2rBr", "ArB2r", "random"))),
    "scale": Setting(choice(("stable", "weight_svd", "gd_scale", "unit"))),
    "stable_gamma": Setting(number(minimum=0)),
    "n_batches": Setting(integer(minimum=1), CALIBRATION_BATCHES),
}))

# GoRA's published scripts: --gora-min-rank 4 --gora-max-rank 32 at --lora-rank 8; --gora-lr 5e-2.
GORA_MIN_RANK_RATIO = 0.5
GORA_MAX_RANK_RATIO = 4.0
GORA_LR = 0.05
# The direction of GoRA's initial step (bench/gora.py): the paper's gradient descent, the reference code's +G.
GORA_SIGNS = ("descent", "ascent")
GORA_SIGN_DEFAULT = "descent"
# GoRA's init direction before the setting existed (the reference code's +G): a recorded gora block without
# ``sign`` was made with it, and at that value the key stays out of the settings hash so those results keep theirs.
GORA_SIGN_BEFORE = "ascent"


def _check_gora_ratios(block: Mapping) -> None:
    """GoRA's rank bounds, as multiples of the run's r: min_rank_ratio <= 1 <= max_rank_ratio, so uniform rank r
    is always allowed and the budget L*r is reachable."""
    gora = settings_block("gora")
    lo, hi = gora.value(block, "min_rank_ratio"), gora.value(block, "max_rank_ratio")
    if lo > 1:
        raise ValueError(f"gora.min_rank_ratio: must be <= 1 (rank r must stay allowed), got {lo!r}")
    if hi < 1:
        raise ValueError(f"gora.max_rank_ratio: must be >= 1 (rank r must stay allowed), got {hi!r}")
    if "lr" in block and "lr_search" in block:
        raise ValueError(f"gora.lr, gora.lr_search: give at most one (a fixed init step, or the steps to choose it "
                         f"from), got lr={block['lr']!r} and lr_search={block['lr_search']!r}")


register_block(SettingsBlock("gora", {
    "min_rank_ratio": Setting(number(minimum=0), GORA_MIN_RANK_RATIO),
    "max_rank_ratio": Setting(number(minimum=0), GORA_MAX_RANK_RATIO),
    "lr": Setting(number(minimum=0), GORA_LR),
    # The init steps to choose eta from per run (bench/gora.py's choose_gora_lr); None: the fixed lr.
    "lr_search": Setting(positive_numbers),
    "n_batches": Setting(integer(minimum=1), CALIBRATION_BATCHES),
    "sign": Setting(choice(GORA_SIGNS), GORA_SIGN_DEFAULT),
}, check=_check_gora_ratios, written_when_used=("sign",), before={"sign": GORA_SIGN_BEFORE}))


# ----------------------------------------------------------------------------- the methods, in the report's order

register_method(MethodInfo("lora", "LoRA", "methods:_prepare_lora", baseline=0))
register_method(MethodInfo("rslora", "rsLoRA", "methods:_prepare_rslora", baseline=4))
register_method(MethodInfo("adalora", "AdaLoRA", "methods:_prepare_adalora", ("adalora",), baseline=3))
register_method(MethodInfo("eva", "EVA", "methods:_prepare_eva", ("eva",), baseline=2))
register_method(MethodInfo("pissa", "PiSSA", "methods:_prepare_pissa", ("pissa",), baseline=5))
register_method(MethodInfo("lora_ga", "LoRA-GA", "methods:_prepare_lora_ga", ("lora_ga",), baseline=6))
register_method(MethodInfo("gora", "GoRA", "methods:_prepare_gora", ("gora",), baseline=7))
# Random-rank reads FIM-LoRA's budget settings (methods.RANDOM_SETTINGS).
register_method(MethodInfo("random", "Random-rank", "methods:_prepare_random", ("fim",), baseline=1))
register_method(MethodInfo("fim", "FIM-LoRA", "methods:_prepare_fim", ("fim",)))
# EVA's directions at FIM-LoRA's ranks: rho is 1 there (the ranks are given), so the eva block is not read.
register_method(MethodInfo("fim_eva", "FIM ranks + EVA directions", "methods:_prepare_fim_eva", ("fim",),
                           parents=("fim", "eva")))
register_method(MethodInfo("fim_rslora", "FIM ranks + rsLoRA", "methods:_prepare_fim_rslora", ("fim",),
                           parents=("fim", "rslora")))
register_method(MethodInfo("fim_pissa", "FIM ranks + PiSSA init", "methods:_prepare_fim_pissa", ("fim", "pissa"),
                           parents=("fim", "pissa")))
register_method(MethodInfo("fim_lora_ga", "FIM ranks + LoRA-GA init", "methods:_prepare_fim_lora_ga",
                           ("fim", "lora_ga"), parents=("fim", "lora_ga")))
register_method(MethodInfo("fim_gora", "FIM ranks + GoRA init", "methods:_prepare_fim_gora", ("fim", "gora"),
                           parents=("fim", "gora")))
