"""The methods of the experiment harness, each implemented for real.

* ``lora``: uniform rank r.
* ``fim``: FIM-LoRA (this package), same budget L*r.
* ``random``: seeded random scores through the same allocator and budget.
* ``eva``: PEFT's EVA; ``initialize_lora_eva_weights`` runs and its rank_pattern is recorded.
* ``adalora``: PEFT's AdaLoRA, ``update_and_allocate`` called after every optimizer step by
  :class:`AdaLoraCallback`, budget matched to r (target_r = r).
* ``rslora``: uniform rank r with rsLoRA's scale alpha / sqrt(r) (``use_rslora=True``).
* ``pissa``: PEFT's PiSSA (``init_lora_weights="pissa"`` or ``"pissa_niter_K"``): with W = U S V^T,
  A = sqrt(S_r / s) V_r^T, B = U_r sqrt(S_r / s) and the base weight becomes W_res = W - s B A, so the initial
  output equals the base model's. The base weights change, so the trained adapter is saved converted to plain
  LoRA (:func:`save_adapter`): a stock reload onto the *unchanged* base gives the trained model.
* ``lora_ga``: PEFT's LoRA-GA (``init_lora_weights="lora_ga"``, ``LoraGAConfig``, ``preprocess_loraga``): A and
  B from the SVD of the calibration batches' mean gradient of W, W becomes W - s B A; saved like PiSSA.
* ``gora``: GoRA (:mod:`fimlora.bench.gora`): ranks from the accumulated gradient of W over a parameter
  budget, B from the pseudo-inverse of A applied to that gradient; the base weights are not touched.
* ``fim_eva``, ``fim_pissa``, ``fim_lora_ga``, ``fim_gora``, ``fim_rslora``: FIM-LoRA's ranks with EVA's
  directions, PiSSA's init, LoRA-GA's init, GoRA's B, or rsLoRA's scale.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import TrainerCallback

from ..api import apply_fim_ranks, compute_allocation, random_allocation
from ..app.builders import build_peft_model, normalize_target_modules
from ..config import FimConfig, check_int
from ..modules import lora_modules
from ..resize import apply_allocation, lora_config_for_allocation
from .registry import CALIBRATION_BATCHES, EVA_RHO, method_info, method_names, settings_block

__all__ = ["METHODS", "MethodSpec", "AdaLoraCallback", "prepare_method", "final_rank_map", "adalora_schedule",
           "mutates_base", "save_adapter", "pissa_init"]

logger = logging.getLogger(__name__)

# Every registered method (.registry), in the report's order.
METHODS = method_names()

# Returns a fresh iterable of model-input batches (with labels) each time it is called.
BatchFactory = Callable[[], Iterable]


@dataclass
class MethodSpec:
    """Everything a method needs besides the base model and the data."""

    method: str
    r: int
    lora_alpha: float
    target_modules: list[str] | None
    task_type: str  # SEQ_CLS | CAUSAL_LM
    lora_dropout: float = 0.0
    seed: int = 0
    fim: dict = field(default_factory=dict)  # FimConfig fields
    eva_rho: float = EVA_RHO
    adalora: dict = field(default_factory=dict)  # init_r_ratio, tinit_ratio, tfinal_ratio, deltaT, orth_reg_weight
    pissa: dict = field(default_factory=dict)  # niter
    lora_ga: dict = field(default_factory=dict)  # direction, scale, stable_gamma
    gora: dict = field(default_factory=dict)  # min_rank_ratio, max_rank_ratio, lr
    total_steps: int | None = None

    def __post_init__(self) -> None:
        method_info(self.method)  # a registered method, or a ValueError naming them
        check_int("r", self.r, minimum=1)
        self.target_modules = normalize_target_modules(self.target_modules)


# The adalora block's defaults (.registry), as this function's.
_ADALORA = settings_block("adalora").settings


def adalora_schedule(total_steps: int, r: int, init_r_ratio: float = _ADALORA["init_r_ratio"].default,
                     tinit_ratio: float = _ADALORA["tinit_ratio"].default,
                     tfinal_ratio: float = _ADALORA["tfinal_ratio"].default,
                     deltaT: int = _ADALORA["deltaT"].default) -> dict:
    """AdaLoRA's schedule in steps, validated: tinit < total_step - tfinal, with tinit = round(tinit_ratio T),
    tfinal = round(tfinal_ratio T) and init_r = max(r, ceil(init_r_ratio r))."""
    if total_steps is None or total_steps < 1:
        raise ValueError(f"adalora.total_step: must be a positive number of optimizer steps, got {total_steps!r}")
    tinit = int(round(tinit_ratio * total_steps))
    tfinal = int(round(tfinal_ratio * total_steps))
    if not tinit < total_steps - tfinal:
        raise ValueError(
            f"adalora: tinit < total_step - tfinal is violated: tinit={tinit}, total_step={total_steps}, "
            f"tfinal={tfinal} (from tinit_ratio={tinit_ratio}, tfinal_ratio={tfinal_ratio}); "
            "train longer or lower the ratios"
        )
    return {"init_r": max(r, int(math.ceil(init_r_ratio * r))), "target_r": r, "tinit": tinit, "tfinal": tfinal,
            "deltaT": max(1, int(deltaT)), "total_step": int(total_steps)}


class AdaLoraCallback(TrainerCallback):
    """Calls ``update_and_allocate`` after ``optimizer.step()`` and before ``zero_grad()``.

    The Trainer's ``on_optimizer_step`` hook sits exactly there; without this,
    AdaLoRA trains at init_r and never prunes.
    """

    def __init__(self, model):
        self.model = model
        self.calls = 0

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.model.base_model.update_and_allocate(state.global_step)
        self.calls += 1
        return control


def prepare_method(
    spec: MethodSpec, base_model: nn.Module, calibration_batches: BatchFactory | None = None
) -> tuple[nn.Module, dict, list]:
    """Wrap ``base_model`` for ``spec.method``; returns (peft model, info, trainer callbacks).

    ``calibration_batches()`` returns a fresh iterable of model-input batches
    (with labels) for fim and eva. ``info`` has the method, calibration seconds
    and what the method decided: scores (fim, random), forward passes and ranks
    (eva), the schedule (adalora).
    """
    torch.manual_seed(spec.seed)  # LoRA's A initialisation follows the run's seed
    prepare = method_info(spec.method).prepare_function()
    model, info, callbacks = prepare(spec, base_model, calibration_batches)
    return model, {"method": spec.method, "calibration_seconds": 0.0, **info}, callbacks


def _lora_config(spec: MethodSpec, **extra):
    """The LoraConfig of ``spec`` (rank r everywhere), with ``extra`` LoraConfig fields."""
    from peft import LoraConfig

    return LoraConfig(r=spec.r, lora_alpha=spec.lora_alpha, target_modules=spec.target_modules,
                      lora_dropout=spec.lora_dropout, task_type=spec.task_type, **extra)


def _uniform_lora(spec: MethodSpec, base_model: nn.Module, **extra) -> nn.Module:
    return build_peft_model(base_model, _lora_config(spec, **extra), seed=None)


def _prepare_lora(spec: MethodSpec, base_model: nn.Module,
                  calibration_batches: BatchFactory | None) -> tuple[nn.Module, dict, list]:
    """Plain LoRA: rank r on every target module."""
    return _uniform_lora(spec, base_model), {}, []


def _prepare_rslora(spec: MethodSpec, base_model: nn.Module,
                    calibration_batches: BatchFactory | None) -> tuple[nn.Module, dict, list]:
    """rsLoRA (Kalajdzievski, 2023): rank r on every target module, scale alpha / sqrt(r) instead of alpha / r."""
    return _uniform_lora(spec, base_model, use_rslora=True), {}, []


def _prepare_fim(spec: MethodSpec, base_model: nn.Module,
                 calibration_batches: BatchFactory | None, **extra) -> tuple[nn.Module, dict, list]:
    """FIM-LoRA: uniform LoRA, then ranks from the Fisher of LoRA-B on the calibration batches."""
    model = _uniform_lora(spec, base_model, **extra)
    cfg = _fim_config(spec)
    start = time.perf_counter()
    alloc = apply_fim_ranks(model, calibration_batches(), config=cfg)
    return model, {"calibration_seconds": time.perf_counter() - start, **fim_info(alloc)}, []


def _prepare_fim_rslora(spec: MethodSpec, base_model: nn.Module,
                        calibration_batches: BatchFactory | None) -> tuple[nn.Module, dict, list]:
    """FIM-LoRA on an rsLoRA adapter: the Fisher is taken at scale alpha / sqrt(r), and each module's alpha
    follows the fim ``scale`` rule under rsLoRA (``preserve``: alpha_m = alpha sqrt(r_m / r), so every module keeps
    alpha / sqrt(r))."""
    return _prepare_fim(spec, base_model, calibration_batches, use_rslora=True)


def _fim_config(spec: MethodSpec, keys: tuple[str, ...] | None = None) -> FimConfig:
    """The run's FimConfig: its ``fim`` settings (only ``keys`` when given), the run's seed, and no progress bar
    (a sweep writes results, not bars); merged, so a config's own ``progress`` cannot collide with it."""
    settings = {k: v for k, v in spec.fim.items() if keys is None or k in keys}
    return FimConfig(**{**settings, "seed": spec.seed, "progress": False})


