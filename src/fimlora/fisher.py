"""Calibration: the empirical-Fisher diagonal of every LoRA-B matrix (the paper's section 3.2).

For module m with LoRA-B weight B_m of shape (d_out, r), after N calibration
batches:

* ``batch`` estimator (the paper's): with g_{m,b} = dL_b/dB_m the gradient of
  batch b's loss,

      F_m = (1/N) * sum_b g_{m,b} (*) g_{m,b}                  shape (d_out, r)

  Because HF losses are *means* over examples (or tokens), g_{m,b} is the mean
  per-example gradient, so this estimator scales like 1/batch_size relative to
  the per-example one. The ranking of modules is what matters, and the same
  batch size is used for every module, so the ranking is unaffected.

  g_{m,b} is read from ``B.grad``, except on a model sharded with FSDP2, where
  ``B.grad`` is a shard of the gradient averaged over processes: there it is
  summed from hooks on LoRA-B, g = sum_{n,t} dL_b/dy_{n,t} h_{n,t}^T over the
  batch's examples and positions (h (n, t, r) the input of LoRA-B, dL_b/dy
  (n, t, d_out) the gradient of its output), which is the same gradient.

* ``per_example`` estimator (eq. 1): with g_{m,n} = dl_n/dB_m the gradient of
  example n's own loss,

      F_m = (1/N_ex) * sum_n g_{m,n} (*) g_{m,n}               shape (d_out, r)

  computed in the same backward pass as the batch gradient from LoRA-B's input
  h (n, t, r) and the gradient dL/dy (n, t, d_out) of its output. For
  ``loss_reduction="mean"`` (HF's default, L = (1/n) sum_n l_n) each example's
  term is multiplied by n to recover dl_n/dB. With a *token*-mean loss (causal
  LMs), example n is then weighted by n * T_n / T_total, which equals 1 only when
  all examples have the same number of loss tokens; with padding the
  per-example estimator is a token-weighted version of eq. 1.

The math and the hooks of each estimator live in :mod:`fimlora.estimators`;
this module runs the loop. At B = 0 the gradient of A is exactly zero, so only B
requires grad during calibration: no memory or compute goes to gradients of A or
the base weights. Fisher buffers are fp32 whatever the model dtype.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import MIN_AUTO_BATCHES, FimConfig
from .distributed import (
    all_reduce_count,
    all_reduce_sums,
    check_can_calibrate,
    gather_rows,
    is_fsdp2_sharded,
    is_main_process,
)
from .estimators import Estimator, make_estimator
from .modules import LoraModuleInfo, check_dora_fresh, lora_modules

__all__ = [
    "FisherResult",
    "compute_fisher",
    "compute_scores",
    "aggregate_fisher",
    "calibration_state",
    "check_4bit_differentiable",
]

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, object], torch.Tensor]


@dataclass
class FisherResult:
    """Plain result of calibration: Fisher diagonals (fp32, shaped like B) and counts."""

    fisher: dict[str, torch.Tensor]
    estimator: str
    n_batches: int
    n_examples: dict[str, int] = field(default_factory=dict)
    # (units, modules) fp64 on the CPU, gathered over processes: each batch's (or, per_example, each example's)
    # mean squared LoRA-B gradient per module; their column means are the "mean" scores. None when the
    # per_example estimator's modules saw different examples.
    unit_scores: torch.Tensor | None = None
    stop_reason: str | None = None
    # n_batches="auto" whose data ended before its first stability check (MIN_AUTO_BATCHES batches on this
    # process): auto never judged the map, whatever a bootstrap of the units so far would say.
    auto_unjudged: bool = False


# ---------------------------------------------------------------------------
# Model state during calibration


def _bnb_4bit_state(base: nn.Module):
    """The bitsandbytes 4-bit ``quant_state`` on a base layer's weight, None for any other layer."""
    return getattr(getattr(base, "weight", None), "quant_state", None)


def _bnb_4bit_bases(infos: list[LoraModuleInfo]) -> list[nn.Module]:
    """Base layers holding a bitsandbytes 4-bit weight."""
    bases = (info.layer.get_base_layer() for info in infos)
    return [b for b in bases if _bnb_4bit_state(b) is not None]


def check_4bit_differentiable(infos: list[LoraModuleInfo]) -> None:
    """Raise ValueError naming the first 4-bit base layer that bitsandbytes repacked for CPU inference.

    An eval-mode forward whose input needs no grad makes bitsandbytes (on CPUs with AVX512-BF16) repack a 4-bit
    weight into a format whose kernel has no backward: from then on no gradient reaches that layer's input,
    so every LoRA-B upstream of it would score 0 (and would not train either).
    """
    for info in infos:
        if getattr(_bnb_4bit_state(info.layer.get_base_layer()), "packing_format_for_cpu", False):
            raise ValueError(
                f"model: the 4-bit weight of {info.name!r} was repacked by bitsandbytes for CPU inference (an "
                "eval-mode forward without gradients ran on it); no gradient flows through that format, so the "
                "scores of every module before it would be 0; reload the model, and run evaluation forwards in "
                "train mode or with inputs that require grad"
            )


