"""One call that makes a Hugging Face ``Trainer`` run FIM-LoRA before training (and, in
:mod:`fimlora.integrations.axolotl`, an axolotl plugin built on it).

    trainer = Trainer(model=peft_model, args=args, train_dataset=ds, data_collator=collator)
    fimlora.integrations.calibrate_trainer(trainer, n_batches=8)
    trainer.train()

Calibration uses the trainer's own training dataloader (its sampler, seed,
collator and, under ``accelerate launch``/``torchrun``, its per-process shard),
so the calibration batches are the batches training sees first; random states
are restored afterwards, so nothing is consumed from training. It runs before
the Trainer builds its optimizer and scheduler, so they see the resized
parameters, and before the Trainer wraps the model for DDP/FSDP.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

from ..allocation import RankAllocation
from ..api import apply_fim_ranks, resolve_config
from ..config import FimConfig, check_bool
from ..distributed import is_main_process
from ..lr import LrRecommendation

__all__ = [
    "apply_learning_rate",
    "calibrate_trainer",
    "check_no_optimizer",
    "RankMapLoggerCallback",
    "preserved_rng",
    "warn_if_single_cpu_process",
]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def preserved_rng():
    """Restore python, numpy, torch (and CUDA) random states on exit."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


class RankMapLoggerCallback(TrainerCallback):
    """Logs the rank map to the trainer's trackers once they are set up (at train begin).

    TensorBoard gets a text table and the heatmap image; Weights & Biases a
    ``wandb.Table`` and ``wandb.Image``; every tracker gets per-type mean ranks
    as scalars through ``on_log``-style metrics.
    """

    def __init__(self, allocation: RankAllocation, png: str | None, trainer_callbacks: list):
        self.allocation = allocation
        self.png = png
        self.trainer_callbacks = trainer_callbacks  # the trainer's live list: trackers are set up in it
        self.logged: list[str] = []

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return control
        from ..rankmap import format_rank_table

        table = format_rank_table(self.allocation)
        for cb in self.trainer_callbacks:
            writer = getattr(cb, "tb_writer", None)
            if writer is not None:
                writer.add_text("fimlora/rank_map", "```\n" + table + "\n```", 0)
                if self.png:
                    import matplotlib.image as mpimg

                    img = mpimg.imread(self.png)
                    writer.add_image("fimlora/rank_map", img[..., :3], 0, dataformats="HWC")
                self.logged.append("tensorboard")
            if type(cb).__name__ == "WandbCallback" and getattr(cb, "_wandb", None) is not None:
                wandb = cb._wandb
                rows = [[n, r, self.allocation.scores[n]] for n, r in self.allocation.ranks.items()]
                payload = {"fimlora/ranks": wandb.Table(columns=["module", "rank", "score"], data=rows)}
                if self.png:
                    payload["fimlora/rank_map"] = wandb.Image(self.png)
                wandb.log(payload)
                self.logged.append("wandb")
        return control


def warn_if_single_cpu_process(world_size: int) -> bool:
    """Warn when ``accelerate launch --cpu`` quietly gave one process (its multi-CPU mode needs MPI)."""
    if world_size == 1 and os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true":
        warnings.warn(
            "fimlora: running as a single process under `accelerate launch --cpu`; that launcher needs MPI for "
            "several CPU processes and otherwise starts one. For several processes use `accelerate launch "
            "--multi_gpu --num_processes N` (gloo on CPU) or `torchrun --nproc_per_node N`.",
            stacklevel=3,
        )
        return True
    return False


class TrainerLoss:
    """``loss_fn(model, batch) = trainer.compute_loss(model, batch)``: calibration scores the loss training uses.

    That follows a trainer's own loss (TRL's ``loss_type="dft"``, label smoothing, a ``compute_loss_func``),
    not just ``model(**batch).loss``. Metrics a trainer records inside ``compute_loss`` (TRL's entropy and
    token accuracy) are put back as they were, so calibration leaves no trace in the training logs.
    """

    def __init__(self, trainer):
        self.trainer = trainer

    def __call__(self, model, batch):
        metrics = getattr(self.trainer, "_metrics", None)
        saved = copy.deepcopy(metrics) if metrics is not None else None
        try:
            return self.trainer.compute_loss(model, dict(batch))  # compute_loss may add keys to its batch
        finally:
            if saved is not None:
                self.trainer._metrics = saved


