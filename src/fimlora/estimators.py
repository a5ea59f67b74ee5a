"""Empirical-Fisher estimators of LoRA-B: the math as pure functions, then one accumulator per estimator.

LoRA-B of module m is a linear map y = h B^T with B (d_out, r), input h (..., r)
and output y (..., d_out). Calibration backpropagates ``s * L`` (``s`` the loss
scale) and each estimator turns what that backward leaves behind into a running
fp32 sum of squared gradients plus a count; the Fisher diagonal is sum / count.

* :class:`BatchGradientEstimator` (the paper's): reads the batch gradient
  ``B.grad = s * dL_b/dB`` after each backward and adds ``(B.grad / s)^2``;
  counts batches.
* :class:`HookedBatchEstimator`: the same estimator from hooks on every LoRA-B
  linear, which see its input h and the gradient dL/dy of its output during the
  backward; the batch gradient is the sum of the outer products over the batch's
  tokens (and calls). It never reads ``.grad``, so it works where ``B.grad`` is a
  shard of the all-reduced gradient (FSDP2); counts batches.
* :class:`PerExampleEstimator` (eq. 1): the same hooks add the squared
  per-example gradients; counts examples. It never reads ``.grad``.

All three share one interface, so the calibration loop has no estimator branches::

    with estimator.hooks():
        for b, batch in enumerate(batches):
            (loss * s).backward()
            bad = estimator.after_backward(b)   # name of a module with a non-finite gradient, or None
    fisher = {m: estimator.sums()[m] / estimator.counts()[m]}
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator

import torch

from .config import ESTIMATORS, LOSS_REDUCTIONS, check_choice
from .modules import LoraModuleInfo

__all__ = [
    "batch_squared_grad",
    "batch_gradient_t",
    "per_example_multiplier",
    "per_example_squared_grad_sum",
    "per_example_squared_grads",
    "BatchGradientEstimator",
    "HookedBatchEstimator",
    "PerExampleEstimator",
    "make_estimator",
    "lora_b_hooks",
]


# ---------------------------------------------------------------------------
# The math: pure functions on tensors, no hooks, no state


def batch_squared_grad(grad: torch.Tensor, loss_scale: float) -> torch.Tensor:
    """One batch's term of the batch estimator, g (*) g with g = grad / s, in fp32.

    ``grad`` (d_out, r) is B's gradient of the scaled loss s * L_b, so g = dL_b/dB.
    HF losses are means over examples (or tokens), so g is the *mean* per-example
    gradient; the estimator F = (1/N) sum_b g_b (*) g_b therefore scales like
    1/batch_size relative to the per-example one (module ranking unaffected).
    """
    g = grad.float() / loss_scale
    return g * g


def batch_gradient_t(h: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """G^T = sum_{n,t} h_{n,t} (dL/dy_{n,t})^T, (r, d_out) in fp32: the transpose of one call's part of dL/dB.

    h: (n, ..., r), the input of LoRA-B (A x after dropout); grad_out: (n, ..., d_out), dL/dy of the loss that
    was backpropagated w.r.t. LoRA-B's output y = h B^T. Every example and position of the call is summed,
    as autograd sums them into ``B.grad``; a module called several times in one forward gets one term per
    call, and dL/dB of the batch is their sum. Transposed for the same reason as
    :func:`per_example_squared_grad_sum`: mm(h^T, dL/dy) is the fast layout.
    """
    h2 = h.reshape(-1, h.shape[-1]).float()
    g2 = grad_out.reshape(-1, grad_out.shape[-1]).float()
    return torch.mm(h2.t(), g2)


def per_example_multiplier(batch_size: int, loss_reduction: str, loss_scale: float) -> float:
    """c with dl_n/dB = c * dL'/dB-from-example-n, where L' = s * L is the loss backpropagated.

    ``"mean"``: L = (1/n) sum_n l_n, so c = n / s; ``"sum"``: L = sum_n l_n, so c = 1 / s.
    With a token-mean loss (causal LMs) "mean" weights example n by n * T_n / T_total,
    which is 1 only when every example has the same number of loss tokens.
    """
    check_choice("loss_reduction", loss_reduction, LOSS_REDUCTIONS)
    return (float(batch_size) if loss_reduction == "mean" else 1.0) / loss_scale


def per_example_squared_grad_sum(h: torch.Tensor, grad_out: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
    """sum_n (c * G_n)^2, transposed to (r, d_out), in fp32.

    h: (n, ..., r), the input of LoRA-B; grad_out: (n, ..., d_out), dL/dy of the loss
    that was backpropagated w.r.t. LoRA-B's output y = h B^T; c = ``multiplier``.
    G_n = sum_t dL/dy_{n,t} h_{n,t}^T (d_out, r) is the part of dL/dB that flows
    through example n (all of it when the loss is a sum or mean over examples).
    Computed as bmm(h_n^T, dL/dy_n), which is several times faster than the einsum
    that gives (d_out, r) directly; hence the transposed result.
    """
    return per_example_squared_grads(h, grad_out, multiplier)[0]


def per_example_squared_grads(h: torch.Tensor, grad_out: torch.Tensor,
                              multiplier: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_n (c G_n)^2 transposed to (r, d_out), u) in fp32, with u (n,) each example's mean squared entry,
    u_n = mean_ij (c G_n)_ij^2: example n's term of the ``mean`` score, what the bootstrap resamples.

    Same inputs and layout as :func:`per_example_squared_grad_sum`, from one bmm.
    """
    n = h.shape[0]
    h3 = h.reshape(n, -1, h.shape[-1]).float()
    g3 = grad_out.reshape(n, -1, grad_out.shape[-1]).float()
    per_example_t = torch.bmm(h3.transpose(1, 2), g3)  # (n, r, d_out) = G_n^T
    squared = per_example_t.square_().mul_(multiplier * multiplier)
    return squared.sum(0), squared.mean(dim=(1, 2))


