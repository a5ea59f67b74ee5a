"""Experiments as data: a YAML config expands to a grid of runs; every run writes one JSON result.

A sweep can be killed at any moment and resumed: results are written atomically
(temporary file + rename) and finished runs are skipped. ``shard=(i, n)`` runs
every n-th run of the sorted grid starting at i, for Slurm array jobs or any
scheduler. Single runs use the Hugging Face Trainer, so ``accelerate launch``
gives multi-GPU.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import platform
import shutil
import time
import traceback
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..io import atomic_write_text

__all__ = [
    "ExperimentConfig",
    "RunSpec",
    "SweepPlan",
    "load_config",
    "expand_runs",
    "plan_sweep",
    "is_finished",
    "run_one",
    "run_sweep",
    "parse_shard",
]

logger = logging.getLogger(__name__)


@dataclass
class ExperimentConfig:
    """One experiment. ``tasks``: one run per task (train and test on it). ``mixture``: train once on
    the union of ``mixture["train"]`` tasks and evaluate on each of ``mixture["eval"]``."""

    name: str
    model: str
    methods: list[str]
    seeds: list[int]
    ranks: list[int]
    tasks: list[str] = field(default_factory=list)
    mixture: dict = field(default_factory=dict)
    n_layers: int | None = None
    target_modules: list[str] | None = None
    lora_alpha_ratio: float = 2.0
    lora_dropout: float = 0.0
    fim: dict = field(default_factory=dict)
    fim_grid: dict = field(default_factory=dict)
    eva: dict = field(default_factory=lambda: {"rho": 2.0})
    adalora: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    keep_adapters: bool = False
    notes: str = ""

    def __post_init__(self) -> None:
        from ..config import FimConfig
        from .methods import METHODS
        from .train import TrainSettings

        if not self.tasks and not self.mixture:
            raise ValueError("tasks: give a list of tasks or a mixture {train: [...], eval: [...]}")
        if self.tasks and self.mixture:
            raise ValueError("mixture: give either tasks or mixture, not both")
        if self.mixture and not (self.mixture.get("train") and self.mixture.get("eval")):
            raise ValueError(f"mixture: needs non-empty 'train' and 'eval' task lists, got {self.mixture}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"methods: each must be one of {list(METHODS)}, got {self.methods}")
        for name in ("seeds", "ranks"):
            values = getattr(self, name)
            if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                raise ValueError(f"{name}: must be a non-empty list of integers, got {values!r}")
        if any(r < 1 for r in self.ranks):
            raise ValueError(f"ranks: must all be >= 1, got {self.ranks}")
        fim_fields = {f.name for f in fields(FimConfig)}
        for key in list(self.fim) + list(self.fim_grid):
            if key not in fim_fields:
                raise ValueError(f"fim: unknown setting {key!r}; known: {sorted(fim_fields)}")
        for key, values in self.fim_grid.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"fim_grid.{key}: must be a non-empty list, got {values!r}")
        TrainSettings(**self.train)  # validates names and values
        train_fields = {f.name for f in fields(TrainSettings)}
        unknown = set(self.train) - train_fields
        if unknown:
            raise ValueError(f"train: unknown setting(s) {sorted(unknown)}")
        unknown = set(self.data) - {"max_train", "max_test", "max_train_per_task", "data_seed", "test_fraction"}
        if unknown:
            raise ValueError(f"data: unknown setting(s) {sorted(unknown)}")

    @property
    def task_labels(self) -> list[str]:
        return list(self.tasks) if self.tasks else ["+".join(self.mixture["train"])]


def load_config(path: str | os.PathLike) -> ExperimentConfig:
    import yaml

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config: {path} does not exist")
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"config: {path} must hold a YAML mapping, got {type(raw).__name__}")
    known = {f.name for f in fields(ExperimentConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"config: {path}: unknown key(s) {unknown}; known: {sorted(known)}")
    raw.setdefault("name", path.stem)
    return ExperimentConfig(**raw)


@dataclass(frozen=True)
class RunSpec:
    task: str
    method: str
    r: int
    seed: int
    fim_variant: tuple = ()  # sorted (key, value) pairs from fim_grid

    @property
    def run_id(self) -> str:
        variant = "".join(f"__{k}{v}" for k, v in self.fim_variant)
        return f"{self.task}__{self.method}__r{self.r}__s{self.seed}{variant}"


def expand_runs(cfg: ExperimentConfig) -> list[RunSpec]:
    """The grid, sorted by run id (stable across machines, so shards are disjoint)."""
    variants = [()]
    if cfg.fim_grid:
        keys = sorted(cfg.fim_grid)
        variants = [tuple(zip(keys, combo)) for combo in itertools.product(*(cfg.fim_grid[k] for k in keys))]
    runs = []
    for task in cfg.task_labels:
        for method in cfg.methods:
            for r in cfg.ranks:
                for seed in cfg.seeds:
                    for v in (variants if method == "fim" else [()]):
                        runs.append(RunSpec(task, method, r, seed, v))
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


def machine_info() -> dict:
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    return info


def causal_lm_dtype(precision: str):
    """The dtype a decoder is loaded in for a run's ``train.precision`` (bf16 loads bf16; else fp32 weights)."""
    import torch

    return torch.bfloat16 if precision == "bf16" else torch.float32