def _unwrapped(model):
    return getattr(model, "module", model)


def check_no_optimizer(trainer, what: str = "calibrate_trainer") -> None:
    """Refuse a trainer whose optimizer exists: it would keep updating the old (replaced) LoRA parameters."""
    if trainer.optimizer is not None:
        raise ValueError(
            f"trainer: an optimizer already exists and would keep the old LoRA parameters; call {what} "
            "before trainer.train() and without passing optimizers=(...) to the Trainer"
        )


def apply_learning_rate(trainer, allocation: RankAllocation, use: bool) -> str:
    """With ``use``, set ``trainer.args.learning_rate`` to the allocation's recommended learning rate when there
    is one; log (or, when ``use`` asked for one that is missing, warn about) what training will use. Returns where
    the learning rate training uses came from: ``"fimlora"`` or ``"trainer"``."""
    current = trainer.args.learning_rate
    recommended = allocation.learning_rate
    if recommended is None:
        why = ("lr_rule='none' computed none" if allocation.lr is None
               else LrRecommendation.from_dict(allocation.lr).text())
        (logger.warning if use else logger.info)(
            "fimlora: no recommended learning rate (%s); the trainer keeps learning_rate=%g", why, current)
        return "trainer"
    if not use:
        logger.info("fimlora: recommended AdamW learning rate %.3g; the trainer keeps its learning_rate=%g "
                    "(use_learning_rate=True trains at the recommendation)", recommended, current)
        return "trainer"
    if "adamw" not in str(getattr(trainer.args, "optim", "adamw")).lower():
        logger.warning("fimlora: the recommended learning rate is for AdamW; the trainer's optimizer is %s",
                       trainer.args.optim)
    trainer.args.learning_rate = recommended
    logger.info("fimlora: learning_rate set to the recommended %.3g (was %g)", recommended, current)
    return "fimlora"


def calibrate_trainer(trainer, config: FimConfig | None = None, save: bool = True, allow_trained: bool = False,
                      use_learning_rate: bool = False, **kwargs) -> RankAllocation:
    """Calibrate and resize ``trainer.model`` on the trainer's own first training batches.

    Call after building the Trainer and before ``trainer.train()``. Settings go
    in ``config`` or as :class:`FimConfig` keyword arguments. On the main process
    the rank map is written to ``args.output_dir`` (``rank_map.json``/``.png``)
    and logged to the configured trackers when training starts. A trained adapter
    (non-zero LoRA-B) is refused unless ``allow_trained=True`` (see :func:`fimlora.apply_fim_ranks`).

    The recommended AdamW learning rate (``allocation.learning_rate``, ``lr_rule``) is logged next to the
    trainer's ``args.learning_rate``, which it replaces only with ``use_learning_rate=True`` (a learning rate
    the user set is never changed silently); with no recommendation (``lr_rule="none"``, or a rule whose
    constant is not fitted yet) the trainer's stays, with a warning when one was asked for.
    ``settings["trainer"]`` records the learning rate training will use and where it came from.
    """
    check_bool("use_learning_rate", use_learning_rate)
    check_no_optimizer(trainer)
    if config is None:
        kwargs.setdefault("progress", not trainer.args.disable_tqdm)
    config = resolve_config(config, kwargs)
    model = _unwrapped(trainer.model)
    with preserved_rng():
        loader = trainer.get_train_dataloader()
        allocation = apply_fim_ranks(model, loader, config=config, allow_trained=allow_trained,
                                     loss_fn=TrainerLoss(trainer))
    warn_if_single_cpu_process(trainer.args.world_size)
    source = apply_learning_rate(trainer, allocation, use_learning_rate)
    allocation.settings["trainer"] = {"per_device_train_batch_size": trainer.args.per_device_train_batch_size,
                                      "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
                                      "world_size": trainer.args.world_size,
                                      "learning_rate": trainer.args.learning_rate, "learning_rate_from": source}
    png = None
    if save and is_main_process():
        from ..rankmap import format_rank_table, save_rank_map

        out = Path(trainer.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        files, notes = save_rank_map(allocation, out)
        png = str(files[1]) if len(files) > 1 else None
        for note in notes:
            logger.warning("fimlora: %s", note)

        logger.info("fimlora rank map:\n%s", format_rank_table(allocation))
    trainer.add_callback(RankMapLoggerCallback(allocation, png, trainer.callback_handler.callbacks))
    return allocation