# ---------------------------------------------------------------------------
# Accumulators: fp32 buffers, hooks, what happens after each backward


def _b_weights(infos: list[LoraModuleInfo], adapter_name: str) -> dict[str, torch.Tensor]:
    return {i.name: i.layer.lora_B[adapter_name].weight for i in infos}


def _first_nonfinite(tensors: dict[str, torch.Tensor]) -> str | None:
    return next((name for name, t in tensors.items() if not torch.isfinite(t).all()), None)


class BatchGradientEstimator:
    """F_m = (1/N) sum_b g_{m,b} (*) g_{m,b}, g_{m,b} = dL_b/dB_m the gradient of batch b's loss.

    Buffers: one fp32 (d_out, r) sum per module; count: batches.
    """

    unit = "batch"

    def __init__(self, infos: list[LoraModuleInfo], adapter_name: str, loss_scale: float):
        self.weights = _b_weights(infos, adapter_name)
        self.loss_scale = loss_scale
        self._sums = {n: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for n, w in self.weights.items()}
        self.n_batches = 0
        self.no_grad_modules: set[str] = set()
        self._units: list[torch.Tensor] = []

    def hooks(self) -> contextlib.AbstractContextManager:
        """No hooks: the batch gradient is what backward leaves in ``B.grad``."""
        return contextlib.nullcontext(self)

    def after_backward(self, batch_index: int) -> str | None:
        """Fold ``B.grad`` of every module into the sums and clear it.

        Returns the first module whose gradient is non-finite (nothing of this
        batch is counted then), else None.
        """
        grads = {n: w.grad for n, w in self.weights.items() if w.grad is not None}
        self.no_grad_modules.update(n for n in self.weights if n not in grads)
        bad = _first_nonfinite(grads)
        if bad is not None:
            return bad
        for w in self.weights.values():
            w.grad = None
        self._units.append(fold_batch(grads, self._sums, self.loss_scale, self.weights))
        self.n_batches += 1
        return None

    def sums(self) -> dict[str, torch.Tensor]:
        """Per-module sum_b g_b (*) g_b, (d_out, r) fp32: the buffers themselves (all-reduced in place)."""
        return dict(self._sums)

    def unit_scores(self) -> torch.Tensor | None:
        """(batches, modules) fp64 on the CPU: u_bm = mean_ij g_{m,b}^2, batch b's term of module m's mean score."""
        return _stack_units(self._units)

    def counts(self) -> dict[str, int]:
        return {n: self.n_batches for n in self._sums}


