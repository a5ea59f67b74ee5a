"""A recommended AdamW learning rate for a LoRA adapter, from a few calibration batches.

Two rules, each a statistic measured on the adapter as it will be trained (after the resize) and one fitted
constant per model family from ``lr_rule.json`` (:func:`fimlora.config.lr_rule_entry`; :func:`model_family`: a
causal LM or not, since the loss's curvature differs by orders of magnitude between them);
:func:`learning_rate_from_statistic` is the one formula from statistic to learning rate.

* ``"hessian"``: lambda_max, the largest eigenvalue of the Hessian H = d^2 L / d theta^2 of the calibration loss L
  (the model's own loss, a *mean* over tokens or examples as ``model(**batch).loss`` returns it, or ``loss_fn``'s)
  with respect to theta, every LoRA A (r, d_in) and B (d_out, r) weight of the adapter flattened into one vector
  (the base frozen), by Lanczos iteration (:func:`lanczos`) on Hessian-vector products Hv = d(g . v)/d theta,
  g = dL/d theta (double backward), one run per batch, averaged over the first ``batches`` batches. At PEFT's default
  initialisation B = 0 the A-A block of H is zero; the A-B and B-B blocks are not. The learning rate is
  ``constant / lambda_max``: gradient descent on a quadratic is stable below 2 / lambda_max.
* ``"range"``: a learning-rate range test: ``steps`` AdamW steps on the LoRA weights at learning rates
  log-spaced from ``RANGE_START`` to ``RANGE_END``, each step on the mean loss of the same ``batches`` batches
  (the gradient of their mean, so the losses before and after a step are comparable), stopping early when the loss
  is non-finite or above ``RANGE_DIVERGED`` times its start. The statistic is the learning rate eta_i of the step
  with the largest loss drop L_i - L_{i+1}; the learning rate is ``constant * eta_i``. Afterwards the LoRA weights,
  every buffer and the torch RNG states are restored bit for bit.

Both count the model's forward passes (a hook on the model) and backward passes (each ``torch.autograd.grad`` or
``backward``: a Hessian-vector product is one backward through the graph of g) and time themselves.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .config import (
    LR_BATCHES,
    LR_FAMILIES,
    LR_RULES,
    LR_STEPS,
    check_choice,
    check_int,
    check_number,
    first_line,
    lr_rule_entry,
)
from .fisher import _check_loss, _check_loss_finite, _to_device, default_loss
from .modules import lora_modules

__all__ = [
    "LrRecommendation",
    "compute_lr_recommendation",
    "learning_rate_from_statistic",
    "model_family",
    "power_iteration",
    "lanczos",
    "hessian_vector_product",
    "range_test_statistic",
    "DEFAULT_STEPS",
]

logger = logging.getLogger(__name__)

# Steps of each rule when none are given: Lanczos iterations (an upper bound; ``tol`` usually stops sooner) and
# range-test steps.
DEFAULT_STEPS = LR_STEPS
# The range test's learning rates: log-spaced over the span where LoRA's AdamW learning rates lie with room on
# both sides (typical values 1e-5..1e-3).
RANGE_START, RANGE_END = 1e-6, 1e-1
# The range test stops once the loss exceeds this multiple of its start: every later step only diverges further.
RANGE_DIVERGED = 4.0
# Relative change of the eigenvalue estimate between iterations below which the iteration stops.
# 1%: the constant is fitted against learning-rate grids with steps of about 3x, so a finer eigenvalue buys nothing
# and costs Hessian-vector products (each about two backward passes).
DEFAULT_TOL = 1e-2


@dataclass(frozen=True)
class LrRecommendation:
    """A recommended AdamW learning rate and what it came from (plain data; :meth:`to_dict` for JSON).

    Attributes:
        learning_rate: ``learning_rate_from_statistic(rule, statistic, family=family)``, or None when the rule's
            constant is not fitted for the model's family yet (``lr_rule.json``).
        rule: ``"hessian"`` or ``"range"``.
        statistic: lambda_max of the LoRA Hessian (``"hessian"``) or the range test's learning rate of steepest
            descent (``"range"``).
        constant: the rule's constant for the model's family (None when not fitted).
        passes: ``{"forward": n, "backward": n}``, the model's forward passes and the backward passes run.
        seconds: wall time of the estimate.
        fitted_on: where the constant was fitted (``lr_rule.json``), or None.
        details: per-rule record: per-batch eigenvalues and iterations, or the range test's learning rates and
            losses.
        family: the model family whose constant was used (:func:`model_family`; records written before families
            existed were all "encoder").
    """

    learning_rate: float | None
    rule: str
    statistic: float
    constant: float | None
    passes: dict
    seconds: float
    fitted_on: str | None
    details: dict = field(default_factory=dict)
    family: str = "encoder"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LrRecommendation:
        return cls(**d)

    @property
    def statistic_name(self) -> str:
        return "lambda_max" if self.rule == "hessian" else "range-test lr"

    def text(self) -> str:
        """One line for a terminal or a log: the learning rate (or "not fitted"), the statistic and the cost."""
        cost = f"{self.passes['forward']} forward + {self.passes['backward']} backward passes, {self.seconds:.1f} s"
        if self.learning_rate is None:
            return (f"learning rate: not fitted (rule {self.rule!r}: {self.statistic_name} = {self.statistic:.4g}; "
                    f"lr_rule.json has no {self.family} constant for it yet; {cost})")
        return (f"learning rate: {self.learning_rate:.3g} (AdamW; rule {self.rule!r}: {self.statistic_name} = "
                f"{self.statistic:.4g}, {self.family} constant {self.constant:g}; {cost})")

    def short_text(self) -> str:
        """A few words for a figure's title."""
        if self.learning_rate is None:
            return f"lr not fitted ({self.rule}: {self.statistic_name} {self.statistic:.3g})"
        return f"AdamW lr {self.learning_rate:.2g} ({self.rule})"