def load_mixture_eval_tasks(cfg: ExperimentConfig) -> list:
    """A mixture config's eval tasks: every run of the config (and any reference) scores these questions."""
    from .data import load_task

    if not cfg.mixture:
        raise ValueError(f"mixture: config {cfg.name!r} has no mixture (it lists tasks {cfg.tasks})")
    d = cfg.data
    return [load_task(name, seed=d.get("data_seed", 0), max_test=d.get("max_test")) for name in cfg.mixture["eval"]]


def _load_tasks(cfg: ExperimentConfig, run: RunSpec):
    """(train TaskData, [eval TaskData]); the split seed is fixed by data.data_seed, not the run seed."""
    from .data import TaskData, load_task

    d = cfg.data
    seed = d.get("data_seed", 0)
    if cfg.tasks:
        t = load_task(run.task, seed=seed, max_train=d.get("max_train"), max_test=d.get("max_test"),
                      test_fraction=d.get("test_fraction"))
        return t, [t]
    train_rows = []
    for name in cfg.mixture["train"]:
        t = load_task(name, seed=seed, max_train=d.get("max_train_per_task"), max_test=d.get("max_test"))
        train_rows.extend(t.train)
    evals = load_mixture_eval_tasks(cfg)
    import random

    random.Random(seed).shuffle(train_rows)
    mix = TaskData(run.task, evals[0].kind, train_rows, [], None,
                   {"mixture": cfg.mixture, "n_train": len(train_rows), "seed": seed})
    return mix, evals


def _total_steps(n_train: int, settings) -> int:
    import math

    if settings.max_steps and settings.max_steps > 0:
        return settings.max_steps
    per_epoch = math.ceil(n_train / settings.batch_size)
    return int(math.ceil(per_epoch / settings.grad_accum * settings.epochs))


def run_one(cfg: ExperimentConfig, run: RunSpec, work_dir: str | os.PathLike) -> dict:
    """Prepare the method, fine-tune, reload the saved adapter with stock PEFT and evaluate it."""
    from peft import PeftModel
    from transformers import set_seed

    from ..io import package_versions
    from .builders import build_base_model, build_calibration_loader, build_tokenizer, task_type_for
    from .methods import MethodSpec, final_rank_map, prepare_method
    from .train import TrainSettings, evaluate, finetune, trainable_parameters

    work = Path(work_dir)
    settings = TrainSettings(**{**cfg.train, "seed": run.seed, "progress": False})
    train_task, eval_tasks = _load_tasks(cfg, run)
    tok = build_tokenizer(cfg.model)
    make_base = functools.partial(build_base_model, cfg.model, train_task, cfg.n_layers, run.seed,
                                  causal_lm_dtype(settings.precision))
    calibration_batches = functools.partial(build_calibration_loader, train_task, tok, settings.batch_size,
                                            settings.max_length, run.seed)

    set_seed(run.seed)
    spec = MethodSpec(method=run.method, r=run.r, lora_alpha=cfg.lora_alpha_ratio * run.r,
                      target_modules=cfg.target_modules, task_type=task_type_for(train_task.kind),
                      lora_dropout=cfg.lora_dropout, seed=run.seed, fim={**cfg.fim, **dict(run.fim_variant)},
                      eva_rho=float(cfg.eva.get("rho", 2.0)), adalora=dict(cfg.adalora),
                      total_steps=_total_steps(len(train_task.train), settings))
    model, info, callbacks = prepare_method(spec, make_base(), calibration_batches)
    rank_map_before = final_rank_map(model, run.method)
    train_out = finetune(model, train_task, tok, settings, str(work / "trainer"), callbacks=callbacks)
    n_trainable = trainable_parameters(model)
    ranks_after = final_rank_map(model, run.method)

    adapter_dir = work / "adapter"
    model.save_pretrained(adapter_dir)
    del model
    metrics = {}
    if not train_out["diverged"]:
        reloaded = PeftModel.from_pretrained(make_base(), adapter_dir).eval()  # stock PEFT, no custom loader
        for t in eval_tasks:
            metrics[t.name] = evaluate(reloaded, t, tok, settings)
    return {
        "run_id": run.run_id, "status": "diverged" if train_out["diverged"] else "ok",
        "experiment": cfg.name, "task": run.task, "method": run.method, "r": run.r, "seed": run.seed,
        "fim_variant": dict(run.fim_variant), "metrics": metrics,
        "rank_map": ranks_after, "rank_map_before_training": rank_map_before,
        "trainable_params": n_trainable, "calibration_seconds": info.get("calibration_seconds", 0.0),
        "train_seconds": train_out["train_seconds"], "train_loss": train_out["train_loss"],
        "train_steps": train_out["steps"], "divergence": train_out["divergence"],
        "method_info": {k: v for k, v in info.items() if k not in ("method",)},
        "data_meta": {t.name: t.meta for t in eval_tasks} | {"train": train_task.meta},
        "config": asdict(cfg), "versions": package_versions(), "machine": machine_info(),
    }