def fim_info(alloc) -> dict:
    """What a FIM-LoRA run records of its allocation: scores, ranks, size, batches used and how stable the map is."""
    info = {"scores": alloc.scores, "allocated_ranks": alloc.ranks, "params_spent": alloc.params_spent,
            "n_batches_used": alloc.settings.get("n_batches_used")}
    if "stop_reason" in alloc.settings:
        info["stop_reason"] = alloc.settings["stop_reason"]
    if alloc.confidence:
        info["stable_share"] = alloc.confidence["stable_share"]
        info["rank_agreement"] = alloc.confidence["agreement"]
    return info


# Random-rank shares FIM-LoRA's budget (and its unit) and rank bounds; the Fisher settings have nothing to act on.
RANDOM_SETTINGS = ("r_min", "r_max", "budget", "budget_unit", "budget_fraction", "max_lora_rank")


def _prepare_random(spec: MethodSpec, base_model: nn.Module,
                    calibration_batches: BatchFactory | None) -> tuple[nn.Module, dict, list]:
    """Random-rank: seeded random scores through FIM-LoRA's allocator and budget."""
    model = _uniform_lora(spec, base_model)
    cfg = _fim_config(spec, RANDOM_SETTINGS)
    alloc = random_allocation(model, seed=spec.seed, config=cfg)
    apply_allocation(model, alloc, seed=spec.seed)
    return model, {"scores": alloc.scores, "allocated_ranks": alloc.ranks, "params_spent": alloc.params_spent}, []


