"""Calibration: the empirical-Fisher diagonal of every LoRA-B matrix.

For module m with LoRA-B weight B_m of shape (d_out, r), after N calibration
batches:

* ``batch`` estimator (the paper's): with g_{m,b} = dL_b/dB_m the gradient of
  batch b's loss,

      F_m = (1/N) * sum_b g_{m,b} (*) g_{m,b}                  shape (d_out, r)

  Because HF losses are *means* over examples (or tokens), g_{m,b} is the mean
  per-example gradient, so this estimator scales like 1/batch_size relative to
  the per-example one. The ranking of modules is what matters, and the same
  batch size is used for every module, so the ranking is unaffected.

* ``per_example`` estimator (eq. 1): with g_{m,n} = dl_n/dB_m the gradient of
  example n's own loss,

      F_m = (1/N_ex) * sum_n g_{m,n} (*) g_{m,n}               shape (d_out, r)

  computed in the same backward pass as the batch gradient: a forward hook on
  the LoRA-B linear stores its input h (n, t, r) and a tensor hook on its output
  receives dL/dy (n, t, d_out); the per-example gradient is
  einsum("ntd,ntr->ndr"). For ``loss_reduction="mean"`` (HF's default,
  L = (1/n) sum_n l_n) that contribution is multiplied by n to recover dl_n/dB.
  With a *token*-mean loss (causal LMs), example n is then weighted by
  n * T_n / T_total, which equals 1 only when all examples have the same number
  of loss tokens; with padding the per-example estimator is a token-weighted
  version of eq. 1.

At B = 0 the gradient of A is exactly zero, so only B requires grad during
calibration: no memory or compute goes to gradients of A or the base weights.
Fisher buffers are fp32 whatever the model dtype.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import FimConfig
from .distributed import all_reduce_count, all_reduce_sums, check_not_sharded, is_main_process
from .modules import LoraModuleInfo, lora_modules

__all__ = [
    "FisherResult",
    "compute_fisher",
    "compute_scores",
    "aggregate_fisher",
    "calibration_state",
    "per_example_hooks",
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


# ---------------------------------------------------------------------------
# Model state during calibration


@contextlib.contextmanager
def calibration_state(
    model: nn.Module,
    infos: list[LoraModuleInfo],
    adapter_name: str,
    train_mode: bool = False,
):
    """Only LoRA-B of ``adapter_name`` requires grad; eval mode unless ``train_mode``.

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
# Per-example gradients through hooks


class PerExampleAccumulator:
    """Running sum over examples of squared per-example LoRA-B gradients (fp32).

    Sums are kept transposed, (r, d_out), because bmm(h^T, dL/dy) is several times
    faster than the einsum that produces (d_out, r) directly; :meth:`fisher_sums`
    returns them shaped like B.
    """

    def __init__(self, infos: list[LoraModuleInfo], adapter_name: str, multiply_by_batch: bool):
        self.sums_t: dict[str, torch.Tensor] = {}
        self.examples: dict[str, int] = {i.name: 0 for i in infos}
        self.calls: dict[str, int] = {i.name: 0 for i in infos}
        self.multiply_by_batch = multiply_by_batch
        self.grad_divisor = 1.0
        for info in infos:
            w = info.layer.lora_B[adapter_name].weight
            self.sums_t[info.name] = torch.zeros((w.shape[1], w.shape[0]), dtype=torch.float32, device=w.device)

    def add(self, name: str, h: torch.Tensor, grad_out: torch.Tensor) -> None:
        """Add sum_n (c * G_n)^2 with G_n = dL/dy_n^T h_n, the gradient of B from example n.

        h: (n, ..., r) input of LoRA-B; grad_out: (n, ..., d_out) gradient of the
        (scaled) loss w.r.t. LoRA-B's output; c undoes the 1/n of a mean loss and the loss scale.
        """
        n = h.shape[0]
        h3 = h.reshape(n, -1, h.shape[-1]).float()
        g3 = grad_out.reshape(n, -1, grad_out.shape[-1]).float()
        per_example_t = torch.bmm(h3.transpose(1, 2), g3)  # (n, r, d_out) = G_n^T
        c = (float(n) if self.multiply_by_batch else 1.0) / self.grad_divisor
        self.sums_t[name].add_(per_example_t.square().sum(0), alpha=c * c)
        self.examples[name] += n

    def fisher_sums(self) -> dict[str, torch.Tensor]:
        return {name: t.t().contiguous() for name, t in self.sums_t.items()}


def _per_example_grad_hook(acc: PerExampleAccumulator, name: str, h: torch.Tensor, grad: torch.Tensor):
    # Counted here, not in the forward hook: a non-reentrant checkpoint recompute
    # runs the forward again, but gradients only flow through the original output.
    acc.calls[name] += 1
    acc.add(name, h, grad)
    return None


def _per_example_forward_hook(acc: PerExampleAccumulator, name: str, module, inputs, output):
    # Under a no-grad forward (e.g. the first pass of reentrant checkpointing)
    # there is no backward for this output; the recomputed forward registers.
    if not isinstance(output, torch.Tensor) or not output.requires_grad:
        return None
    output.register_hook(functools.partial(_per_example_grad_hook, acc, name, inputs[0].detach()))
    return None