class HookedBatchEstimator:
    """The batch estimator (:class:`BatchGradientEstimator`'s F_m) from hooks instead of ``B.grad``.

    g_{m,b} = (1/s) sum_calls sum_{n,t} dL'/dy_{n,t} h_{n,t}^T (see :func:`batch_gradient_t`), with L' = s * L_b
    the backpropagated loss (a sum or mean, whatever the model's loss is: the hooks see its gradient). This is
    exactly dL_b/dB of this process's own batch even under FSDP2, where ``B.grad`` is a shard of the gradient
    averaged over processes. Buffers: one fp32 (r, d_out) sum per module, plus, during a backward, one fp32
    (r, d_out) gradient per module reached so far (freed after each batch); count: batches.
    """

    unit = "batch"

    def __init__(self, infos: list[LoraModuleInfo], adapter_name: str, loss_scale: float):
        self.adapter_name = adapter_name
        self.infos = infos
        self.weights = _b_weights(infos, adapter_name)
        self.loss_scale = loss_scale
        self.sums_t = {n: torch.zeros((w.shape[1], w.shape[0]), dtype=torch.float32, device=w.device)
                       for n, w in self.weights.items()}
        self.batch_grads_t: dict[str, torch.Tensor] = {}
        self.n_batches = 0
        self.no_grad_modules: set[str] = set()
        self._units: list[torch.Tensor] = []

    def add(self, name: str, h: torch.Tensor, grad_out: torch.Tensor) -> None:
        """One call of module ``name``: add its part of the batch gradient (called from the hooks)."""
        g = batch_gradient_t(h, grad_out)
        if name in self.batch_grads_t:
            self.batch_grads_t[name].add_(g)
        else:
            self.batch_grads_t[name] = g

    def hooks(self) -> contextlib.AbstractContextManager:
        return lora_b_hooks(self.infos, self.adapter_name, self)

    def after_backward(self, batch_index: int) -> str | None:
        """Fold this batch's gradients into the sums, drop ``B.grad`` (unused) and the per-batch buffers.

        Returns the first module whose gradient is non-finite (nothing of this batch is counted then), else None.
        """
        grads, self.batch_grads_t = self.batch_grads_t, {}
        for w in self.weights.values():
            w.grad = None
        self.no_grad_modules.update(n for n in self.weights if n not in grads)
        bad = _first_nonfinite(grads)
        if bad is not None:
            return bad
        self._units.append(fold_batch(grads, self.sums_t, self.loss_scale, self.weights))
        self.n_batches += 1
        return None

    def sums(self) -> dict[str, torch.Tensor]:
        """Per-module sum_b g_b (*) g_b, (d_out, r) fp32: fresh tensors shaped like B."""
        return {name: t.t().contiguous() for name, t in self.sums_t.items()}

    def counts(self) -> dict[str, int]:
        return {n: self.n_batches for n in self.sums_t}

    def unit_scores(self) -> torch.Tensor | None:
        """(batches, modules) fp64 on the CPU: u_bm = mean_ij g_{m,b}^2, batch b's term of module m's mean score."""
        return _stack_units(self._units)


class PerExampleEstimator:
    """F_m = (1/N_ex) sum_n g_{m,n} (*) g_{m,n}, g_{m,n} = dl_n/dB_m the gradient of example n's loss.

    In the same backward as the batch gradient: a forward hook on each LoRA-B
    linear keeps its input h and puts a tensor hook on its output, which
    receives dL/dy (see :func:`per_example_squared_grad_sum`). Buffers: one fp32
    (r, d_out) sum per module; count: examples, per call of the module whose
    output the loss depends on. The hooks sit on the nn.Linear lora_B itself, so
    they are the same for every supported layer type (bitsandbytes, Conv1D, DoRA);
    DoRA also calls lora_B on an identity matrix to get B A for its weight norm,
    which it detaches, so that call gets no gradient and is not counted.
    """

    unit = "example"

    def __init__(self, infos: list[LoraModuleInfo], adapter_name: str, loss_scale: float, loss_reduction: str):
        check_choice("loss_reduction", loss_reduction, LOSS_REDUCTIONS)
        self.adapter_name = adapter_name
        self.infos = infos
        self.weights = _b_weights(infos, adapter_name)
        self.loss_scale = loss_scale
        self.loss_reduction = loss_reduction
        self.sums_t = {n: torch.zeros((w.shape[1], w.shape[0]), dtype=torch.float32, device=w.device)
                       for n, w in self.weights.items()}
        self.examples = {n: 0 for n in self.weights}
        self.batch_calls = {n: 0 for n in self.weights}
        self.no_grad_modules: set[str] = set()
        self._units: dict[str, list[torch.Tensor]] = {n: [] for n in self.weights}

    def add(self, name: str, h: torch.Tensor, grad_out: torch.Tensor) -> None:
        """One call of module ``name``: add its examples' squared gradients (called from the hooks)."""
        c = per_example_multiplier(h.shape[0], self.loss_reduction, self.loss_scale)
        total, per_example = per_example_squared_grads(h, grad_out, c)
        self.sums_t[name].add_(total)
        self._units[name].append(per_example)
        self.examples[name] += h.shape[0]
        self.batch_calls[name] += 1

    def hooks(self) -> contextlib.AbstractContextManager:
        return lora_b_hooks(self.infos, self.adapter_name, self)

    def after_backward(self, batch_index: int) -> str | None:
        """Check this batch's calls, drop ``B.grad`` (unused, freed between batches), reset the per-batch counts.

        Returns the first module whose running sum turned non-finite (a non-finite
        per-example gradient in this batch), else None. Warns once, at batch 0, if
        a module ran more than once in one forward pass.
        """
        self.no_grad_modules.update(n for n, k in self.batch_calls.items() if k == 0)
        repeated = [n for n, k in self.batch_calls.items() if k > 1]
        if repeated and batch_index == 0:
            warnings.warn(
                f"{len(repeated)} LoRA module(s) ran more than once in one forward pass "
                f"(e.g. {repeated[0]!r}); the per_example estimator counts each call as its own term",
                stacklevel=5,  # after_backward <- _calibrate_batch <- _calibrate <- compute_fisher <- caller
            )
        for name, w in self.weights.items():
            w.grad = None
            self.batch_calls[name] = 0
        return _first_nonfinite(self.sums_t)

    def sums(self) -> dict[str, torch.Tensor]:
        """Per-module sum_n g_n (*) g_n, (d_out, r) fp32: fresh tensors shaped like B."""
        return {name: t.t().contiguous() for name, t in self.sums_t.items()}

    def counts(self) -> dict[str, int]:
        return dict(self.examples)

    def unit_scores(self) -> torch.Tensor | None:
        """(examples, modules) fp64 on the CPU: u_nm = mean_ij g_{m,n}^2, example n's term of module m's mean
        score; None unless every module saw the same examples once each (one call per forward, all on the loss
        path), since only then is an example one row of every module."""
        counts = set(self.examples.values())
        if len(counts) != 1 or not counts.pop():
            return None
        return torch.stack([torch.cat(v).double().cpu() for v in self._units.values()], dim=1)