def learning_rate_from_statistic(rule: str, statistic: float, constant: float | None = None,
                                 family: str = "encoder") -> float | None:
    """The recommended learning rate of ``rule`` from its ``statistic``: ``constant / lambda_max`` (``"hessian"``)
    or ``constant * eta`` (``"range"``). ``constant`` defaults to ``lr_rule.json``'s for model ``family``; None
    when it is not fitted."""
    check_choice("rule", rule, LR_RULES)
    check_choice("family", family, LR_FAMILIES)
    check_number(f"statistic ({rule})", statistic, minimum=0)
    if constant is None:
        constant = lr_rule_entry(rule, family)["constant"]
    if constant is None:
        return None
    check_number(f"constant ({rule})", constant, minimum=0)
    return float(constant / statistic if rule == "hessian" else constant * statistic)


# ---------------------------------------------------------------------------
# The math: power iteration and the Hessian-vector product


def _dot(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(xs, ys)))


def power_iteration(hvp_fn: Callable[[list[torch.Tensor]], Sequence[torch.Tensor]], like: Sequence[torch.Tensor],
                    n_iterations: int = DEFAULT_STEPS["hessian"], tol: float = DEFAULT_TOL,
                    generator: torch.Generator | None = None, shift: float = 0.0) -> tuple[float, int]:
    """The eigenvalue of largest magnitude of a symmetric operator H given as ``hvp_fn(v) = H v``.

    ``v`` is a list of tensors shaped like ``like`` (one block per parameter; H acts on their concatenation).
    From a seeded Gaussian start v_0 (``generator``), v_{k+1} = H v_k / ||H v_k||; the estimate is the Rayleigh
    quotient lambda_k = v_k . H v_k (||v_k|| = 1). Stops when |lambda_k - lambda_{k-1}| <= tol * |lambda_k| or after
    ``n_iterations`` products. Returns (lambda, products computed). With ``shift`` s it iterates on H - s I and
    returns its eigenvalue + s: after a first run gave the most negative eigenvalue lambda_min, a run shifted by it
    converges to lambda_max (the top of H - lambda_min I, which is >= 0, is lambda_max - lambda_min).
    """
    check_int("n_iterations", n_iterations, minimum=1)
    check_number("tol", tol, minimum=0, strict=False)
    v = [torch.randn(t.shape, generator=generator, dtype=torch.float32).to(t) for t in like]
    norm = math.sqrt(_dot(v, v))
    v = [x / norm for x in v]
    estimate, done = None, 0
    for done in range(1, n_iterations + 1):
        hv = [h.detach() - shift * x for h, x in zip(hvp_fn(v), v)]
        new = _dot(v, hv)
        if not math.isfinite(new):
            raise ValueError(f"Hessian-vector product: non-finite at iteration {done} (v . Hv = {new})")
        norm = math.sqrt(_dot(hv, hv))
        converged = estimate is not None and abs(new - estimate) <= tol * abs(new)
        estimate = new
        if converged or norm == 0:
            break
        v = [h / norm for h in hv]
    return float(estimate) + shift, done