@contextlib.contextmanager
def calibration_state(
    model: nn.Module,
    infos: list[LoraModuleInfo],
    adapter_name: str,
    train_mode: bool = False,
):
    """Only LoRA-B of ``adapter_name`` requires grad; eval mode unless ``train_mode``.

    In eval mode, gradient-checkpointed layers and bitsandbytes 4-bit base layers keep their training
    flag on, so that checkpointing runs and gradients pass; neither has dropout (see the comments).

    On exit, whatever happened, every module's train/eval flag, every parameter's
    ``requires_grad`` and ``.grad`` are exactly as they were.
    """
    modes = {m: m.training for m in model.modules()}
    params = list(model.parameters())
    requires = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    try:
        for p in params:
            p.grad = None
            p.requires_grad_(False)
        for info in infos:
            info.layer.lora_B[adapter_name].weight.requires_grad_(True)
        model.train(train_mode)
        if not train_mode:
            # bitsandbytes' CPU kernels repack a 4-bit weight for inference on an eval forward whose input
            # needs no grad (e.g. the no-grad first pass of reentrant checkpointing), and no gradient reaches
            # the layer's input after that, now or in training. In training mode Linear4bit keeps the
            # dequantise-and-matmul kernel that training uses; it has no dropout or other train-only
            # behaviour. (8-bit layers are left alone: their training flag switches kernels.)
            for base in _bnb_4bit_bases(infos):
                base.training = True
            # HF only checkpoints layers in training mode; keep the checkpointed
            # layer itself "training" (its dropout submodules stay in eval) so a
            # user who enabled gradient checkpointing keeps its memory savings.
            for m in model.modules():
                if getattr(m, "gradient_checkpointing", False) is True:
                    m.training = True
        yield
    finally:
        for p, req, g in zip(params, requires, grads):
            p.requires_grad_(req)
            p.grad = g
        for m, mode in modes.items():
            m.training = mode


# ---------------------------------------------------------------------------
# One batch: its loss


def _to_device(batch, device: torch.device):
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def default_loss(model: nn.Module, batch) -> torch.Tensor:
    """``model(**batch).loss``, with a clear error for a batch that has no labels."""
    if not isinstance(batch, Mapping):
        raise ValueError(
            f"batch: expected a mapping of model inputs (e.g. input_ids, labels), got {type(batch).__name__}; "
            "pass loss_fn(model, batch) for other batch types"
        )
    out = model(**batch)
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, Mapping):
        loss = out.get("loss")
    if loss is None:
        raise ValueError(
            f"batch: model(**batch).loss is None, the batch has no labels (keys: {sorted(batch)}); "
            "add 'labels' to the batch or pass loss_fn(model, batch)"
        )
    return loss


def _check_loss(loss, batch_index: int, adapter_name: str) -> None:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"loss_fn: must return a scalar tensor, got {type(loss).__name__} at batch {batch_index}")
    if not loss.requires_grad:
        raise ValueError(
            f"batch {batch_index}: the loss does not depend on any LoRA-B weight of adapter {adapter_name!r}; "
            "is the adapter active and does loss_fn call the model?"
        )