def eva_layer_inputs(layer_input, model_input, layer_name: str) -> torch.Tensor:
    """The rows EVA's incremental PCA sees for one layer: PEFT's token selection for (batch, tokens, d_in) inputs;
    a (batch, d_in) input (one vector per example, as BERT's pooler gets the first token's) as it is.

    PEFT's default indexes every input with the (example, token) pairs the attention mask keeps, which on a
    (batch, d_in) input picks single numbers: EVA then fails on any all-linear encoder (the pooler is linear).
    """
    from peft.tuners.lora.eva import prepare_layer_inputs_fn_language_modeling

    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    if isinstance(x, torch.Tensor) and x.ndim == 2:
        return x.contiguous()  # the pooler's first-token slice is a strided view; EVA's input hash flattens it
    return prepare_layer_inputs_fn_language_modeling(layer_input, model_input, layer_name)


def _count_eva_rows(rows: dict, name: str, model_input, module, args, output) -> None:
    rows[name] = int(eva_layer_inputs(args, model_input, name).shape[0])


def eva_rows_per_layer(model: nn.Module, batch: Mapping) -> dict[str, int]:
    """{rank_pattern key: rows} that EVA's SVD hook of each LoRA layer gets from one ``batch`` (one no-grad forward
    with the adapter off; the model is left as it was)."""
    import functools

    from peft.tuners.lora.eva import prepare_model_inputs_fn_language_modeling
    from peft.tuners.lora.layer import LoraLayer

    model_input = prepare_model_inputs_fn_language_modeling(batch, model.peft_config["default"])
    rows, handles = {}, []
    for name, layer in model.base_model.model.named_modules():
        if isinstance(layer, LoraLayer) and "default" in layer.r:
            handles.append(layer.register_forward_hook(functools.partial(_count_eva_rows, rows, name, model_input)))
    try:
        with torch.no_grad(), model.disable_adapter():
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    return rows


def check_eva_rows(rows: Mapping[str, int], components: int) -> None:
    """PEFT's EVA skips a layer's SVD on a batch with fewer input rows than the components it wants (r * rho)
    and cycles the data until every layer has converged: such a layer never does, and EVA never returns. Refused
    up front, naming the layer, instead of a run that hangs."""
    short = {n: k for n, k in rows.items() if k < components}
    if short:
        name, k = next(iter(short.items()))
        raise ValueError(
            f"eva: PEFT's EVA needs at least r * rho = {components} input rows per batch in every adapted layer, "
            f"or it cycles the data forever; {len(short)} layer(s) get fewer, e.g. {name}: {k} (a layer that sees "
            "one vector per example, like BERT's pooler, gets batch_size rows; a causal LM whose batch has labels "
            "gives EVA only the labelled tokens, so a one-token answer is one row per example); raise the batch "
            f"size, lower eva.rho or r so that r * rho <= {min(short.values())}, or leave such layers out of "
            "target_modules")


def _prepare_eva(spec: MethodSpec, base_model: nn.Module,
                 calibration_batches: BatchFactory | None) -> tuple[nn.Module, dict, list]:
    """PEFT's EVA: its own initialisation on the calibration batches, which also sets the ranks."""
    from peft import EvaConfig, initialize_lora_eva_weights

    # Classification labels are (batch,), not per token: EVA's label mask would not broadcast.
    eva = EvaConfig(rho=spec.eva_rho, use_label_mask=spec.task_type == "CAUSAL_LM")
    model = build_peft_model(base_model, _lora_config(spec, init_lora_weights="eva", eva_config=eva), seed=None,
                             low_cpu_mem_usage=True)
    check_eva_rows(eva_rows_per_layer(model, next(iter(calibration_batches()))), round(spec.r * spec.eva_rho))
    start = time.perf_counter()
    with counted_forwards(model) as forwards:
        initialize_lora_eva_weights(model, calibration_batches(), prepare_layer_inputs_fn=eva_layer_inputs,
                                    show_progress_bar=False)
    seconds = time.perf_counter() - start
    # EVA writes rank_pattern only where a rank differs from r; record every module's rank.
    return model, {"calibration_seconds": seconds, "eva_forward_passes": forwards.count,
                   "eva_rank_pattern": dict(model.peft_config["default"].rank_pattern or {}),
                   "eva_ranks": final_rank_map(model, "eva")}, []


