"""Running a config's grid: every run writes one JSON result; sweeps resume and share folders safely.

Guarantees (stated in docs/experiments.md):

* **Atomic results.** A result JSON is written to a temporary file and renamed; a killed sweep never
  leaves half a result. A run's scratch space is ``RESULTS/.work/RUN_ID`` and is removed afterwards.
* **Resume compares settings.** A run counts as finished only if its result has status ok/diverged
  *and* was produced with the same resolved settings and data (:func:`~fimlora.bench.config.run_settings_hash`
  of the current config, with the current contents of the data files the run reads, equals the one the
  result recorded). A result made with other settings or data is moved to ``RESULTS/.stale/`` (never
  deleted) and the run is run again.
* **Concurrent workers.** Each run is claimed with a lock file (``RESULTS/.locks/RUN_ID.lock``, the
  ``filelock`` package) that the operating system releases when its holder dies, so any number of
  ``fimlora run`` processes (a Slurm array with or without ``--shard``) can share one results folder:
  a run held by another worker is skipped, a finished one is never redone.
* Everything a sweep writes stays under the results folder: run ids come from safe task ids.
* **Reuse.** With ``reuse=[DIR, ...]`` (``fimlora run --reuse DIR``) a run whose finished result in DIR
  was made with the same resolved settings (equal settings hash: the experiment's name is not part of
  it) is copied instead of run again, recording ``reused_from``; shared baselines are trained once.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import platform
import shutil
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..io import atomic_write_text, share_by_umask
from .config import ExperimentConfig, RunSpec, current_settings_hash, expand_runs, run_data_contents, run_settings_hash
from .lr_protocol import choose_learning_rate
from .results import RunResult, read_result

__all__ = [
    "SweepPlan",
    "RunStatus",
    "plan_sweep",
    "run_status",
    "run_one",
    "prepare_run",
    "PreparedRun",
    "run_sweep",
    "chosen_runs",
    "served_parameters",
    "machine_info",
    "causal_lm_dtype",
    "load_eval_tasks",
    "load_mixture_eval_tasks",
]

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class RunStatus:
    """``done``: a result for these settings exists; ``stale``: a result exists for other settings;
    ``failed``: the last attempt failed (``RUN_ID.error.json``; the next sweep tries again)."""

    done: bool
    stale: bool = False
    failed: bool = False


def run_status(cfg: ExperimentConfig, run: RunSpec, results: Path) -> RunStatus:
    """Whether ``run`` has a finished result made with the settings ``cfg`` gives it now."""
    failed = (results / f"{run.run_id}.error.json").exists()
    try:
        # Results written before hashes were recorded get theirs from the config they recorded (results.upgrade).
        record = read_result(results / f"{run.run_id}.json")
    except (OSError, ValueError, TypeError):
        return RunStatus(False, failed=failed)
    if not record.finished:
        return RunStatus(False, failed=failed)
    if record.settings_hash != current_settings_hash(cfg, run):
        return RunStatus(False, stale=True)
    return RunStatus(True)


@dataclass
class SweepPlan:
    """The runs one process is responsible for, which are finished, and which have stale results."""

    runs: list[RunSpec]
    finished: set[str]
    stale: set[str]
    failed: set[str] = field(default_factory=set)
    # lr_grid configs: cells whose learning rate is not chosen yet (their other seeds' runs wait for it).
    undecided: int = 0

    @property
    def todo(self) -> list[RunSpec]:
        return [r for r in self.runs if r.run_id not in self.finished]


def plan_sweep(cfg: ExperimentConfig, results_dir: str | os.PathLike, shard: tuple[int, int] | None = None,
               only: str | None = None) -> SweepPlan:
    """The grid cut to ``shard`` (every n-th run of the sorted grid from i) and to run ids containing
    ``only``, with the status of each run's result. Used by ``run_sweep`` and ``fimlora run --list``."""
    results = Path(results_dir)
    runs = expand_runs(cfg)
    if shard is not None:
        i, n = shard
        runs = runs[i::n]
    repeats, undecided = chosen_runs(cfg, results)
    if shard is not None:  # by run id, not position: the repeats known grow as choices are made
        runs += [r for r in repeats if _shard_of(r.run_id, shard[1]) == shard[0]]
    else:
        runs += repeats
    if only:
        runs = [r for r in runs if only in r.run_id]
    status = {r.run_id: run_status(cfg, r, results) for r in runs}
    return SweepPlan(runs, {k for k, s in status.items() if s.done}, {k for k, s in status.items() if s.stale},
                     {k for k, s in status.items() if s.failed}, undecided)


