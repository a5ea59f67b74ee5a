"""GoRA (He et al., "GoRA: Gradient-driven Adaptive Low Rank Adaptation", NeurIPS 2025, arXiv 2502.12171), as its
reference code does it: ``common/lora_modules/gora.py`` of github.com/hhnqqq/MyTransformers (commit 4037d4d6,
read 2026), with the settings of its published scripts (``scripts/gora/*.sh``: ``--gora-init-method compress
--gora-importance-type union_mean --gora-min-rank 4 --gora-max-rank 32 --lora-rank 8 --lora-scaler 16
--gora-scale-by-lr --gora-lr 5e-2 --gora-rank-stablize --gora-dynamic-scaling --weight-a-init-method kaiming``).

For every target module m with base weight W_m (d_out, d_in):

1. Gradient (``gora_reinit``, L506-589; hook in ``grad_utils.py``): G_m = (1/N) sum_b dL_b/dW_m over N calibration
   batches, model in train mode, everything but the target weights frozen.
2. Importance (``compute_importance``, L253-265, type ``union_mean``): I_m = mean_ij |W_m ⊙ G_m|.
3. Ranks (``get_allocated_rank``, L309-377; ``get_normalized_importances`` L298-307, no softmax, no feature
   function, allocate strategy "moderate" = Python ``round``): with f_m = d_in + d_out, budget T = sum_m f_m r,
   p_m = I_m / sum_k I_k, r_m = min(max(round(T p_m) // f_m, r_min), r_max). The clamp can spend more than T.
4. Scale (``_get_scaling``, L99-107, rank_stablize and dynamic_scaling): s_m = alpha / sqrt(r_m): rsLoRA's scale
   with one alpha for every module (PEFT: ``use_rslora=True``, alpha_pattern alpha everywhere).
5. Init (``grad_compress_init``, L142-184, ``scaling_by_lr``): A_m (r_m, d_in) kaiming-uniform as LoRA's usual A,
   B_m = -(gamma_m / alpha) G_m A_m^T (A_m A_m^T + 1e-8 I)^+ with gamma_m = (eta / sqrt(r_m / d_in)) sqrt(r_m), so
   s_m B_m A_m = -eta sqrt(d_in / r_m) G_m A_m^+ A_m: one step of gradient descent on W, projected onto A_m's row
   space. In terms of a module's own scale s_m this is B_m = -(eta sqrt(d_in / r_m) / s_m) G_m A_m^+, which is how
   :func:`gora_b` is written, so it also serves an adapter with another scale rule (``fim_gora``). The base weight
   is not changed (``reinit_weight`` is False there), so the initial model is *not* the base model.

Init step (setting ``lr_search``): eta is a learning rate too (issue 30), and the fixed 5e-2 of GoRA's scripts was
chosen for their models, not ours. With ``lr_search: [eta_1, ...]`` the step is chosen per run by a line search
along GoRA's own direction (:func:`choose_gora_lr`): the candidate of lowest mean loss on calibration batches held
out from the gradient (the ``n_batches`` after those G was averaged over), a tie to the smaller step. It costs one
forward per candidate and held-out batch, no backward.

Sign (setting ``sign``): the paper initialises the adapter as one step of gradient descent, -eta G, and the
reference code's own diagnostic (L185) measures the distance to -eta G; the code itself sets B from +G (L178; its
gradient hook stores p.grad unchanged, ``grad_utils.py``), a step *up* the calibration loss. ``descent`` (the
default) is the paper's method; ``ascent`` reproduces the code line as published. Measured here: on SmolLM2 the
ascent init starts training at about three times the loss of every other method and ends below the un-tuned model
(frontier_decoder, r = 8: 52-57% against 66% un-tuned).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..modules import LoraModuleInfo, lora_modules
from .registry import (
    CALIBRATION_BATCHES,
    GORA_LR,
    GORA_MAX_RANK_RATIO,
    GORA_MIN_RANK_RATIO,
    GORA_SIGN_DEFAULT,
    GORA_SIGNS,
)

__all__ = ["mean_weight_gradients", "gora_importance", "gora_rank_bounds", "gora_ranks", "gora_b", "apply_gora_init",
           "choose_gora_lr"]

# GoRA's defaults are declared once, with its settings block (bench/registry.py): the published scripts'
# rank bounds 4 and 32 at rank 8 and step 5e-2, the paper's descent, and the harness's calibration size (GoRA's
# scripts take 32 steps of 4 x 8 GPUs).
DEFAULT_MIN_RANK_RATIO = GORA_MIN_RANK_RATIO
DEFAULT_MAX_RANK_RATIO = GORA_MAX_RANK_RATIO
DEFAULT_LR = GORA_LR
SIGNS = GORA_SIGNS
DEFAULT_SIGN = GORA_SIGN_DEFAULT
DEFAULT_N_BATCHES = CALIBRATION_BATCHES
# The ridge GoRA adds before the pseudo-inverse (L174).
PINV_RIDGE = 1e-8


def mean_weight_gradients(model: nn.Module, batches: Iterable, n_batches: int,
                          infos: list[LoraModuleInfo] | None = None) -> dict[str, torch.Tensor]:
    """{module name: G_m (d_out, d_in)}, the mean over the first ``n_batches`` batches of dL_b/dW_m for the base
    weight of every LoRA module of ``model`` (a fresh adapter: B = 0, so these are the base model's gradients).

    Train mode, as GoRA's ``gora_reinit`` (L510); ``torch.autograd.grad`` on the base weights only, so no
    parameter's ``.grad`` or ``requires_grad`` is left changed. fp32 sums whatever the weights' dtype.
    """
    infos = infos if infos is not None else lora_modules(model)
    weights = [i.layer.get_base_layer().weight for i in infos]
    was_training, flags = model.training, [w.requires_grad for w in weights]
    sums = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) for w in weights]
    count = 0
    model.train()
    try:
        for w in weights:
            w.requires_grad_(True)
        for batch in itertools.islice(batches, n_batches):
            for acc, g in zip(sums, torch.autograd.grad(model(**batch).loss, weights)):
                acc += g.float()
            count += 1
    finally:
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
        model.train(was_training)
    if count == 0:
        raise ValueError("gora.n_batches: the calibration data gave no batch; need at least one")
    return {i.name: acc / count for i, acc in zip(infos, sums)}


def gora_importance(weight: torch.Tensor, grad: torch.Tensor) -> float:
    """I = mean |W ⊙ G| over the (d_out, d_in) entries (GoRA's ``union_mean``, L264-265), in fp32 as L254-255."""
    return float(torch.mean(torch.abs(weight.float() * grad.float())))


def gora_rank_bounds(r: int, min_rank_ratio: float = DEFAULT_MIN_RANK_RATIO,
                     max_rank_ratio: float = DEFAULT_MAX_RANK_RATIO) -> tuple[int, int]:
    """(r_min, r_max) for base rank r: round(ratio * r), at least 1 (the scripts' 4 and 32 at r = 8)."""
    lo = max(1, int(round(min_rank_ratio * r)))
    return lo, max(lo, int(round(max_rank_ratio * r)))


def gora_ranks(importances: Mapping[str, float], features: Mapping[str, int], r: int, r_min: int,
               r_max: int) -> dict[str, int]:
    """GoRA's allocation (L309-377): T = sum_m f_m r, p_m = I_m / sum I, r_m = clamp(round(T p_m) // f_m).

    ``features`` are f_m = d_in + d_out (parameters per unit of rank). Python's ``round`` (half to even) and
    integer floor division, as the reference. Plain ints out, in ``importances``' order.
    """
    total = sum(importances.values())
    if not total > 0:
        raise ValueError(f"gora: importances must have a positive sum (mean |W * G| over the calibration "
                         f"batches), got {total!r}; are the target modules on the loss path?")
    budget = sum(features[n] * r for n in importances)
    out = {}
    for name, importance in importances.items():
        trainable = round(budget * (importance / total))
        out[name] = int(min(max(trainable // features[name], r_min), r_max))
    return out


def gora_b(grad: torch.Tensor, a: torch.Tensor, scaling: float, lr: float = DEFAULT_LR,
           sign: str = DEFAULT_SIGN) -> torch.Tensor:
    """GoRA's B (d_out, r) for A (r, d_in), mean gradient G (d_out, d_in) and the module's scale s (L170-182).

    B = -/+ (eta sqrt(d_in / r) / s) G A^T (A A^T + 1e-8 I)^+, so s B A = -/+ eta sqrt(d_in / r) G A^+ A: minus for
    ``sign="descent"`` (the paper), plus for ``"ascent"`` (the reference code's L178). fp32, as L153.
    """
    if sign not in SIGNS:
        raise ValueError(f"sign: must be one of {SIGNS}, got {sign!r}")
    r, d_in = a.shape
    a = a.float()
    ridge = PINV_RIDGE * torch.eye(r, dtype=torch.float32, device=a.device)
    a_pinv = a.T @ torch.linalg.pinv(a @ a.T + ridge)
    step = (-1.0 if sign == "descent" else 1.0) * lr * math.sqrt(d_in / r) / scaling
    return step * (grad.float().to(a.device) @ a_pinv)


@torch.no_grad()
def apply_gora_init(model: nn.Module, grads: Mapping[str, torch.Tensor], lr: float = DEFAULT_LR,
                    adapter_name: str = "default", sign: str = DEFAULT_SIGN) -> None:
    """Set every LoRA module's B to :func:`gora_b` of its gradient, its A and its own scale; A and W unchanged."""
    infos = lora_modules(model, adapter_name)
    _check_grads(infos, grads)
    for info in infos:
        b = info.layer.lora_B[adapter_name].weight
        new = gora_b(grads[info.name], info.layer.lora_A[adapter_name].weight, info.layer.scaling[adapter_name], lr,
                     sign)
        b.copy_(new.to(b.dtype))


def _check_grads(infos: list[LoraModuleInfo], grads: Mapping[str, torch.Tensor]) -> None:
    missing = [i.name for i in infos if i.name not in grads]
    if missing:
        raise ValueError(f"grads: no gradient for LoRA module(s) {missing[:3]}; compute them on this model's base")


@torch.no_grad()
def choose_gora_lr(model: nn.Module, grads: Mapping[str, torch.Tensor], candidates: Iterable[float],
                   batches: Iterable, adapter_name: str = "default", sign: str = DEFAULT_SIGN) -> tuple[float, dict]:
    """(eta*, {eta: mean loss}): GoRA's init step by line search. For each candidate eta, B_m = :func:`gora_b` (G_m,
    A_m, s_m, eta) on every module, and L(eta) = (1/K) sum_k L_k, the mean over the K ``batches`` of each batch's
    loss as the model returns it (a mean over its examples or tokens), in eval mode (no dropout); eta* = argmin
    L(eta), a tie to the smaller eta. The batches must not be those G was averaged over (the step would be judged
    on the data it was fitted to). The model's B and train/eval mode are restored: only :func:`apply_gora_init`
    changes it.
    """
    etas = sorted(float(c) for c in candidates)
    if not etas or any(not (math.isfinite(e) and e > 0) for e in etas):
        raise ValueError(f"gora.lr_search: must be a non-empty list of positive finite steps, got {etas!r}")
    batches = list(batches)
    if not batches:
        raise ValueError("gora.lr_search: no calibration batch is left after the gradient's n_batches to judge the "
                         "step on; use more training data or fewer gora.n_batches")
    infos = lora_modules(model, adapter_name)
    _check_grads(infos, grads)
    # B is linear in eta: the pseudo-inverse and G A^+ once per module, one scaled copy per candidate.
    unit = [gora_b(grads[i.name], i.layer.lora_A[adapter_name].weight, i.layer.scaling[adapter_name], 1.0, sign)
            for i in infos]
    saved = [i.layer.lora_B[adapter_name].weight.detach().clone() for i in infos]
    was_training = model.training
    losses = {}
    model.eval()
    try:
        for eta in etas:
            for info, b in zip(infos, unit):
                weight = info.layer.lora_B[adapter_name].weight
                weight.copy_((eta * b).to(weight.dtype))
            total = 0.0
            for batch in batches:
                total += float(model(**batch).loss)
            losses[eta] = total / len(batches)
    finally:
        for info, b in zip(infos, saved):
            info.layer.lora_B[adapter_name].weight.copy_(b)
        model.train(was_training)
    finite = [(loss, eta) for eta, loss in losses.items() if math.isfinite(loss)]
    if not finite:
        raise ValueError(f"gora.lr_search: the loss is not finite at any step {etas}; the gradients or data are bad")
    return min(finite)[1], losses