def eva_directions(model: nn.Module, batches: Iterable, ranks: Mapping[str, int], use_label_mask: bool) -> dict:
    """EVA's A for every LoRA module of ``model`` at exactly ``ranks`` (rank_pattern keys): the top-r_m right
    singular vectors of the module's inputs, as PEFT's incremental PCA finds them.

    PEFT's EVA keeps a rank_pattern only approximately: with rho = 1 each module's cap is its rank, but modules
    that see the same input (q/k/v of one layer, gate/up) share the largest cap of their group, and the rank
    budget is then spread over the group by explained variance. So every module is asked for the largest rank
    (rank budget = caps: nobody can lose a component) and its first r_m components, ordered by explained
    variance, are kept. Returns ``get_eva_state_dict``'s {module path in ``model``: A (r_m, d_in)}.
    """
    import copy

    from peft import EvaConfig, get_eva_state_dict

    config = copy.deepcopy(model.peft_config["default"])
    config.r, config.rank_pattern = max(ranks.values()), {}
    config.eva_config = EvaConfig(rho=1.0, use_label_mask=use_label_mask)
    full = get_eva_state_dict(model, batches, peft_config=config, prepare_layer_inputs_fn=eva_layer_inputs,
                              show_progress_bar=False)
    prefix = "base_model.model."
    return {path: a[: ranks[path.removeprefix(prefix)]] for path, a in full.items()}


def _prepare_fim_eva(spec: MethodSpec, base_model: nn.Module,
                     calibration_batches: BatchFactory | None) -> tuple[nn.Module, dict, list]:
    """FIM-LoRA's ranks with EVA's directions: the Fisher on a uniform adapter gives the ranks, then a fresh
    adapter at those ranks (same alphas) gets A from PEFT's EVA (activation SVD, :func:`eva_directions`)."""
    from peft import EvaConfig, initialize_lora_eva_weights

    uniform = _uniform_lora(spec, base_model)
    cfg = _fim_config(spec)
    start = time.perf_counter()
    alloc = compute_allocation(uniform, calibration_batches(), cfg)
    fim_seconds = time.perf_counter() - start
    base = uniform.unload()
    use_label_mask = spec.task_type == "CAUSAL_LM"
    eva = EvaConfig(rho=1.0, use_label_mask=use_label_mask)
    eva_config = _lora_config(spec, init_lora_weights="eva", eva_config=eva)
    model = build_peft_model(base, lora_config_for_allocation(alloc, eva_config), seed=None, low_cpu_mem_usage=True)
    check_eva_rows(eva_rows_per_layer(model, next(iter(calibration_batches()))), max(alloc.ranks.values()))
    start = time.perf_counter()
    with counted_forwards(model) as forwards:
        directions = eva_directions(model, calibration_batches(), alloc.ranks, use_label_mask)
    initialize_lora_eva_weights(model, eva_state_dict=directions, show_progress_bar=False)
    eva_seconds = time.perf_counter() - start
    got = final_rank_map(model, "fim_eva")
    kept = {n: r for n, r in alloc.ranks.items() if r > 0}
    if got != kept:
        changed = sorted(set(got.items()) ^ set(kept.items()))[:4]
        raise RuntimeError(f"fim_eva: EVA changed FIM-LoRA's ranks: {changed}")
    return model, {"calibration_seconds": fim_seconds + eva_seconds, "fim_seconds": fim_seconds,
                   "eva_seconds": eva_seconds, "eva_forward_passes": forwards.count, **fim_info(alloc)}, []


def pissa_init(settings: Mapping) -> str:
    """PEFT's ``init_lora_weights`` for the ``pissa`` block: ``"pissa"`` (exact SVD of W) when ``niter`` is None,
    else ``"pissa_niter_K"`` (randomised ``torch.svd_lowrank`` with K subspace iterations, what PiSSA's authors
    recommend for large models)."""
    niter = settings.get("niter")
    return "pissa" if niter is None else f"pissa_niter_{int(niter)}"