def _shard_of(run_id: str, n: int) -> int:
    import hashlib

    return int(hashlib.sha256(run_id.encode()).hexdigest(), 16) % n


def chosen_runs(cfg: ExperimentConfig, results: Path) -> tuple[list[RunSpec], int]:
    """(the runs of the other seeds at each decided cell's chosen learning rate, how many cells are undecided).

    A cell is decided once the first seed has a current result (same settings) at every ``lr_grid`` value
    (:func:`~fimlora.bench.lr_protocol.choose_learning_rate`); configs without a grid have no such runs.
    """
    if not cfg.lr_grid:
        return [], 0
    cells: dict[tuple, list[RunSpec]] = {}
    for run in expand_runs(cfg):
        cells.setdefault(run.cell, []).append(run)
    repeats, undecided = [], 0
    for (task, method, r, variant), grid_runs in sorted(cells.items(), key=lambda kv: str(kv[0])):
        records = [read_result(results / f"{run.run_id}.json") for run in grid_runs
                   if run_status(cfg, run, results).done]
        choice = choose_learning_rate(records, list(cfg.lr_grid), cfg.seeds[0])
        if choice is None:
            undecided += 1
            continue
        repeats += [RunSpec(task, method, r, seed, variant, choice.learning_rate) for seed in cfg.seeds[1:]]
    return sorted(repeats, key=lambda s: s.run_id), undecided


def _lr_choice(cfg: ExperimentConfig, run: RunSpec, results: Path) -> dict | None:
    """The recorded choice behind a repeat run (one of the other seeds), None for a choosing run."""
    if not cfg.lr_grid or run.seed == cfg.seeds[0]:
        return None
    grid_runs = [RunSpec(run.task, run.method, run.r, cfg.seeds[0], run.fim_variant, lr) for lr in cfg.lr_grid]
    records = [read_result(results / f"{g.run_id}.json") for g in grid_runs if run_status(cfg, g, results).done]
    choice = choose_learning_rate(records, list(cfg.lr_grid), cfg.seeds[0])
    return None if choice is None else choice.to_dict()


# ----------------------------------------------------------------------------- one run


def machine_info() -> dict:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def causal_lm_dtype(precision: str):
    """The dtype a decoder is loaded in for a run's ``train.precision`` (bf16 loads bf16; else fp32 weights)."""
    import torch

    return torch.bfloat16 if precision == "bf16" else torch.float32


def load_mixture_eval_tasks(cfg: ExperimentConfig) -> list:
    """A mixture config's eval tasks: every run of the config (and any reference) scores these questions."""
    from ..app.tasks import load_task

    if not cfg.mixture:
        raise ValueError(f"mixture: config {cfg.name!r} has no mixture (it lists tasks {cfg.tasks})")
    d = cfg.data
    return [load_task(name, seed=d.get("data_seed", 0), max_test=d.get("max_test")) for name in cfg.mixture["eval"]]


def load_eval_tasks(cfg: ExperimentConfig) -> list:
    """Every test set a config's runs are scored on: a mixture's eval tasks, or each of its tasks (the runs' own
    questions, split by ``data.data_seed``); the un-tuned reference (``scripts/zero_shot_eval.py``) scores these."""
    if cfg.mixture:
        return load_mixture_eval_tasks(cfg)
    return [_load_single_task(cfg, label) for label in cfg.task_labels]