def _check_loss_finite(loss: torch.Tensor, batch_index: int) -> None:
    """A NaN or infinite loss is the loss's own fault, found before any backward (no loss scale is applied yet)."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise ValueError(
            f"batch {batch_index}: the loss itself is non-finite (loss={value:.6g}), before any loss scale or "
            "backward; typical causes: every label masked (-100), so a mean over no tokens is 0/0, or labels/inputs "
            "too large for the model's dtype; fix that batch or loss_fn"
        )


def _nonfinite_gradient_error(module: str, batch_index: int, loss: torch.Tensor) -> ValueError:
    return ValueError(
        f"non-finite gradient in module {module!r} at batch {batch_index} "
        f"(loss={float(loss.detach()):.6g}); check the data and the dtype/loss scale"
    )


# ---------------------------------------------------------------------------
# The calibration loop


@dataclass
class _Run:
    """What one calibration backward needs besides the estimator."""

    model: nn.Module
    loss_fn: LossFn
    loss_scale: float
    adapter_name: str
    device: torch.device


def _default_loss_scale(infos: list[LoraModuleInfo], adapter_name: str) -> float:
    dtypes = {i.layer.lora_B[adapter_name].weight.dtype for i in infos}
    return 1024.0 if torch.float16 in dtypes else 1.0


def _loss_scale(config: FimConfig, infos: list[LoraModuleInfo]) -> float:
    if config.loss_scale is not None:
        return float(config.loss_scale)
    return _default_loss_scale(infos, config.adapter_name)


def _calibrate_batch(run: _Run, estimator: Estimator, batch, batch_index: int) -> None:
    """Loss, (loss * s).backward(), and the estimator folds the gradients in."""
    loss = run.loss_fn(run.model, _to_device(batch, run.device))
    _check_loss(loss, batch_index, run.adapter_name)
    _check_loss_finite(loss, batch_index)
    (loss * run.loss_scale).backward()
    bad = estimator.after_backward(batch_index)
    if bad is not None:
        raise _nonfinite_gradient_error(bad, batch_index, loss)


# Called after each batch from the MIN_AUTO_BATCHES-th on with every process's unit scores so far; returns why
# to stop (a sentence) or None to go on. The same answer must reach every process (see fimlora.api).
StopRule = Callable[[torch.Tensor], "str | None"]


def _calibrate(run: _Run, estimator: Estimator, dataloader: Iterable, n_batches: int, progress: bool,
               stop_rule: StopRule | None = None) -> tuple[int, str | None]:
    """Up to ``n_batches`` batches through :func:`_calibrate_batch`, or fewer when ``stop_rule`` says so;
    returns how many were calibrated and the stop rule's reason (None if it never stopped the loop)."""
    from tqdm.auto import tqdm

    n_done = 0
    bar = tqdm(total=n_batches, desc="fimlora calibration", unit="batch", disable=not (progress and is_main_process()))
    try:
        # islice never asks the dataloader for a batch it will not use.
        for b, batch in enumerate(itertools.islice(dataloader, n_batches)):
            _calibrate_batch(run, estimator, batch, b)
            n_done += 1
            bar.update(1)
            if stop_rule is not None and n_done >= MIN_AUTO_BATCHES:
                reason = stop_rule(gather_rows(estimator.unit_scores()))
                if reason is not None:
                    return n_done, reason
    finally:
        bar.close()
    return n_done, None


def _check_run(n_done: int, n_batches: int, no_grad_modules: set[str]) -> None:
    """Refuse an empty dataloader; warn about a short one and about modules no gradient reached."""
    if n_done == 0:
        raise ValueError("dataloader: yielded no batches; calibration needs at least one batch")
    if n_done < n_batches:
        warnings.warn(
            f"dataloader: yielded only {n_done} batches, fewer than n_batches={n_batches}; calibrating on {n_done}",
            stacklevel=3,
        )
    if no_grad_modules:
        warnings.warn(
            f"{len(no_grad_modules)} LoRA module(s) received no gradient (not on the loss path), "
            f"score 0: {sorted(no_grad_modules)[:5]}",
            stacklevel=3,
        )


def _check_some_signal(fisher: dict[str, torch.Tensor], n_batches: int) -> None:
    """Refuse a Fisher that is zero in every module: all scores 0 would allocate ranks from nothing (ties)."""
    if all(not bool(f.any()) for f in fisher.values()):
        raise ValueError(
            f"fisher: every module's score is 0 after {n_batches} batches (every LoRA-B gradient is exactly zero), "
            "so the ranks would be allocated from nothing; the loss does not depend on the adapters: e.g. a "
            "loss_fn that ignores the model's output, or a model whose LoRA path is cut; check the batches and loss_fn"
        )


def _reduce_to_result(estimator: Estimator, name: str, n_done: int, device: torch.device) -> FisherResult:
    """All-reduce sums and counts over processes, F_m = sum_m / count_m."""
    sums = estimator.sums()
    counts = all_reduce_sums(sums, estimator.counts())
    fisher = {}
    for module, s in sums.items():
        fisher[module] = s / counts[module] if counts[module] > 0 else s
        if not torch.isfinite(fisher[module]).all():
            # g = B.grad / s is finite (checked per batch), so g^2 overflowed fp32 (|g| > ~1.8e19): the
            # gradient itself is too large, which no loss scale changes (it is divided out before squaring).
            raise ValueError(f"non-finite Fisher value in module {module!r}: a squared LoRA-B gradient overflowed "
                             "fp32 (|dL/dB| above ~1e19); the loss is too large or too steep, check the labels' and "
                             "inputs' scale")
    n_examples = counts if estimator.unit == "example" else {}
    total_batches = all_reduce_count(n_done, device)
    _check_some_signal(fisher, total_batches)
    return FisherResult(fisher=fisher, estimator=name, n_batches=total_batches, n_examples=n_examples,
                        unit_scores=gather_rows(estimator.unit_scores()))