def _prepare_pissa(spec: MethodSpec, base_model: nn.Module,
                   calibration_batches: BatchFactory | None) -> tuple[nn.Module, dict, list]:
    """PiSSA (Meng et al., 2024) through PEFT: rank r everywhere, A and B the principal singular triplets of W
    (A = sqrt(S_r/s) V_r^T, B = U_r sqrt(S_r/s)), and W replaced by W_res = W - s B A (PEFT's ``pissa_init``).
    No calibration data: the init depends on W alone."""
    init = pissa_init(spec.pissa)
    start = time.perf_counter()
    model = _uniform_lora(spec, base_model, init_lora_weights=init)
    return model, {"calibration_seconds": time.perf_counter() - start, "init_lora_weights": init}, []


def _prepare_fim_pissa(spec: MethodSpec, base_model: nn.Module,
                       calibration_batches: BatchFactory | None) -> tuple[nn.Module, dict, list]:
    """FIM-LoRA's ranks with PiSSA's init: the Fisher on a uniform adapter gives the ranks, then a fresh adapter
    at those ranks (same alphas) on the untouched base is built by PEFT with PiSSA's init at each module's own
    rank r_m and scale s_m (W_res = W - s_m B A)."""
    init = pissa_init(spec.pissa)
    return _fim_then(spec, base_model, calibration_batches, "fim_pissa", init_lora_weights=init)


def _fim_then(spec: MethodSpec, base_model: nn.Module, calibration_batches: BatchFactory | None, method: str,
              before_build: Callable[[nn.Module, object], dict] | None = None,
              **extra) -> tuple[nn.Module, dict, list]:
    """FIM-LoRA's allocation on a uniform adapter, then a fresh adapter at exactly those ranks and alphas with
    ``extra`` LoraConfig fields (an init method); refuses a result whose ranks differ from the allocation.

    ``before_build(base, config)`` runs on the unloaded base with the allocation's LoraConfig before PEFT builds
    the adapter (an init that needs the base's gradients first, LoRA-GA); what it returns joins the info."""
    uniform = _uniform_lora(spec, base_model)
    start = time.perf_counter()
    alloc = compute_allocation(uniform, calibration_batches(), _fim_config(spec))
    fim_seconds = time.perf_counter() - start
    start = time.perf_counter()
    base = uniform.unload()
    config = lora_config_for_allocation(alloc, _lora_config(spec, **extra))
    init_info = before_build(base, config) if before_build is not None else {}
    model = build_peft_model(base, config, seed=None)
    init_seconds = time.perf_counter() - start
    _check_ranks_kept(model, alloc.ranks, method)
    # The init's name only: a LoraGAConfig object is no result field (results are JSON).
    return model, {"calibration_seconds": fim_seconds + init_seconds, "fim_seconds": fim_seconds,
                   "init_seconds": init_seconds, "init_lora_weights": config.init_lora_weights, **init_info,
                   **fim_info(alloc)}, []


def _check_ranks_kept(model: nn.Module, ranks: Mapping[str, int], method: str) -> None:
    got = final_rank_map(model, method)
    kept = {n: r for n, r in ranks.items() if r > 0}
    if got != kept:
        changed = sorted(set(got.items()) ^ set(kept.items()))[:4]
        raise RuntimeError(f"{method}: the adapter's ranks differ from the allocation's: {changed}")


# Calibration batches for LoRA-GA: the harness's size for every data-driven method (FimConfig's n_batches default).
LORA_GA_BATCHES = CALIBRATION_BATCHES


def lora_ga_config(settings: Mapping):
    """PEFT's ``LoraGAConfig`` from the ``lora_ga`` block less ``n_batches`` (PEFT's defaults: direction ArB2r,
    scale stable, stable_gamma 16, the LoRA-GA paper's)."""
    from peft import LoraGAConfig

    return LoraGAConfig(**{k: v for k, v in settings.items() if k != "n_batches"})


def lora_ga_gradients(spec: MethodSpec, base_model: nn.Module, config, calibration_batches: BatchFactory) -> dict:
    """PEFT's ``preprocess_loraga`` on ``base_model`` (no adapter): each target layer of ``config`` gets G, the
    mean gradient dL/dW over the first ``lora_ga.n_batches`` calibration batches (one forward/backward per batch
    of the batch-mean loss, only the target weights require grad), which ``lora_ga_init`` reads when PEFT builds
    the adapter. Returns {"lora_ga_batches": batches used}.

    ``config.target_modules`` "all-linear" is expanded first with PEFT's own rule: preprocess_loraga matches
    target_modules literally and finds no layer for it (PEFT expands it only when it builds the adapter)."""
    from peft import preprocess_loraga
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    _maybe_include_all_linear_layers(config, base_model)
    check_lora_ga_ranks(base_model, config)
    n_batches = int(settings_block("lora_ga").value(spec.lora_ga, "n_batches"))
    used = {"n": 0}

    def train_step():
        for batch in itertools.islice(calibration_batches(), n_batches):
            base_model(**batch).loss.backward()
            used["n"] += 1

    preprocess_loraga(base_model, config, train_step)
    return {"lora_ga_batches": used["n"]}


