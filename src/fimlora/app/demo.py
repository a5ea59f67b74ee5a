"""``fimlora demo``: FIM-LoRA against uniform LoRA on real MiniLM and SST-2, offline, in minutes."""

from __future__ import annotations

import copy
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ..io import atomic_directory, atomic_write_text, check_output_dir, output_path, package_versions
from .builders import build_base_model, build_calibration_loader, build_lora_config, build_peft_model, build_tokenizer
from .jobs import CalibrateJob, save_rank_map
from .tasks import is_user_file, load_task

__all__ = ["DemoJob", "DEMO_TARGET_MODULES", "run_demo"]

# All four attention projections are 384x384 in MiniLM: an equal rank budget is an equal parameter budget.
DEMO_TARGET_MODULES = ["query", "key", "value", "attention.output.dense"]


@dataclass
class DemoJob(CalibrateJob):
    """The demo's settings: a calibration job plus a short training schedule for both adapters."""

    model: str = "minilm"
    data: str = "sst2"
    out: str = "out/demo"
    r: int = 4
    max_length: int = 64
    max_train: int | None = 2000
    steps: int = 300
    lr: float = 2e-3
    max_test: int | None = None
    eval_data: str | None = None  # a user's own validation file; without it a user's file is split 80/20
    overwrite: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.task_type == "regression":  # the demo's table compares accuracy
            raise ValueError("task_type: the demo compares accuracy, so it takes classification, got 'regression'; "
                             "run a regression file with fimlora run and a task entry {train: FILE, task_type: "
                             "regression}, or calibrate it with fimlora calibrate --task-type regression")


def _row(label: str, values: list[str], width: int = 16) -> str:
    return f"{label:<26}" + "".join(f"{v:>{width}}" for v in values)


def _lora_parameters(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)


ADAPTER_FOLDERS = {"uniform LoRA": "adapter_uniform", "FIM-LoRA": "adapter_fim"}


def _train_and_score(model, task, tok, settings) -> dict:
    import torch

    from ..modules import lora_modules
    from .train import evaluate, finetune, trainable_parameters

    torch.manual_seed(settings.seed)
    with tempfile.TemporaryDirectory() as trainer_dir:  # the Trainer wants a folder; nothing of it is kept
        train = finetune(model, task, tok, settings, trainer_dir)
    metrics = evaluate(model, task, tok, settings)
    return {"accuracy": metrics["accuracy"], "trainable_params": trainable_parameters(model),
            "lora_params": _lora_parameters(model), "train_seconds": train["train_seconds"],
            "train_loss": train["train_loss"], "ranks": {i.name: i.r for i in lora_modules(model)}}


def _results_table(task, results: dict, calib_s: float) -> list[str]:
    u, f = results["uniform LoRA"], results["FIM-LoRA"]
    return [
        f"\n[5/5] results on {task.meta.get('test_source', task.name)} ({len(task.test)} examples)",
        _row("", ["uniform LoRA", "FIM-LoRA"]),
        _row("accuracy", [f"{u['accuracy']:.4f}", f"{f['accuracy']:.4f}"]),
        _row("trainable params (all)", [f"{u['trainable_params']:,}", f"{f['trainable_params']:,}"]),
        _row("LoRA params", [f"{u['lora_params']:,}", f"{f['lora_params']:,}"]),
        _row("calibration (s)", ["-", f"{calib_s:.1f}"]),
        _row("training (s)", [f"{u['train_seconds']:.1f}", f"{f['train_seconds']:.1f}"]),
        _row("final train loss", [f"{u['train_loss']:.4f}", f"{f['train_loss']:.4f}"]),
    ]


def run_demo(job: DemoJob, say: Callable[[str], None] = print) -> dict:
    """Calibrate, show the rank map, train uniform LoRA and FIM-LoRA alike, and compare them."""
    import torch

    from ..api import apply_fim_ranks
    from ..rankmap import format_rank_table
    from .train import TrainSettings

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    out = output_path(job.out)
    inputs = (job.data, job.eval_data, job.model)
    # The output rule of every command, up front: an earlier demo's output is replaced, anything else refused.
    check_output_dir(out, job.overwrite, inputs)
    if out.is_dir() and any(out.iterdir()):
        say(f"[0/5] {out} holds an earlier fimlora output; it is replaced when the demo ends")
    target_modules = job.target_modules or DEMO_TARGET_MODULES
    say(f"[1/5] data: {job.data}; model: {job.model}")
    task = load_task(job.data, seed=job.seed, max_train=job.max_train, max_test=job.max_test,
                     test_data=job.eval_data, task_type=job.task_type)
    say(f"      train {len(task.train)} / test {len(task.test)} examples, labels {task.label_names}")
    if is_user_file(job.data):  # a bundled task's drops are part of its recipe; a user's are news
        for note in task.meta.get("dropped", []):
            say(f"      note: {note}")
    tok = build_tokenizer(job.model)
    base = build_base_model(job.model, task, job.n_layers, seed=job.seed)
    uniform = build_peft_model(base, build_lora_config(task.kind, job.r, job.alpha, target_modules), job.seed)
    fim = copy.deepcopy(uniform)  # same base, same head init, same A init: only the ranks differ

    say(f"[2/5] calibrating FIM-LoRA: {job.fim.n_batches} backward passes")
    start = time.perf_counter()
    loader = build_calibration_loader(task, tok, job.batch_size, job.max_length, job.seed)
    alloc = apply_fim_ranks(fim, loader, config=job.fim_config())
    calib_s = time.perf_counter() - start
    alloc.settings.update({"model": job.model, "data": job.data, "calibration_seconds": calib_s})
    say(format_rank_table(alloc))

    settings = TrainSettings(learning_rate=job.lr, max_steps=job.steps, batch_size=job.batch_size,
                             max_length=job.max_length, seed=job.seed, progress=job.progress, logging_steps=25)
    results = {}
    for step, (name, model) in enumerate((("uniform LoRA", uniform), ("FIM-LoRA", fim)), start=3):
        say(f"[{step}/5] fine-tuning {name}: {job.steps} steps, batch {job.batch_size}, lr {job.lr}")
        results[name] = _train_and_score(model, task, tok, settings)
    results["FIM-LoRA"]["calibration_seconds"] = calib_s
    record = {"results": results, "data_meta": task.meta, "job": asdict(job), "versions": package_versions()}
    # Everything is written at the end, in one step, so a run that fails half-way leaves the folder as it was.
    with atomic_directory(out, overwrite=job.overwrite, inputs=inputs) as tmp:
        files, notes = save_rank_map(alloc, tmp)
        for name, model in (("uniform LoRA", uniform), ("FIM-LoRA", fim)):
            model.save_pretrained(tmp / ADAPTER_FOLDERS[name])
        atomic_write_text(tmp / "demo_results.json", json.dumps(record, indent=2, default=str) + "\n")
    say("      rank map -> " + ", ".join(str(out / f.name) for f in files)
        + "".join(f"\n      note: {n}" for n in notes))
    for line in _results_table(task, results, calib_s):
        say(line)
    say("\nOne seed on a short schedule: a difference here is within seed noise unless it is large; "
        "`fimlora run` experiments give mean ± std over seeds. Times are wall clock on this machine: "
        "anything else running moves them.")
    say(f"adapters -> {out / ADAPTER_FOLDERS['uniform LoRA']}, {out / ADAPTER_FOLDERS['FIM-LoRA']} (load with "
        "PeftModel.from_pretrained)")
    return record