@contextlib.contextmanager
def per_example_hooks(infos: list[LoraModuleInfo], adapter_name: str, acc: PerExampleAccumulator):
    """Attach the per-example hooks to every LoRA-B linear; always removed on exit."""
    handles = []
    try:
        for info in infos:
            module = info.layer.lora_B[adapter_name]
            handles.append(module.register_forward_hook(functools.partial(_per_example_forward_hook, acc, info.name)))
        yield acc
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------
# The calibration loop


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


def _default_loss_scale(infos: list[LoraModuleInfo], adapter_name: str) -> float:
    dtypes = {i.layer.lora_B[adapter_name].weight.dtype for i in infos}
    return 1024.0 if torch.float16 in dtypes else 1.0


def compute_fisher(
    model: nn.Module,
    dataloader: Iterable,
    config: FimConfig | None = None,
    loss_fn: LossFn | None = None,
) -> FisherResult:
    """Run ``config.n_batches`` calibration backward passes and return F_m for every LoRA module.

    Under torch.distributed every process calibrates on its own batches and the
    sums and counts are all-reduced: the result equals one calibration over the
    union of all processes' batches (``n_batches`` is per process).

    Does not change the model: on return (or on error) modes, ``requires_grad``
    and ``.grad`` of every parameter are as before and no hook is left.
    Raises ValueError for an empty dataloader, a batch without labels, or a
    non-finite gradient (naming the module and the batch index).
    """
    from tqdm.auto import tqdm

    config = config or FimConfig()
    adapter = config.adapter_name
    infos = lora_modules(model, adapter)
    check_not_sharded(model)
    loss_fn = loss_fn or default_loss
    loss_scale = float(config.loss_scale) if config.loss_scale is not None else _default_loss_scale(infos, adapter)
    device = infos[0].layer.lora_B[adapter].weight.device
    b_weights = {i.name: i.layer.lora_B[adapter].weight for i in infos}
    per_example = config.estimator == "per_example"
    # Only the chosen estimator's fp32 buffers are allocated: one B-sized buffer per module.
    if per_example:
        acc = PerExampleAccumulator(infos, adapter, multiply_by_batch=config.loss_reduction == "mean")
        acc.grad_divisor = loss_scale
        hooks = per_example_hooks(infos, adapter, acc)
    else:
        batch_sums = {n: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for n, w in b_weights.items()}
        hooks = contextlib.nullcontext()
    no_grad_modules: set[str] = set()
    n_done = 0

    bar = tqdm(total=config.n_batches, desc="fimlora calibration", unit="batch",
               disable=not (config.progress and is_main_process()))
    try:
        with calibration_state(model, infos, adapter, config.train_mode), hooks:
            iterator = iter(dataloader)
            for b in range(config.n_batches):
                try:
                    batch = next(iterator)
                except StopIteration:
                    break
                calls_before = dict(acc.calls) if per_example else None
                loss = loss_fn(model, _to_device(batch, device))
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise ValueError(f"loss_fn: must return a scalar tensor, got {type(loss).__name__} at batch {b}")
                if not loss.requires_grad:
                    raise ValueError(
                        f"batch {b}: the loss does not depend on any LoRA-B weight of adapter {adapter!r}; "
                        "is the adapter active and does loss_fn call the model?"
                    )
                (loss * loss_scale).backward()
                for name, w in b_weights.items():
                    g = w.grad
                    if g is None:
                        no_grad_modules.add(name)
                        continue
                    g = g.float()
                    if not torch.isfinite(g).all():
                        raise ValueError(
                            f"non-finite gradient in module {name!r} at batch {b} "
                            f"(loss={float(loss.detach()):.6g}); check the data and the dtype/loss scale"
                        )
                    if not per_example:
                        g = g / loss_scale
                        batch_sums[name].add_(g * g)
                    w.grad = None
                if per_example:
                    repeated = [n for n in acc.calls if acc.calls[n] - calls_before[n] > 1]
                    if repeated and b == 0:
                        warnings.warn(
                            f"{len(repeated)} LoRA module(s) ran more than once in one forward pass "
                            f"(e.g. {repeated[0]!r}); the per_example estimator counts each call as its own term",
                            stacklevel=2,
                        )
                n_done += 1
                bar.update(1)
    finally:
        bar.close()

    if n_done == 0:
        raise ValueError("dataloader: yielded no batches; calibration needs at least one batch")
    if n_done < config.n_batches:
        warnings.warn(
            f"dataloader: yielded only {n_done} batches, fewer than n_batches={config.n_batches}; "
            f"calibrating on {n_done}",
            stacklevel=2,
        )
    if no_grad_modules:
        warnings.warn(
            f"{len(no_grad_modules)} LoRA module(s) received no gradient (not on the loss path), "
            f"score 0: {sorted(no_grad_modules)[:5]}",
            stacklevel=2,
        )

    if per_example:
        sums = acc.fisher_sums()
        counts = dict(acc.examples)
    else:
        sums = batch_sums
        counts = {n: n_done for n in sums}
    counts = all_reduce_sums(sums, counts)
    fisher = {}
    for name, s in sums.items():
        fisher[name] = s / counts[name] if counts[name] > 0 else s
        if not torch.isfinite(fisher[name]).all():
            raise ValueError(f"non-finite Fisher value in module {name!r} (overflow); lower loss_scale")
    total_batches = all_reduce_count(n_done, device)
    n_examples = counts if per_example else {}
    return FisherResult(fisher=fisher, estimator=config.estimator, n_batches=total_batches, n_examples=n_examples)


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