def lanczos(hvp_fn: Callable[[list[torch.Tensor]], Sequence[torch.Tensor]], like: Sequence[torch.Tensor],
            n_iterations: int = DEFAULT_STEPS["hessian"], tol: float = DEFAULT_TOL,
            generator: torch.Generator | None = None) -> tuple[float, int]:
    """lambda_max, the largest (algebraic) eigenvalue of a symmetric operator H given as ``hvp_fn(v) = H v``.

    Lanczos: from a seeded Gaussian q_1 (``generator``, blocks shaped like ``like``), w = H q_k - beta_{k-1}
    q_{k-1}, alpha_k = q_k . H q_k, w -= alpha_k q_k, beta_k = ||w||, q_{k+1} = w / beta_k; the estimate is the top
    eigenvalue of the k x k tridiagonal matrix T_k (alpha on the diagonal, beta beside it). Stops when it moves by
    at most tol * |estimate| between products, when beta_k vanishes (an invariant subspace: T_k is exact) or after
    ``n_iterations`` products; returns (estimate, products computed). Why not :func:`power_iteration`: at B = 0 the
    LoRA Hessian is dominated by its A-B cross block, whose eigenvalues come in pairs +-sigma, so the largest
    magnitude is nearly tied between lambda_max and lambda_min and power iteration converges as (lambda_min /
    lambda_max)^k, i.e. not in a handful of steps; T_k's top eigenvalue has no such tie. Only three vectors are
    kept (no reorthogonalisation: lost orthogonality repeats Ritz values but leaves the top one correct).
    """
    check_int("n_iterations", n_iterations, minimum=1)
    check_number("tol", tol, minimum=0, strict=False)
    q = [torch.randn(t.shape, generator=generator, dtype=torch.float32).to(t) for t in like]
    norm = math.sqrt(_dot(q, q))
    q = [x / norm for x in q]
    previous, alphas, betas = None, [], []
    estimate, done = math.nan, 0
    for done in range(1, n_iterations + 1):
        w = [h.detach() for h in hvp_fn(q)]
        if betas:
            w = [x - betas[-1] * p for x, p in zip(w, previous)]
        alpha = _dot(q, w)
        if not math.isfinite(alpha):
            raise ValueError(f"Hessian-vector product: non-finite at iteration {done} (q . Hq = {alpha})")
        alphas.append(alpha)
        w = [x - alpha * y for x, y in zip(w, q)]
        beta = math.sqrt(_dot(w, w))
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            T += torch.diag(off, 1) + torch.diag(off, -1)
        new = float(torch.linalg.eigvalsh(T)[-1])
        converged = done > 1 and abs(new - estimate) <= tol * abs(new)
        estimate = new
        if converged or beta <= 1e-12 * max(abs(a) for a in alphas):
            break
        betas.append(beta)
        previous, q = q, [x / beta for x in w]
    return estimate, done