def is_finished(path: Path) -> bool:
    """A run is finished when its result JSON records status ok or diverged."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("status") in ("ok", "diverged")


@dataclass
class SweepPlan:
    """The runs one process is responsible for, and which of them are already finished."""

    runs: list[RunSpec]
    finished: set[str]

    @property
    def todo(self) -> list[RunSpec]:
        return [r for r in self.runs if r.run_id not in self.finished]


def plan_sweep(cfg: ExperimentConfig, results_dir: str | os.PathLike, shard: tuple[int, int] | None = None,
               only: str | None = None) -> SweepPlan:
    """The grid, cut to ``shard`` (every n-th run from i) and to run ids containing ``only``, with finished runs."""
    results = Path(results_dir)
    runs = expand_runs(cfg)
    if shard is not None:
        i, n = shard
        runs = runs[i::n]
    if only:
        runs = [r for r in runs if only in r.run_id]
    finished = {r.run_id for r in runs if is_finished(results / f"{r.run_id}.json")}
    return SweepPlan(runs, finished)


def run_sweep(cfg: ExperimentConfig, results_dir: str | os.PathLike, shard: tuple[int, int] | None = None,
              only: str | None = None, progress: bool = True) -> dict:
    """Run every unfinished run of the grid (or of this shard); returns counts."""
    from tqdm.auto import tqdm

    results = Path(results_dir)
    results.mkdir(parents=True, exist_ok=True)
    plan = plan_sweep(cfg, results, shard, only)
    todo = plan.todo
    counts = {"total": len(plan.runs), "skipped": len(plan.finished), "ok": 0, "diverged": 0, "failed": 0}
    bar = tqdm(todo, desc=f"{cfg.name}", unit="run", disable=not progress)
    for run in bar:
        bar.set_postfix_str(run.run_id)
        work = results / ".work" / run.run_id
        shutil.rmtree(work, ignore_errors=True)
        start = time.perf_counter()
        try:
            result = run_one(cfg, run, work)
        except Exception as e:  # record and go on: one bad run must not lose the rest of a sweep
            logger.error("run %s failed: %s", run.run_id, e)
            atomic_write_text(results / f"{run.run_id}.error.json", json.dumps(
                {"run_id": run.run_id, "status": "failed", "error": repr(e), "traceback": traceback.format_exc()},
                indent=2))
            counts["failed"] += 1
            continue
        result["wall_seconds"] = time.perf_counter() - start
        if cfg.keep_adapters:
            dest = results / "adapters" / run.run_id
            shutil.rmtree(dest, ignore_errors=True)
            shutil.move(str(work / "adapter"), dest)
        atomic_write_text(results / f"{run.run_id}.json", json.dumps(result, indent=2, default=str) + "\n")
        (results / f"{run.run_id}.error.json").unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
        counts[result["status"]] += 1
    return counts