def check_lora_ga_ranks(base_model: nn.Module, config) -> None:
    """LoRA-GA takes A and B from the top 2 r_m singular triplets of a module's gradient G (d_out, d_in) (every
    direction: ArBr, A2rBr, ArB2r, random), so it needs 2 r_m <= min(d_out, d_in); PEFT 0.21 instead slices fewer
    columns and fails later with a matmul shape error. r_m is PEFT's: ``rank_pattern``'s matching key, else r."""
    from peft.tuners.lora.loraga import get_target_modules
    from peft.utils.other import get_pattern_key

    for name, module in get_target_modules(base_model, config):
        rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
        if 2 * rank > min(module.weight.shape):
            raise ValueError(
                f"lora_ga: LoRA-GA needs 2 r <= min(d_out, d_in) for every adapted module (A and B come from the "
                f"gradient's top 2 r singular vectors); {name} has r = {rank} and weight shape "
                f"{tuple(module.weight.shape)}: lower r (or fim.r_max), or leave the module out of target_modules")


def lora_ga_fields(spec: MethodSpec) -> dict:
    """The LoraConfig fields of a LoRA-GA init (the run's ``lora_ga`` block)."""
    return {"init_lora_weights": "lora_ga", "lora_ga_config": lora_ga_config(spec.lora_ga)}


def _prepare_lora_ga(spec: MethodSpec, base_model: nn.Module,
                     calibration_batches: BatchFactory | None) -> tuple[nn.Module, dict, list]:
    """LoRA-GA (Wang et al., 2024) through PEFT 0.21's own implementation: :func:`lora_ga_gradients` stores each
    target layer's mean gradient G of W over the calibration batches; PEFT's ``lora_ga_init`` then takes
    G ~ U S V^T (``svd_lowrank``, q = 4r) and, for the default direction ArB2r, A = V[:, :r]^T,
    B = U[:, r:2r] diag(S[r:2r]), scaled by d_out^(1/4) / sqrt(stable_gamma) (scale "stable"), and replaces W by
    W - s B A, so the initial output equals the base's."""
    config = _lora_config(spec, **lora_ga_fields(spec))
    start = time.perf_counter()
    info = lora_ga_gradients(spec, base_model, config, calibration_batches)
    model = build_peft_model(base_model, config, seed=None)
    return model, {"calibration_seconds": time.perf_counter() - start, **info}, []


def _prepare_fim_lora_ga(spec: MethodSpec, base_model: nn.Module,
                         calibration_batches: BatchFactory | None) -> tuple[nn.Module, dict, list]:
    """FIM-LoRA's ranks with LoRA-GA's init: the Fisher on a uniform adapter gives the ranks and alphas, then the
    unloaded (untouched) base's mean gradients G (:func:`lora_ga_gradients`, on the same calibration batches) and
    a fresh adapter at those ranks, built by PEFT with LoRA-GA's init at each module's own rank r_m (A from the top
    r_m right singular vectors of G for ArB2r) and scale s_m = alpha_m / r_m: W_res = W - s_m B A."""
    return _fim_then(spec, base_model, calibration_batches, "fim_lora_ga",
                     lambda base, config: lora_ga_gradients(spec, base, config, calibration_batches),
                     **lora_ga_fields(spec))


def _gora_gradients(spec: MethodSpec, uniform: nn.Module, calibration_batches: BatchFactory) -> dict:
    from .gora import mean_weight_gradients

    return mean_weight_gradients(uniform, calibration_batches(), int(_gora(spec, "n_batches")))


def _gora_lr(spec: MethodSpec, model: nn.Module, grads: Mapping,
             calibration_batches: BatchFactory) -> tuple[float, dict]:
    """(GoRA's init step eta, what chose it): the block's ``lr``, or with ``lr_search`` the line search's choice
    (:func:`~fimlora.bench.gora.choose_gora_lr`) on the ``n_batches`` calibration batches after the gradient's."""
    from .gora import choose_gora_lr

    candidates = _gora(spec, "lr_search")
    if candidates is None:
        return float(_gora(spec, "lr")), {}
    n = int(_gora(spec, "n_batches"))
    held_out = itertools.islice(calibration_batches(), n, 2 * n)
    eta, losses = choose_gora_lr(model, grads, candidates, held_out, sign=_gora(spec, "sign"))
    return eta, {"gora_lr": eta, "gora_lr_search": {f"{k:g}": v for k, v in losses.items()}}


def _gora(spec: MethodSpec, key: str):
    """The run's GoRA setting ``key``, its declared default when the gora block leaves it out."""
    return settings_block("gora").value(spec.gora, key)