Estimator = BatchGradientEstimator | HookedBatchEstimator | PerExampleEstimator


def fold_batch(grads: dict[str, torch.Tensor], sums: dict[str, torch.Tensor], loss_scale: float,
               weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """Add one batch's terms g (*) g (see :func:`batch_squared_grad`) to ``sums`` (in the gradients' layout) and
    return the batch's unit row (:func:`unit_row`)."""
    terms = {name: batch_squared_grad(g, loss_scale) for name, g in grads.items()}
    for name, term in terms.items():
        sums[name].add_(term)
    return unit_row(terms, weights)


def unit_row(terms: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """One batch's mean squared gradient per module, in ``weights``' order (0 for a module without gradient),
    as one fp32 device tensor: no host sync per module."""
    ref = next(iter(weights.values()))
    zero = torch.zeros((), dtype=torch.float32, device=ref.device)
    return torch.stack([terms[n].mean().to(zero.device) if n in terms else zero for n in weights])


def _stack_units(rows: list[torch.Tensor]) -> torch.Tensor | None:
    return torch.stack(rows).double().cpu() if rows else None


def make_estimator(
    name: str, infos: list[LoraModuleInfo], adapter_name: str, loss_scale: float, loss_reduction: str,
    hooked_batch: bool = False,
) -> Estimator:
    """The accumulator for estimator ``name`` (``"batch"`` or ``"per_example"``); only its buffers are allocated.

    ``hooked_batch``: the ``"batch"`` estimator from LoRA-B hooks (:class:`HookedBatchEstimator`), for models
    whose ``B.grad`` is not this process's batch gradient (FSDP2); else from ``B.grad``.
    """
    check_choice("estimator", name, ESTIMATORS)
    if name == "per_example":
        return PerExampleEstimator(infos, adapter_name, loss_scale, loss_reduction)
    if hooked_batch:
        return HookedBatchEstimator(infos, adapter_name, loss_scale)
    return BatchGradientEstimator(infos, adapter_name, loss_scale)


# ---------------------------------------------------------------------------
# Hook plumbing of the hooked estimators (per-example and hooked batch)

HookedEstimator = HookedBatchEstimator | PerExampleEstimator


def _lora_b_grad_hook(est: HookedEstimator, name: str, h: torch.Tensor, grad: torch.Tensor):
    # Counted here, not in the forward hook: a non-reentrant checkpoint recompute
    # runs the forward again, but gradients only flow through the original output.
    est.add(name, h, grad)
    return None


def _lora_b_forward_hook(est: HookedEstimator, name: str, module, inputs, output):
    # Under a no-grad forward (e.g. the first pass of reentrant checkpointing)
    # there is no backward for this output; the recomputed forward registers.
    if not isinstance(output, torch.Tensor) or not output.requires_grad:
        return None
    output.register_hook(functools.partial(_lora_b_grad_hook, est, name, inputs[0].detach()))
    return None


@contextlib.contextmanager
def lora_b_hooks(infos: list[LoraModuleInfo], adapter_name: str, est: HookedEstimator) -> Iterator[HookedEstimator]:
    """Attach hooks to every LoRA-B linear that pass (h, dL/dy) of each call to ``est.add``; always removed on exit.

    The forward hook keeps the input h (whole in every process, also when the weights are sharded: FSDP gathers
    them around the layer's forward and backward) and puts a tensor hook on the output, which receives dL/dy.
    """
    handles = []
    try:
        for info in infos:
            module = info.layer.lora_B[adapter_name]
            handles.append(module.register_forward_hook(functools.partial(_lora_b_forward_hook, est, info.name)))
        yield est
    finally:
        for h in handles:
            h.remove()