def _load_single_task(cfg: ExperimentConfig, label: str):
    from ..app.tasks import load_task

    d = cfg.data
    entry = cfg.task_entry(label)
    kwargs = {"seed": d.get("data_seed", 0), "max_train": d.get("max_train"), "max_test": d.get("max_test"),
              "test_fraction": d.get("test_fraction"), "max_validation": d.get("max_validation")}
    if isinstance(entry, dict):
        return load_task(entry["train"], test_data=entry.get("test"), task_type=entry.get("task_type"), **kwargs)
    return load_task(entry, **kwargs)


def _load_tasks(cfg: ExperimentConfig, run: RunSpec):
    """(train TaskData, [eval TaskData]); the split seed is fixed by data.data_seed, not the run seed."""
    import random

    from ..app.tasks import TaskData, load_task

    if cfg.tasks:
        task = _load_single_task(cfg, run.task)
        return task, [task]
    d = cfg.data
    seed = d.get("data_seed", 0)
    train_rows, fallbacks = [], []
    for name in cfg.mixture["train"]:
        t = load_task(name, seed=seed, max_train=d.get("max_train_per_task"), max_test=d.get("max_test"))
        train_rows.extend(t.train)
        if "fallback" in t.meta:  # trained on other data than the config names: the results must say so
            fallbacks.append(t.meta["fallback"])
    evals = load_mixture_eval_tasks(cfg)
    random.Random(seed).shuffle(train_rows)
    mix = TaskData(run.task, evals[0].kind, train_rows, [], None,
                   {"mixture": cfg.mixture, "n_train": len(train_rows), "seed": seed,
                    **({"fallback": fallbacks} if fallbacks else {})})
    return mix, evals


def _total_steps(n_train: int, settings) -> int:
    import math

    if settings.max_steps and settings.max_steps > 0:
        return settings.max_steps
    per_epoch = math.ceil(n_train / settings.batch_size)
    return int(math.ceil(per_epoch / settings.grad_accum * settings.epochs))


def _method_spec(cfg: ExperimentConfig, run: RunSpec, kind: str, n_train: int, settings):
    from ..app.builders import task_type_for
    from .methods import MethodSpec
    from .registry import settings_block

    return MethodSpec(method=run.method, r=run.r, lora_alpha=cfg.lora_alpha_ratio * run.r,
                      target_modules=cfg.target_modules, task_type=task_type_for(kind),
                      lora_dropout=cfg.lora_dropout, seed=run.seed, fim={**cfg.fim, **dict(run.fim_variant)},
                      eva_rho=float(settings_block("eva").value(cfg.eva, "rho")), adalora=dict(cfg.adalora),
                      pissa=dict(cfg.pissa), lora_ga=dict(cfg.lora_ga), gora=dict(cfg.gora),
                      total_steps=_total_steps(n_train, settings))


def _evaluate_saved(adapter_dir: Path, make_base, eval_tasks, tok, settings, evaluator: str = "fimlora") -> dict:
    """Reload the saved adapter with stock PEFT (no custom loader) onto a fresh base and score it
    (with lm-evaluation-harness for ``evaluator="lm_eval"``)."""
    from ..app.builders import reload_adapter
    from ..app.train import evaluate

    reloaded = reload_adapter(make_base(), adapter_dir)
    if evaluator == "lm_eval":
        return lm_eval_metrics(reloaded, tok, eval_tasks, settings.eval_batch_size, adapter_dir.parent / "lm_eval")
    return {t.name: evaluate(reloaded, t, tok, settings) for t in eval_tasks}


