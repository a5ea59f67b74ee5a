"""Fine-tuning and evaluation with the Hugging Face Trainer (so multi-GPU is ``accelerate launch``)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import torch
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback

from ..config import check_bool, check_choice, check_int, check_number
from .collators import CausalLMCollator, collator_for
from .metrics import compute_metrics
from .scoring import score_choices
from .tasks import TaskData

__all__ = ["TrainSettings", "DivergenceCallback", "finetune", "evaluate", "predict", "trainable_parameters",
           "per_example_correct", "validation_loss_curve"]

logger = logging.getLogger(__name__)


PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")


@dataclass
class TrainSettings:
    learning_rate: float = 5e-4
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 16
    grad_accum: int = 1
    eval_batch_size: int = 64
    max_length: int = 128
    warmup_ratio: float = 0.06
    scheduler: str = "linear"
    weight_decay: float = 0.0
    precision: str = "fp32"  # fp32 | bf16 | fp16
    seed: int = 0
    logging_steps: int = 10
    # Validation loss every this many steps (and before the first and after the last), when the task has a
    # validation split; 0: never.
    # Only measured: the evaluations run with the random state saved and restored, so the trained weights are the
    # same either way.
    eval_steps: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("scheduler", self.scheduler, SCHEDULERS)
        for name in ("batch_size", "grad_accum", "eval_batch_size", "max_length", "logging_steps"):
            check_int(name, getattr(self, name), minimum=1)
        check_int("max_steps", self.max_steps)
        check_int("seed", self.seed)
        check_int("eval_steps", self.eval_steps, minimum=0)
        check_number("learning_rate", self.learning_rate, minimum=0)
        check_number("epochs", self.epochs, minimum=0, strict=False)
        check_number("warmup_ratio", self.warmup_ratio, minimum=0, strict=False)
        check_number("weight_decay", self.weight_decay, minimum=0, strict=False)
        check_bool("progress", self.progress)
        if self.max_steps <= 0 and not (self.epochs > 0):
            raise ValueError(f"epochs: must be > 0 when max_steps is not set, got {self.epochs!r}")


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class QuietProgressCallback(ProgressCallback):
    """The Trainer's progress bar without printing every log dict (the losses are in the result records)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return control


class DivergenceCallback(TrainerCallback):
    """Stops training when the logged loss is NaN/inf or exceeds ``factor`` x the first logged loss."""

    def __init__(self, factor: float = 10.0):
        self.factor = factor
        self.first_loss: float | None = None
        self.diverged = False
        self.reason = ""

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is None:
            return control
        if self.first_loss is None and math.isfinite(loss):
            self.first_loss = loss
        exploded = self.first_loss is not None and loss > self.factor * max(self.first_loss, 1e-3)
        if not math.isfinite(loss) or exploded:
            self.diverged = True
            self.reason = f"loss {loss} at step {state.global_step} (first logged loss {self.first_loss})"
            control.should_training_stop = True
        return control


class RngNeutralEvalTrainer(Trainer):
    """A Trainer whose evaluations leave the random state as they found it: each evaluation's DataLoader draws a
    seed from torch's global generator, which would shift every later dropout mask and batch order."""

    def evaluate(self, *args, **kwargs):
        with torch.random.fork_rng(devices=None if torch.cuda.is_available() else []):
            return super().evaluate(*args, **kwargs)


def finetune(model, task: TaskData, tokenizer, settings: TrainSettings, output_dir: str, callbacks=None) -> dict:
    """Train ``model`` on ``task.train`` with the Trainer; returns loss, steps, wall time and divergence."""
    from transformers import TrainingArguments

    curve = settings.eval_steps > 0 and bool(task.validation)
    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.learning_rate,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        warmup_steps=settings.warmup_ratio,
        lr_scheduler_type=settings.scheduler,
        weight_decay=settings.weight_decay,
        bf16=settings.precision == "bf16",
        fp16=settings.precision == "fp16",
        logging_steps=settings.logging_steps,
        save_strategy="no",
        eval_strategy="steps" if curve else "no",
        eval_steps=settings.eval_steps if curve else None,
        eval_on_start=curve,
        per_device_eval_batch_size=settings.eval_batch_size,
        prediction_loss_only=True,
        report_to=[],
        seed=settings.seed,
        data_seed=settings.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=not settings.progress,
        use_cpu=not torch.cuda.is_available(),
    )
    guard = DivergenceCallback()
    trainer = (RngNeutralEvalTrainer if curve else Trainer)(
        model=model, args=args, train_dataset=task.train, eval_dataset=task.validation if curve else None,
        data_collator=collator_for(task, tokenizer, settings.max_length), callbacks=[guard, *(callbacks or [])])
    # The bar (or nothing), without the raw log dicts the stock callbacks print; losses go to the result.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if settings.progress:
        trainer.add_callback(QuietProgressCallback)
    start = time.perf_counter()
    out = trainer.train()
    wall = time.perf_counter() - start
    model.eval()
    result = {"train_loss": float(out.training_loss), "steps": int(out.global_step), "train_seconds": wall,
              "diverged": guard.diverged, "divergence": guard.reason, "settings": asdict(settings)}
    if curve:
        result["validation_loss_curve"] = validation_loss_curve(trainer.state.log_history)
    return result