def _prepare_gora(spec: MethodSpec, base_model: nn.Module,
                  calibration_batches: BatchFactory | None) -> tuple[nn.Module, dict, list]:
    """GoRA (:mod:`fimlora.bench.gora`): mean gradients of the base weights on the calibration batches give
    importances I_m = mean |W ⊙ G| and ranks over the parameter budget sum_m (d_in + d_out) r; a fresh rsLoRA
    adapter (one alpha, scale alpha / sqrt(r_m)) is built at those ranks through :func:`lora_config_for_allocation`
    and its B set from the pseudo-inverse of A applied to G (:func:`~fimlora.bench.gora.apply_gora_init`).

    The ranks travel as a RankAllocation (method "gora", scale rule fixed_alpha, params budget) so that the one
    helper that writes rank_pattern/alpha_pattern keys writes them. GoRA's rank clamp may spend more than its
    nominal budget sum_m f_m r; the allocation's ``budget`` is what it spent, the nominal one is ``gora_budget``.
    """
    from ..allocation import RankAllocation
    from .gora import apply_gora_init, gora_importance, gora_rank_bounds, gora_ranks

    uniform = _uniform_lora(spec, base_model, use_rslora=True)
    infos = lora_modules(uniform)
    start = time.perf_counter()
    grads = _gora_gradients(spec, uniform, calibration_batches)
    importances = {i.name: gora_importance(i.layer.get_base_layer().weight, grads[i.name]) for i in infos}
    features = {i.name: i.in_features + i.out_features for i in infos}
    r_min, r_max = gora_rank_bounds(spec.r, _gora(spec, "min_rank_ratio"), _gora(spec, "max_rank_ratio"))
    ranks = gora_ranks(importances, features, spec.r, r_min, r_max)
    spent = sum(ranks[n] * features[n] for n in ranks)
    alloc = RankAllocation(
        scores=importances, ranks=ranks, alphas={n: float(spec.lora_alpha) for n in ranks},
        old_ranks={n: spec.r for n in ranks}, old_alphas={n: float(spec.lora_alpha) for n in ranks},
        shapes={i.name: [i.in_features, i.out_features] for i in infos}, budget=spent, r_min=r_min, r_max=r_max,
        base_r=spec.r, base_alpha=float(spec.lora_alpha), use_rslora=True, method="gora",
        settings={"scale": "fixed_alpha"}, budget_unit="params", costs=features)
    config = lora_config_for_allocation(alloc, _lora_config(spec, use_rslora=True))
    model = build_peft_model(uniform.unload(), config, seed=None)
    _check_ranks_kept(model, ranks, "gora")
    eta, search = _gora_lr(spec, model, grads, calibration_batches)
    apply_gora_init(model, grads, eta, sign=_gora(spec, "sign"))
    return model, {"calibration_seconds": time.perf_counter() - start, "scores": importances,
                   "allocated_ranks": ranks, "params_spent": spent,
                   "gora_budget": sum(f * spec.r for f in features.values()), "gora_rank_bounds": [r_min, r_max],
                   **search}, []


def _prepare_fim_gora(spec: MethodSpec, base_model: nn.Module,
                      calibration_batches: BatchFactory | None) -> tuple[nn.Module, dict, list]:
    """FIM-LoRA's ranks and alphas (scale alpha_m / r_m) with GoRA's B: the mean base-weight gradients come from the
    same calibration batches (on the uniform adapter, B = 0, so they are the base model's), and each module's B is
    GoRA's for its own rank and scale, so s_m B A = eta sqrt(d_in / r_m) G A^+ A as in GoRA."""
    from .gora import apply_gora_init

    uniform = _uniform_lora(spec, base_model)
    start = time.perf_counter()
    alloc = compute_allocation(uniform, calibration_batches(), _fim_config(spec))
    fim_seconds = time.perf_counter() - start
    start = time.perf_counter()
    grads = _gora_gradients(spec, uniform, calibration_batches)
    model = build_peft_model(uniform.unload(), lora_config_for_allocation(alloc, _lora_config(spec)), seed=None)
    _check_ranks_kept(model, alloc.ranks, "fim_gora")
    kept = {n: g for n, g in grads.items() if alloc.ranks[n] > 0}
    eta, search = _gora_lr(spec, model, kept, calibration_batches)
    apply_gora_init(model, kept, eta, sign=_gora(spec, "sign"))
    init_seconds = time.perf_counter() - start
    return model, {"calibration_seconds": fim_seconds + init_seconds, "fim_seconds": fim_seconds,
                   "init_seconds": init_seconds, **fim_info(alloc), **search}, []


def mutates_base(model: nn.Module, adapter_name: str = "default") -> bool:
    """Whether the adapter's init rewrote the base weights (W -> W - s B_0 A_0: PiSSA, LoRA-GA, OLoRA, CorDA,
    LoftQ; the library's one table, :data:`fimlora.engines.BASE_CHANGING_INITS`): an adapter trained from it only
    means something on the changed base, so it is saved converted to plain LoRA (:func:`save_adapter`)."""
    from ..engines import changes_base_weights

    return changes_base_weights(model.peft_config[adapter_name].init_lora_weights)