def lm_eval_metrics(model, tok, eval_tasks, batch_size: int, scratch: Path) -> dict:
    """lm-eval's own seven tasks where the hub is reachable, else local tasks over the bundled test questions;
    each task's ``evaluator`` says which was used, and why the local ones when they were."""
    from .lmeval import LM_EVAL_TASKS, lm_eval_scores, write_local_tasks

    offline = any(os.environ.get(v) == "1" for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    reason = "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set"
    if not offline:
        try:
            return lm_eval_scores(model, tok, {t.name: LM_EVAL_TASKS[t.name] for t in eval_tasks}, batch_size)
        except Exception as e:  # the hub's data sets unreachable, whatever the error class: score locally
            reason = f"lm-eval's own tasks could not be loaded ({type(e).__name__}: {str(e)[:200]})"
            logger.warning("lm_eval: %s; scoring local tasks over the bundled test questions", reason)
    scores = lm_eval_scores(model, tok, write_local_tasks(eval_tasks, scratch), batch_size, include_path=scratch)
    for metrics in scores.values():
        metrics["evaluator"] += f" (local task over the bundled test questions: {reason})"
    return scores


@dataclass
class PreparedRun:
    """One run up to the start of training: the method applied to a fresh base (``model``), what it decided
    (``info``), its callbacks, and what training and evaluation read (``tokenizer``, ``settings``, the tasks, a
    factory of fresh base models and of the calibration batches the method saw)."""

    model: object
    info: dict
    callbacks: list
    tokenizer: object
    settings: object
    train_task: object
    eval_tasks: list
    make_base: object
    calibration_batches: object


def prepare_run(cfg: ExperimentConfig, run: RunSpec) -> PreparedRun:
    """Build the base model and apply ``run``'s method to it, seeded as the run trains (:func:`run_one`'s first
    half; ``benchmarks/fit_lr_rule.py`` measures a cell's prepared adapter with it)."""
    from transformers import set_seed

    from ..app.builders import build_base_model, build_calibration_loader, build_tokenizer
    from ..app.train import TrainSettings
    from .methods import prepare_method

    lr = {} if run.lr is None else {"learning_rate": run.lr}
    settings = TrainSettings(**{**cfg.train, **lr, "seed": run.seed, "progress": False})
    train_task, eval_tasks = _load_tasks(cfg, run)
    tok = build_tokenizer(cfg.model)
    make_base = functools.partial(build_base_model, cfg.model, train_task, cfg.n_layers, run.seed,
                                  causal_lm_dtype(settings.precision))
    calibration_batches = functools.partial(build_calibration_loader, train_task, tok, settings.batch_size,
                                            settings.max_length, run.seed)
    set_seed(run.seed)
    spec = _method_spec(cfg, run, train_task.kind, len(train_task.train), settings)
    model, info, callbacks = prepare_method(spec, make_base(), calibration_batches)
    if cfg.lr_rule:
        # The learning rate a user of fimlora would be told for this adapter, measured as the library measures it.
        from ..lr import compute_lr_recommendation

        rec = compute_lr_recommendation(model, calibration_batches(), rule=cfg.lr_rule, seed=run.seed)
        if rec.learning_rate is None:
            raise ValueError(f"lr_rule: {cfg.lr_rule!r} has no fitted constant for {rec.family} models in "
                             "fimlora/lr_rule.json yet; fit it with benchmarks/fit_lr_rule.py")
        settings = dataclasses.replace(settings, learning_rate=rec.learning_rate)
        info = {**info, "lr_recommendation": rec.to_dict()}
    return PreparedRun(model, info, callbacks, tok, settings, train_task, eval_tasks, make_base, calibration_batches)


def run_one(cfg: ExperimentConfig, run: RunSpec, work_dir: str | os.PathLike) -> RunResult:
    """Prepare the method, fine-tune, reload the saved adapter with stock PEFT and evaluate it."""
    from ..app.train import finetune, trainable_parameters
    from ..io import package_versions
    from .methods import final_rank_map, mutates_base, save_adapter

    work = Path(work_dir)
    p = prepare_run(cfg, run)
    model = p.model
    rank_map_before = final_rank_map(model, run.method, p.info.get("allocated_ranks"))
    # PiSSA/LoRA-GA rewrote the base weights: the adapter as initialised is kept so that the trained one can be
    # saved as plain LoRA for the unchanged base the evaluation reloads it onto.
    initial = work / "initial_adapter" if mutates_base(model) else None
    if initial is not None:
        model.save_pretrained(initial)
    train_out = finetune(model, p.train_task, p.tokenizer, p.settings, str(work / "trainer"), callbacks=p.callbacks)
    n_trainable = trainable_parameters(model)
    ranks_after = final_rank_map(model, run.method, p.info.get("allocated_ranks"))
    save_adapter(model, work / "adapter", initial)
    p.model = model = None  # the trained model is not needed again: free it before the reloads
    diverged = train_out["diverged"]
    metrics = {} if diverged else _evaluate_saved(work / "adapter", p.make_base, p.eval_tasks, p.tokenizer,
                                                  p.settings, cfg.evaluator)
    validation = [t for t in (_validation_task(t) for t in p.eval_tasks) if t is not None]
    validation_metrics = None
    if validation:
        validation_metrics = {} if diverged else _evaluate_saved(work / "adapter", p.make_base, validation,
                                                                 p.tokenizer, p.settings, "fimlora")
    return RunResult(
        run_id=run.run_id, status="diverged" if diverged else "ok",
        experiment=cfg.name, task=run.task, method=run.method, r=run.r, seed=run.seed,
        fim_variant=dict(run.fim_variant), metrics=metrics,
        rank_map=ranks_after, rank_map_before_training=rank_map_before,
        trainable_params=n_trainable, calibration_seconds=p.info.get("calibration_seconds", 0.0),
        train_seconds=train_out["train_seconds"], train_loss=train_out["train_loss"],
        train_steps=train_out["steps"], divergence=train_out["divergence"],
        method_info={k: v for k, v in p.info.items() if k not in ("method", "allocated_ranks")},
        data_meta={t.name: t.meta for t in p.eval_tasks} | {"train": p.train_task.meta},
        versions=package_versions(), machine=machine_info(),
        learning_rate=p.settings.learning_rate, validation_metrics=validation_metrics,
        served_params=served_parameters(work / "adapter"),
        validation_loss_curve=train_out.get("validation_loss_curve"),
    )


def _validation_task(task):
    """``task`` with its validation split as the test set (None without one), scored like the test set."""
    if not task.validation:
        return None
    return dataclasses.replace(task, test=task.validation, extra_tests={}, validation=[])


def served_parameters(adapter_dir: Path) -> int:
    """Parameters in the saved adapter file: what is served (PiSSA and LoRA-GA, saved as plain LoRA for the
    unchanged base, have rank 2r there), the task head saved with it included."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(Path(adapter_dir) / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            n = 1
            for size in f.get_slice(key).get_shape():
                n *= size
            total += n
    return total


# ----------------------------------------------------------------------------- the sweep


def _set_aside_stale(results: Path, run: RunSpec) -> None:
    """Move a result made with other settings to .stale/ (kept for the record, never read by report)."""
    src = results / f"{run.run_id}.json"
    if not src.exists():
        return
    dest = results / ".stale" / f"{run.run_id}.{time.strftime('%Y%m%d-%H%M%S')}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dest)
    logger.warning("run %s: its result was made with other settings; moved to %s and running it again",
                   run.run_id, dest)


def _record_failure(results: Path, run: RunSpec, error: Exception) -> None:
    logger.error("run %s failed: %s", run.run_id, error)
    atomic_write_text(results / f"{run.run_id}.error.json", json.dumps(
        {"run_id": run.run_id, "status": "failed", "error": repr(error), "traceback": traceback.format_exc()},
        indent=2))


def _execute(cfg: ExperimentConfig, run: RunSpec, results: Path) -> str:
    """Run one claimed run and write its result; returns its status (ok, diverged or failed)."""
    work = results / ".work" / run.run_id
    shutil.rmtree(work, ignore_errors=True)
    start = time.perf_counter()
    try:
        # What the result stands for is fixed before the run reads its data: the settings and the data's
        # contents as they are now (a file rewritten later makes the result stale, never silently current).
        config = asdict(cfg)
        contents = run_data_contents(config, run)
        stands_for = {"config": config, "data_contents": contents,
                      "settings_hash": run_settings_hash(config, run, contents)}
        choice = _lr_choice(cfg, run, results)
        if choice is not None:
            stands_for["lr_choice"] = choice
        result = run_one(cfg, run, work)
    except Exception as e:  # record and go on: one bad run must not lose the rest of a sweep
        _record_failure(results, run, e)
        shutil.rmtree(work, ignore_errors=True)
        return "failed"
    result = RunResult.from_dict({**result, **stands_for, "wall_seconds": time.perf_counter() - start}, upgraded=True)
    if cfg.keep_adapters:
        dest = results / "adapters" / run.run_id
        shutil.rmtree(dest, ignore_errors=True)
        shutil.move(str(work / "adapter"), dest)
        share_by_umask(dest)
    atomic_write_text(results / f"{run.run_id}.json", result.to_json())
    (results / f"{run.run_id}.error.json").unlink(missing_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    return result.status


def _reuse(cfg: ExperimentConfig, run: RunSpec, results: Path, reuse: list[Path]) -> bool:
    """Copy the first finished result of ``run`` with the same settings from a ``reuse`` folder; True if copied."""
    for folder in reuse:
        if not run_status(cfg, run, folder).done:
            continue
        src = folder / f"{run.run_id}.json"
        record = json.loads(src.read_text(encoding="utf-8"))
        record.update(experiment=cfg.name, reused_from=str(src.resolve()))
        atomic_write_text(results / f"{run.run_id}.json", json.dumps(record, indent=2, default=str) + "\n")
        logger.info("run %s: reused the result in %s (same settings)", run.run_id, src)
        return True
    return False


def run_sweep(cfg: ExperimentConfig, results_dir: str | os.PathLike, shard: tuple[int, int] | None = None,
              only: str | None = None, progress: bool = True, reuse: list[str | os.PathLike] = ()) -> dict:
    """Run every unfinished run of the grid (or of this shard); returns counts.

    ``busy`` counts runs another worker held when this one reached them; ``reused`` the runs copied from a
    ``reuse`` folder (same settings hash) instead of run.
    """
    results = Path(results_dir)
    results.mkdir(parents=True, exist_ok=True)
    plan = plan_sweep(cfg, results, shard, only)
    counts = {"total": len(plan.runs), "skipped": len(plan.finished), "ok": 0, "diverged": 0, "failed": 0,
              "busy": 0, "reused": 0}
    reuse = [Path(folder) for folder in reuse]
    for folder in reuse:
        if not folder.is_dir():
            raise ValueError(f"reuse: {folder} is not a results folder")
        if folder.resolve() == results.resolve():
            raise ValueError(f"reuse: {folder} is the results folder itself")
    (results / ".locks").mkdir(exist_ok=True)
    attempted: set[str] = set()
    todo = plan.todo
    while todo:
        _run_todo(cfg, results, todo, counts, reuse, progress, attempted)
        # An lr_grid config's choosing runs decide cells as they finish: their repeats are run in the same sweep.
        plan = plan_sweep(cfg, results, shard, only)
        todo = [r for r in plan.todo if r.run_id not in attempted]
        counts["total"] = max(counts["total"], len(plan.runs))
    if plan.undecided:
        logger.warning("%d cell(s) have no chosen learning rate yet (a choosing run failed, diverged at every grid "
                       "value or is held by another worker); run again to finish their other seeds", plan.undecided)
    counts["undecided"] = plan.undecided
    return counts


def _run_todo(cfg: ExperimentConfig, results: Path, todo: list[RunSpec], counts: dict, reuse: list[Path],
              progress: bool, attempted: set[str]) -> None:
    from filelock import FileLock, Timeout
    from tqdm.auto import tqdm

    bar = tqdm(todo, desc=f"{cfg.name}", unit="run", disable=not progress)
    for run in bar:
        attempted.add(run.run_id)
        bar.set_postfix_str(run.run_id)
        lock = FileLock(str(results / ".locks" / f"{run.run_id}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            counts["busy"] += 1
            continue
        try:
            status = run_status(cfg, run, results)  # another worker may have finished it meanwhile
            if status.done:
                counts["skipped"] += 1
                continue
            if status.stale:
                _set_aside_stale(results, run)
            if _reuse(cfg, run, results, reuse):
                counts["reused"] += 1
                continue
            counts[_execute(cfg, run, results)] += 1
        finally:
            lock.release()