def hessian_vector_product(grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                           v: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """H v = d(g . v)/d theta for ``grads`` g = dL/d theta computed with ``create_graph=True``; the graph is kept for
    the next product. A parameter g does not depend on (an A block at B = 0) gets zeros."""
    hv = torch.autograd.grad(grads, params, grad_outputs=list(v), retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if h is None else h for h, p in zip(hv, params)]


def range_test_statistic(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """The range test's rule: with L_i the loss before step i (taken at learning rate lrs[i]) and L_{i+1} after it,
    the lrs[i] of the largest drop L_i - L_{i+1}. ``losses`` has one more entry than the steps it covers (a test
    stopped early passes fewer). No step lowers the loss: ValueError."""
    drops = [(losses[i] - losses[i + 1], i) for i in range(len(losses) - 1)]
    best = max(drops, default=(0.0, -1))
    if not best[0] > 0:
        raise ValueError(f"lr_rule: 'range': no step of the range test lowered the loss (learning rates "
                         f"{[f'{x:.2g}' for x in lrs]}, losses {[f'{x:.4g}' for x in losses]}); use lr_rule='hessian'")
    return float(lrs[best[1]])


# ---------------------------------------------------------------------------
# The model plumbing


def lora_weights(model: nn.Module, adapter_name: str = "default") -> list[nn.Parameter]:
    """Every LoRA A and B weight of ``adapter_name``, in module order (A then B per module), whatever built them."""
    params = []
    for info in lora_modules(model, adapter_name, any_init=True):
        params += [info.layer.lora_A[adapter_name].weight, info.layer.lora_B[adapter_name].weight]
    return params


@contextlib.contextmanager
def _restored(model: nn.Module, params: Sequence[nn.Parameter]):
    """On exit, whatever happened: ``params``, every buffer, each parameter's ``requires_grad`` and ``.grad``,
    every module's train flag and the torch RNG states (CPU and every CUDA device) exactly as they were."""
    saved = [p.detach().clone() for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    everything = list(model.parameters())
    flags = [(p, p.requires_grad, p.grad) for p in everything]
    modes = {m: m.training for m in model.modules()}
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
            for b, s in buffers:
                b.copy_(s)
        for p, req, g in flags:
            p.requires_grad_(req)
            p.grad = g
        for m, mode in modes.items():
            m.training = mode
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


class _Counter:
    """Forward passes of the model (a forward hook) and backward passes (counted where they are run)."""

    def __init__(self, model: nn.Module):
        self.forward = self.backward = 0
        self._handle = model.register_forward_hook(self._seen)

    def _seen(self, *_):
        self.forward += 1

    def close(self) -> dict:
        self._handle.remove()
        return {"forward": self.forward, "backward": self.backward}


def _loss(model: nn.Module, loss_fn, batch, device: torch.device, index: int, adapter_name: str) -> torch.Tensor:
    """Batch ``index``'s loss, checked as calibration checks it: a scalar, finite, depending on the adapter."""
    loss = loss_fn(model, _to_device(batch, device))
    _check_loss(loss, index, adapter_name)
    _check_loss_finite(loss, index)
    return loss


def _math_attention():
    """PyTorch's math attention kernel, the one with a double backward (the fused ones have none)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - older torch
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def _hessian(model, params, batches, loss_fn, device, counter: _Counter, steps: int, tol: float, seed: int,
             adapter_name: str):
    eigenvalues, iterations = [], []
    generator = torch.Generator().manual_seed(seed)
    for b, batch in enumerate(batches):
        with _math_attention():
            loss = _loss(model, loss_fn, batch, device, b, adapter_name)
            try:
                grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
                counter.backward += 1
                # A gradient with no graph is constant in theta: its rows of H are zero.
                grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
                if not any(g.requires_grad for g in grads):
                    raise ValueError("the loss is linear in the LoRA weights: the Hessian is zero")

                def hvp(v, grads=grads):
                    counter.backward += 1
                    live = [(g, p, x) for g, p, x in zip(grads, params, v) if g.requires_grad]
                    hv = iter(hessian_vector_product(*map(list, zip(*live))))
                    return [next(hv) if g.requires_grad else torch.zeros_like(p) for g, p in zip(grads, params)]

                lam, n = lanczos(hvp, params, steps, tol, generator)
            except ValueError as e:
                raise ValueError(f"lr_rule: 'hessian': calibration batch {b}: {first_line(e)}") from e
            except RuntimeError as e:
                raise ValueError(f"lr_rule: 'hessian' failed on calibration batch {b} ({first_line(e)}); double "
                                 "backward may be unsupported by this model (gradient checkpointing, fused attention "
                                 "kernels): use lr_rule='range'") from e
        eigenvalues.append(lam)
        iterations.append(n)
        del loss, grads
    statistic = sum(eigenvalues) / len(eigenvalues)
    if not statistic > 0:
        raise ValueError(f"lr_rule: 'hessian': lambda_max must be > 0 for constant / lambda_max, got {statistic:.4g} "
                         f"(per batch {eigenvalues}); use lr_rule='range'")
    return statistic, {"eigenvalues": eigenvalues, "iterations": iterations, "tol": tol}


def _range(model, params, batches, loss_fn, device, counter: _Counter, steps: int, adapter_name: str):
    lrs = [RANGE_START * (RANGE_END / RANGE_START) ** (i / (steps - 1)) for i in range(steps)]
    optimizer = torch.optim.AdamW(params, lr=lrs[0])

    def mean_loss(backward: bool, first: bool = False) -> float:
        total = 0.0
        for b, batch in enumerate(batches):
            # Always with autograd on, even for the last loss that no backward follows: quantised layers take
            # another kernel without it (bitsandbytes' 4-bit inference path), which fails on shapes calibration and
            # training run fine.
            with torch.enable_grad():
                loss = loss_fn(model, _to_device(batch, device))
            if backward:
                _check_loss(loss, b, adapter_name)
            if first:
                _check_loss_finite(loss, b)
            value = float(loss.detach())
            if backward and math.isfinite(value):
                (loss / len(batches)).backward()
                counter.backward += 1
            total += value / len(batches)
        return total

    losses = []
    for i, lr in enumerate(lrs):
        optimizer.zero_grad(set_to_none=True)
        losses.append(mean_loss(backward=True, first=i == 0))
        if not math.isfinite(losses[-1]) or losses[-1] > RANGE_DIVERGED * losses[0]:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
    else:
        losses.append(mean_loss(backward=False))
    statistic = range_test_statistic(lrs, [x if math.isfinite(x) else math.inf for x in losses])
    return statistic, {"learning_rates": lrs[:len(losses) - 1], "losses": losses}


def compute_lr_recommendation(model: nn.Module, batches: Iterable, rule: str = "hessian", *, loss_fn=None,
                              adapter_name: str = "default", n_batches: int = LR_BATCHES, steps: int | None = None,
                              tol: float = DEFAULT_TOL, seed: int = 0, train_mode: bool = False) -> LrRecommendation:
    """A recommended AdamW learning rate for training the LoRA adapter ``adapter_name`` of ``model`` as it is now.

    Reads the first ``n_batches`` of ``batches`` (loss: ``model(**batch).loss``, a mean, or ``loss_fn(model,
    batch)``); ``rule`` and ``steps`` (power iterations, or range-test steps; default :data:`DEFAULT_STEPS`) as in
    the module's docstring; ``seed`` draws the power iteration's start. Runs in eval mode unless ``train_mode``.
    The model is returned exactly as it was (weights, buffers, ``requires_grad``, ``.grad``, train flags, torch RNG
    states), also on error. Errors name the setting: no LoRA weights, no batches, a non-finite loss or
    Hessian-vector product.
    """
    check_choice("rule", rule, LR_RULES)
    check_int("n_batches", n_batches, minimum=1)
    steps = DEFAULT_STEPS[rule] if steps is None else steps
    check_int("steps", steps, minimum=2)
    params = lora_weights(model, adapter_name)
    if not params:
        raise ValueError(f"model: adapter {adapter_name!r} has no LoRA A/B weights to recommend a learning rate for")
    taken = [b for _, b in zip(range(n_batches), batches)]
    if not taken:
        raise ValueError(f"batches: empty; lr_rule {rule!r} needs at least one calibration batch")
    loss_fn = loss_fn or default_loss
    device = params[0].device
    start = time.perf_counter()
    counter = _Counter(model)
    try:
        with _restored(model, params):
            for p in model.parameters():
                p.requires_grad_(False)
                p.grad = None
            for p in params:
                p.requires_grad_(True)
            model.train(train_mode)
            if rule == "hessian":
                statistic, details = _hessian(model, params, taken, loss_fn, device, counter, steps, tol, seed,
                                                 adapter_name)
            else:
                statistic, details = _range(model, params, taken, loss_fn, device, counter, steps, adapter_name)
    finally:
        passes = counter.close()
    family = model_family(model, adapter_name)
    entry = lr_rule_entry(rule, family)
    details["batches"] = len(taken)
    rec = LrRecommendation(learning_rate=learning_rate_from_statistic(rule, statistic, family=family), rule=rule,
                           statistic=statistic, constant=entry["constant"], passes=passes,
                           seconds=time.perf_counter() - start, fitted_on=entry["fitted_on"], details=details,
                           family=family)
    logger.info("fimlora: %s", rec.text())
    if rec.learning_rate is not None and entry["warning"]:
        warnings.warn(f"lr_rule: {entry['warning']}", UserWarning, stacklevel=2)
    return rec


def model_family(model: nn.Module, adapter_name: str = "default") -> str:
    """The family whose fitted constant a model's recommendation uses: ``"causal_lm"`` (:func:`is_causal_lm`) or
    ``"encoder"`` (every other model; the constant was fitted on encoder classifiers)."""
    return "causal_lm" if is_causal_lm(model, adapter_name) else "encoder"


def is_causal_lm(model: nn.Module, adapter_name: str = "default") -> bool:
    """A decoder language model: PEFT task type CAUSAL_LM, or a ``*ForCausalLM`` under the PEFT wrappers."""
    configs = getattr(model, "peft_config", None)
    config = configs.get(adapter_name) if isinstance(configs, dict) else None
    if str(getattr(config, "task_type", "") or "").rsplit(".", 1)[-1] == "CAUSAL_LM":
        return True
    base = getattr(model, "base_model", None)  # PeftModel -> LoraModel -> the transformers model
    candidates = (model, base, getattr(base, "model", None))
    return any(type(m).__name__.endswith("ForCausalLM") for m in candidates if m is not None)