def compute_fisher(
    model: nn.Module,
    dataloader: Iterable,
    config: FimConfig | None = None,
    loss_fn: LossFn | None = None,
    stop_rule: StopRule | None = None,
) -> FisherResult:
    """Run ``config.n_batches`` calibration backward passes and return F_m for every LoRA module.

    With ``n_batches="auto"``, up to ``config.max_batches`` batches, stopping when ``stop_rule`` (which
    needs the allocation's budget, so :func:`fimlora.compute_allocation` builds it) gives a reason.

    Under torch.distributed every process calibrates on its own batches and the
    sums and counts are all-reduced: the result equals one calibration over the
    union of all processes' batches (``n_batches`` is per process). A model sharded
    with FSDP2 (``fully_shard``) is calibrated the same way, from hooks on each
    LoRA-B (see :class:`fimlora.estimators.HookedBatchEstimator`); every process
    holds full-size fp32 buffers for every module. FSDP1/DDP wrappers, DeepSpeed
    ZeRO-3 and tensor parallelism are refused (``check_can_calibrate``).

    Does not change the model: on return (or on error) modes, ``requires_grad``
    and ``.grad`` of every parameter are as before and no hook is left.
    Raises ValueError for an empty dataloader, a batch without labels, a
    non-finite loss (naming the batch index and the value: e.g. every label
    masked), a non-finite gradient (naming the module and the batch index), a
    Fisher that is zero in every module (nothing to allocate from), or, before any
    compute, a DoRA adapter whose LoRA-B is non-zero (see ``check_dora_fresh``) or a
    4-bit layer that bitsandbytes repacked for inference (``check_4bit_differentiable``).
    """
    config = config or FimConfig()
    adapter = config.adapter_name
    infos = lora_modules(model, adapter)
    check_dora_fresh(infos, adapter)
    check_4bit_differentiable(infos)
    check_can_calibrate(model)
    loss_scale = _loss_scale(config, infos)
    device = infos[0].layer.lora_B[adapter].weight.device
    run = _Run(model, loss_fn or default_loss, loss_scale, adapter, device)
    # Only the chosen estimator's fp32 buffers are allocated: one B-sized buffer per module. Under FSDP2, B.grad
    # is this process's shard of the gradient averaged over processes, so the batch estimator uses the hooks.
    estimator = make_estimator(config.estimator, infos, adapter, loss_scale, config.loss_reduction,
                               hooked_batch=is_fsdp2_sharded(model))
    auto = config.n_batches == "auto"
    if auto and stop_rule is None:
        raise ValueError("n_batches: 'auto' stops when the rank map is stable, which needs the allocation's budget; "
                         "use compute_allocation or apply_fim_ranks, or give a number of batches")
    n_batches = config.max_batches if auto else config.n_batches
    with calibration_state(model, infos, adapter, config.train_mode), estimator.hooks():
        n_done, reason = _calibrate(run, estimator, dataloader, n_batches, config.progress,
                                    stop_rule if auto else None)
    # A short dataloader is no surprise under "auto" (it stops early by design); an empty one still is.
    _check_run(n_done, n_done if auto else n_batches, estimator.no_grad_modules)
    result = _reduce_to_result(estimator, config.estimator, n_done, device)
    if auto:
        result.stop_reason = reason or _auto_stop_reason(n_done, n_batches)
        result.auto_unjudged = n_done < MIN_AUTO_BATCHES
    return result


def _auto_stop_reason(n_done: int, cap: int) -> str:
    """Why ``n_batches="auto"`` stopped when its stop rule never said "stable": the cap or the end of the data."""
    if n_done == cap:
        return f"cap: max_batches={cap} reached before the map was stable"
    if n_done < MIN_AUTO_BATCHES:
        return (f"dataloader: ended after {n_done} batch, before the {MIN_AUTO_BATCHES} n_batches='auto' needs to "
                "judge the rank map's stability; its stability is unknown")
    return f"dataloader: ended after {n_done} batches"


# ---------------------------------------------------------------------------
# Scores


def aggregate_fisher(fisher: torch.Tensor, aggregation: str = "mean") -> float:
    """Module score s_m from its Fisher matrix F_m (d_out, r).

    mean: (1/(d_out*r)) sum_ij F_ij (the paper's eq. 4); max: max_ij F_ij;
    l2: sqrt(sum_ij F_ij^2) (Frobenius norm).
    """
    f = fisher.double()
    if aggregation == "mean":
        return float(f.mean())
    if aggregation == "max":
        return float(f.max())
    if aggregation == "l2":
        return float(torch.linalg.vector_norm(f))
    raise ValueError(f"aggregation: must be one of ['mean', 'max', 'l2'], got {aggregation!r}")


def compute_scores(fisher: FisherResult | Mapping[str, torch.Tensor], aggregation: str = "mean") -> dict[str, float]:
    """Per-module scores, in module order, from a FisherResult or a name -> F_m mapping."""
    mapping = fisher.fisher if isinstance(fisher, FisherResult) else fisher
    return {name: aggregate_fisher(f, aggregation) for name, f in mapping.items()}