def save_adapter(model: nn.Module, directory, initial_directory=None) -> None:
    """``save_pretrained`` so that a stock ``PeftModel.from_pretrained`` onto the original base rebuilds the model.

    For an init that rewrote W (:func:`mutates_base`) ``initial_directory`` must hold the adapter as saved right
    after initialisation, before training (plain ``save_pretrained``). PEFT then saves the trained adapter
    converted to plain LoRA (``path_initial_model_for_weight_conversion``): with W = W_res + s B_0 A_0 and the
    trained model W_res + s B A, the saved update is s [B | -B_0] [A ; A_0] = s (B A - B_0 A_0), at rank 2 r_m
    and alpha 2 alpha_m (same scale). PEFT 0.21.2 writes only the LoRA tensors in that conversion
    (``subtract_mutated_init``) and so drops ``modules_to_save`` (a classifier head), after which the adapter does
    not load; those tensors are written back here from the model's own state dict.
    """
    from pathlib import Path

    if not mutates_base(model):
        model.save_pretrained(directory)
        return
    if initial_directory is None:
        raise ValueError("initial_directory: an adapter whose init rewrote the base weights "
                         f"({model.peft_config['default'].init_lora_weights!r}) needs the adapter saved before "
                         "training to be converted to plain LoRA; got None")
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    model.save_pretrained(directory, path_initial_model_for_weight_conversion=str(initial_directory))
    path = Path(directory) / "adapter_model.safetensors"
    saved = load_file(str(path))
    whole = get_peft_model_state_dict(model)
    missing = {k: v.detach().cpu().contiguous() for k, v in whole.items() if k not in saved and ".lora_" not in k}
    if missing:
        save_file({**saved, **missing}, str(path), metadata={"format": "pt"})


def _prepare_adalora(spec: MethodSpec, base_model: nn.Module,
                     calibration_batches: BatchFactory | None) -> tuple[nn.Module, dict, list]:
    """PEFT's AdaLoRA with its schedule in steps and the callback that prunes after each optimizer step."""
    from peft import AdaLoraConfig

    block = settings_block("adalora")
    settings = {k: block.value(spec.adalora, k) for k in block.settings}
    sched = adalora_schedule(spec.total_steps, spec.r, **{k: v for k, v in settings.items() if k != "orth_reg_weight"})
    cfg = AdaLoraConfig(lora_alpha=spec.lora_alpha, orth_reg_weight=settings["orth_reg_weight"],
                        target_modules=spec.target_modules, lora_dropout=spec.lora_dropout,
                        task_type=spec.task_type, **sched)
    model = build_peft_model(base_model, cfg, seed=None)
    return model, {"adalora": sched}, [AdaLoraCallback(model)]


class _ForwardCounter:
    """A forward pre-hook that counts the model's forward passes."""

    def __init__(self):
        self.count = 0

    def __call__(self, module, args, kwargs):
        self.count += 1


@contextlib.contextmanager
def counted_forwards(model: nn.Module):
    """Count ``model``'s forward passes inside the block (the hook is removed in ``finally``).

    EVA draws each calibration batch once and replays them from memory (``itertools.cycle``) until its SVDs
    converge, so counting batches drawn from the loader would stop at N; its real cost is these passes.
    """
    counter = _ForwardCounter()
    handle = model.register_forward_pre_hook(counter, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()


def final_rank_map(model: nn.Module, method: str, allocated: Mapping[str, int] | None = None) -> dict[str, int]:
    """Per-module rank after preparation or training, keyed by module name in the base model.

    ``allocated`` (an allocation's ranks) puts back the modules allocated rank 0, which lost their LoRA layer
    and so are not in the model, with rank 0 in allocation order.
    """
    if allocated:
        live = final_rank_map(model, method)
        return {name: live.get(name, 0) for name in allocated} | live
    if method == "adalora":
        from peft.tuners.adalora import AdaLoraLayer

        # After pruning, rank_pattern holds one boolean mask per module, keyed
        # "<name>.lora_E.<adapter>" in memory and "<name>.lora_E" once saved;
        # before the final allocation every module is at init_r.
        masks = model.peft_config["default"].rank_pattern or {}
        out = {}
        for name, module in model.base_model.model.named_modules():
            if isinstance(module, AdaLoraLayer) and "default" in module.lora_E:
                mask = masks.get(f"{name}.lora_E.default", masks.get(f"{name}.lora_E"))
                out[name] = int(sum(bool(m) for m in mask)) if mask is not None else int(module.r["default"])
        return out
    from peft.tuners.lora.layer import LoraLayer

    base = model.base_model.model
    return {name: int(m.r["default"]) for name, m in base.named_modules()
            if isinstance(m, LoraLayer) and "default" in m.r}