def validation_loss_curve(log_history: list[dict]) -> list[list]:
    """[[step, validation loss], ...] from a Trainer's ``state.log_history`` (its ``eval_loss`` entries; the loss is
    the mean over the validation examples' loss tokens or labels, as training's)."""
    return [[int(e["step"]), float(e["eval_loss"])] for e in log_history if "eval_loss" in e]


@torch.no_grad()
def evaluate(model, task: TaskData, tokenizer, settings: TrainSettings) -> dict:
    """The task's own metrics (:attr:`TaskData.metrics`) on ``task.test``, its size ``n``, ``primary``
    (the headline metric's name) and, for classification and multiple choice, ``correct`` (0/1 per test example,
    :func:`per_example_correct`); each extra test set adds ``<metric>_<split>``, ``n_<split>`` and ``correct_<split>``.

    Classification predicts the argmax of the logits, regression the one output, multiple choice the
    choice of highest log-likelihood. A generation task is scored by its mean loss (``loss``).
    """
    model.eval()
    if task.kind == "generation":
        return _generation_loss(model, task, tokenizer, settings)
    preds, refs = predict(model, task, task.test, tokenizer, settings)
    out = {**compute_metrics(task.metrics, preds, refs), "n": len(task.test), "primary": task.metrics[0]}
    if task.kind != "regression":
        out["correct"] = per_example_correct(preds, refs)
    for split, rows in task.extra_tests.items():
        preds, refs = predict(model, task, rows, tokenizer, settings)
        out.update({f"{name}_{split}": value for name, value in compute_metrics(task.metrics, preds, refs).items()})
        out[f"n_{split}"] = len(rows)
        if task.kind != "regression":
            out[f"correct_{split}"] = per_example_correct(preds, refs)
    return out


def per_example_correct(predictions, references) -> list[int]:
    """1 where the predicted class (or choice) equals the reference, else 0, in test-set order: what a paired
    test between two methods on the same examples needs (:mod:`fimlora.bench.significance`)."""
    return [int(p == r) for p, r in zip(predictions, references, strict=True)]


@torch.no_grad()
def predict(model, task: TaskData, rows: list[dict], tokenizer, settings: TrainSettings) -> tuple[list, list]:
    """(predictions, references) on ``rows`` of a classification, regression or multiple-choice task."""
    from tqdm.auto import tqdm

    if task.kind == "multiple_choice":
        preds = score_choices(model, tokenizer, rows, settings.eval_batch_size, settings.max_length,
                              progress=settings.progress)
        return preds, [e["answer"] for e in rows]
    device = next(model.parameters()).device
    collate = collator_for(task, tokenizer, settings.max_length)
    preds = []
    for s in tqdm(range(0, len(rows), settings.eval_batch_size), desc=f"eval {task.name}",
                  disable=not settings.progress):
        batch = {k: v.to(device) for k, v in collate(rows[s : s + settings.eval_batch_size]).items()}
        batch.pop("labels")
        logits = model(**batch).logits.float()
        preds += logits[:, 0].tolist() if task.kind == "regression" else logits.argmax(-1).tolist()
    return preds, [e["label"] for e in rows]


def _generation_loss(model, task: TaskData, tokenizer, settings: TrainSettings) -> dict:
    device = next(model.parameters()).device
    collate = CausalLMCollator(tokenizer, settings.max_length)
    losses = []
    for s in range(0, len(task.test), settings.eval_batch_size):
        batch = {k: v.to(device) for k, v in collate(task.test[s : s + settings.eval_batch_size]).items()}
        losses.append(float(model(**batch).loss))
    return {"loss": sum(losses) / len(losses), "n": len(task.test)}
