"""The one-line entry point and the compute step it is built from."""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from torch import nn

from .allocation import RankAllocation, scaled_alpha
from .confidence import AUTO_RULES, MIN_UNITS, RankConfidence, compute_rank_confidence, resampled_ranks
from .config import FimConfig, check_bool
from .distributed import broadcast_object, is_fsdp2_sharded, is_main_process
from .fisher import FisherResult, LossFn, compute_fisher, compute_scores
from .io import package_versions
from .lr import compute_lr_recommendation
from .modules import check_fresh_adapter, check_same_modules, lora_config_of, lora_modules
from .resize import apply_allocation, check_whole_layers, resized_adapter
from .waterfill import BudgetAboveCap, allocate_ranks, random_scores, validate_allocation_inputs

__all__ = ["resolve_config", "apply_fim_ranks", "compute_allocation", "allocation_from_scores", "random_allocation"]


class _Bounds(NamedTuple):
    budget: int
    r_min: int
    r_max: int
    infos: list
    costs: list[int] | None  # parameters per unit of rank (d_in + d_out) with budget_unit="params", else None


def _bounds(model: nn.Module, config: FimConfig) -> _Bounds:
    lora_cfg = lora_config_of(model, config.adapter_name)
    infos = lora_modules(model, config.adapter_name)
    costs = [i.in_features + i.out_features for i in infos] if config.budget_unit == "params" else None
    # The default budget is the current adapter's size in the chosen unit.
    default = sum(i.r * c for i, c in zip(infos, costs)) if costs else sum(i.r for i in infos)
    budget = config.budget if config.budget is not None else default
    if config.budget_fraction is not None:
        budget = math.floor(config.budget_fraction * default)
        if budget < 1:
            raise ValueError(f"budget_fraction: {config.budget_fraction} of the current adapter's size {default} "
                             f"({config.budget_unit}) leaves no budget; raise it")
    r_max = config.r_max
    if r_max is None:
        # With a vLLM max_lora_rank the cap is the serving setting itself, else 2r.
        r_max = config.max_lora_rank if config.max_lora_rank is not None else 2 * int(lora_cfg.r)
    if config.r_max is None and config.r_min > r_max:
        raise ValueError(f"r_min: must be <= r_max, and r_max defaults to 2r = {r_max} (r = {lora_cfg.r}); got "
                         f"r_min={config.r_min}: lower r_min or set r_max")
    # Checked before any calibration compute is spent.
    try:
        validate_allocation_inputs([0.0] * len(infos), budget, config.r_min, r_max, costs)
    except BudgetAboveCap as e:
        if config.max_lora_rank is None:
            raise
        raise ValueError(f"{e}; r_max is capped by max_lora_rank={config.max_lora_rank}, so this budget cannot "
                         "be spent on an adapter vLLM serves at that setting: raise max_lora_rank or lower the "
                         "budget") from None
    return _Bounds(budget, config.r_min, r_max, infos, costs)


def allocation_from_scores(
    model: nn.Module, scores: Mapping[str, float], config: FimConfig | None = None, method: str = "fim",
    extra_settings: Mapping | None = None, **settings,
) -> RankAllocation:
    """Allocate ranks from given per-module scores (no calibration); the model is not changed.

    FimConfig settings (``budget``, ``budget_unit``, ``budget_fraction``, ``max_lora_rank``, ...)
    come as ``config`` or by name, not both.
    """
    config = resolve_config(config, settings)
    budget, r_min, r_max, infos, costs = _bounds(model, config)
    names = [i.name for i in infos]
    check_same_modules("scores", scores, names, "the model's LoRA modules")
    ordered = {n: float(scores[n]) for n in names}
    ranks = allocate_ranks(ordered, budget, r_min, r_max, costs)
    lora_cfg = lora_config_of(model, config.adapter_name)
    alphas = {
        i.name: scaled_alpha(i.alpha, i.r, ranks[i.name], config.scale, bool(lora_cfg.use_rslora)) for i in infos
    }
    settings = config.to_dict()
    settings.pop("progress", None)
    settings.update(extra_settings or {})
    return RankAllocation(
        scores=ordered,
        ranks=ranks,
        alphas=alphas,
        old_ranks={i.name: i.r for i in infos},
        old_alphas={i.name: i.alpha for i in infos},
        shapes={i.name: [i.in_features, i.out_features] for i in infos},
        budget=budget,
        r_min=r_min,
        r_max=r_max,
        base_r=int(lora_cfg.r),
        base_alpha=float(lora_cfg.lora_alpha),
        use_rslora=bool(lora_cfg.use_rslora),
        method=method,
        settings=settings,
        versions=package_versions(),
        budget_unit=config.budget_unit,
        costs={i.name: i.in_features + i.out_features for i in infos},
    )


def compute_allocation(
    model: nn.Module,
    dataloader: Iterable,
    config: FimConfig | None = None,
    loss_fn: LossFn | None = None,
    *,
    allow_trained: bool = False,
    **settings,
) -> RankAllocation:
    """Calibrate and allocate; returns a RankAllocation and leaves the model unchanged.

    FimConfig settings come as ``config`` or by name (``budget_unit="params"``), not both.

    The adapter must be freshly initialised (LoRA-B = 0, straight after ``get_peft_model``):
    the scores are the Fisher of dL/dB at B = 0. ``allow_trained=True`` calibrates a trained
    adapter anyway (recorded in ``settings["allow_trained"]``).

    Unless ``lr_rule="none"``, ``allocation.lr`` is the recommended AdamW learning rate for the resized
    adapter (:func:`fimlora.lr.compute_lr_recommendation` on the first ``lr_batches`` calibration batches, the
    adapter resized as :func:`fimlora.apply_allocation` will resize it for the measurement only, then put back).
    """
    config = resolve_config(config, settings)
    check_bool("allow_trained", allow_trained)
    bounds = _bounds(model, config)
    if not allow_trained:
        check_fresh_adapter(bounds.infos, config.adapter_name)
    allocate = _allocator(bounds)
    stop_rule = functools.partial(stable_enough, allocate=allocate, config=config) if config.n_batches == "auto" \
        else None
    batches = FirstBatches(dataloader, config.lr_batches if config.lr_rule != "none" else 0)
    fisher = compute_fisher(model, batches, config, loss_fn, stop_rule=stop_rule)
    # All-reduced sums are identical on every process in exact arithmetic; broadcasting
    # rank 0's scores makes the allocation (and so the tensor shapes DDP checks) identical in practice too.
    scores = broadcast_object(compute_scores(fisher, config.aggregation))
    extra = {"n_batches_used": fisher.n_batches, "allow_trained": allow_trained}
    if fisher.stop_reason is not None:
        extra["stop_reason"] = fisher.stop_reason
    allocation = allocation_from_scores(model, scores, config, method="fim", extra_settings=extra)
    allocation.confidence = broadcast_object(_confidence(fisher, allocation, allocate, config))
    allocation.lr = _lr_recommendation(model, allocation, batches.kept, config, loss_fn, allow_trained)
    return allocation


class FirstBatches:
    """``dataloader`` as calibration reads it, keeping its first ``keep`` batches for the learning-rate rule (the
    same batches, whatever the dataloader's shuffling or a generator's exhaustion)."""

    def __init__(self, dataloader: Iterable, keep: int):
        self.dataloader, self.keep, self.kept = dataloader, keep, []

    def __iter__(self):
        for batch in self.dataloader:
            if len(self.kept) < self.keep:
                self.kept.append(batch)
            yield batch


def _lr_recommendation(model: nn.Module, allocation: RankAllocation, batches: list, config: FimConfig, loss_fn,
                       allow_trained: bool) -> dict | None:
    """The learning-rate recommendation for the resized adapter as a dict (rank 0's on every process), or None."""
    if config.lr_rule == "none":
        return None
    if is_fsdp2_sharded(model):
        warnings.warn("lr_rule: a sharded model is not resized in place, so no learning rate is recommended; call "
                      "fimlora.lr.compute_lr_recommendation on the resized model", UserWarning, stacklevel=3)
        return None
    with resized_adapter(model, allocation, config.adapter_name, config.seed, allow_trained=allow_trained):
        rec = _measured_or_fallback(model, batches, config, loss_fn)
    return broadcast_object(rec.to_dict() if rec is not None else None)


def _measured_or_fallback(model: nn.Module, batches: list, config: FimConfig, loss_fn):
    """The rule's recommendation; where the model cannot take it (the Hessian rule needs double backward, which
    TRL's chunked-logprob loss, reentrant checkpointing and some fused kernels lack) the range test's instead, and
    where that fails too none, each with a warning: the learning rate is advice, the rank map is the product."""
    rule = config.lr_rule
    while True:
        try:
            return compute_lr_recommendation(model, batches, rule, loss_fn=loss_fn, adapter_name=config.adapter_name,
                                             n_batches=config.lr_batches,
                                             steps=config.lr_steps if rule == config.lr_rule else None,
                                             seed=config.seed, train_mode=config.train_mode)
        except Exception as e:  # noqa: BLE001 - advice only: any failure falls back, the model is restored either way
            if rule == "hessian":
                warnings.warn(f"{e}; measured with lr_rule='range' instead", UserWarning, stacklevel=4)
                rule = "range"
                continue
            warnings.warn(f"{e}: no learning rate is recommended (the rank map is unaffected)", UserWarning,
                          stacklevel=4)
            return None


def _allocator(bounds: _Bounds):
    """scores (a list in module order) -> ranks, with the allocation's own budget, bounds and costs."""
    return functools.partial(allocate_ranks, budget=bounds.budget, r_min=bounds.r_min, r_max=bounds.r_max,
                             costs=bounds.costs)


def _bootstrap(unit_scores, names: list[str], point: list[int] | None, allocate, config: FimConfig) -> RankConfidence:
    """The bootstrap of the rank map ``point`` (default: the one the unit scores' column means give)."""
    if point is None:
        point = allocate(unit_scores.mean(dim=0).tolist())
    unit = "batch" if config.estimator == "batch" else "example"
    return compute_rank_confidence(unit_scores.numpy(), names, point, allocate, n_resamples=config.resamples,
                                   seed=config.seed, threshold=config.stable_threshold, unit=unit)


def stable_enough(unit_scores, allocate, config: FimConfig) -> str | None:
    """``n_batches="auto"``'s stop rule: a sentence once ``share >= auto_stable_share``, else None, where ``share``
    is ``config.auto_rule``'s share of modules (:data:`fimlora.confidence.AUTO_RULES`, with ``stable_threshold``)
    over the bootstrap resamples of the units so far, against the map their mean gives.

    Decided on rank 0 and broadcast, so every process stops after the same batch.
    """
    reason = None
    # A bootstrap of one unit resamples it alone: every resample agrees, which says nothing.
    if is_main_process() and unit_scores is not None and unit_scores.shape[0] >= MIN_UNITS:
        point = allocate(unit_scores.mean(dim=0).tolist())
        ranks = resampled_ranks(unit_scores.numpy(), allocate, config.resamples, config.seed)
        rule, words = AUTO_RULES[config.auto_rule]
        share = rule(ranks, point, config.stable_threshold)
        if share >= config.auto_stable_share:
            reason = (f"stable: {100 * share:.0f}% of modules {words} in >= {100 * config.stable_threshold:.0f}% of "
                      f"{len(ranks)} resamples (target {100 * config.auto_stable_share:.0f}%)")
    return broadcast_object(reason)


def _confidence(fisher: FisherResult, allocation: RankAllocation, allocate, config: FimConfig) -> dict | None:
    """The allocation's bootstrap as a dict keyed by module name, or None when off or not possible, or when
    ``n_batches="auto"`` ran out of data before judging the map (then a warning says so)."""
    if not config.resamples or fisher.unit_scores is None or not is_main_process():
        return None
    if fisher.auto_unjudged:
        # A bootstrap of one batch's examples would print a share of stable modules next to a stop reason that
        # says auto never judged stability: the stop reason alone says it.
        warnings.warn(f"n_batches: auto stopped ({fisher.stop_reason}); no confidence is reported", UserWarning,
                      stacklevel=3)
        return None
    # The unit scores' columns are in module order, the allocation's order.
    return _bootstrap(fisher.unit_scores, list(allocation.ranks), list(allocation.ranks.values()), allocate,
                      config).to_dict()


def random_allocation(model: nn.Module, seed: int, config: FimConfig | None = None, **settings) -> RankAllocation:
    """The random-rank baseline: seeded uniform scores through the same allocator and budget.

    ``seed`` draws the scores; other FimConfig settings come as ``config`` or by name, not both.
    """
    config = resolve_config(config, settings)
    names = [i.name for i in lora_modules(model, config.adapter_name)]
    return allocation_from_scores(
        model, random_scores(names, seed), config, method="random", extra_settings={"random_seed": seed}
    )


def resolve_config(config: FimConfig | None, settings: Mapping) -> FimConfig:
    """``config``, or a FimConfig of ``settings``; both at once is ambiguous and refused."""
    if config is None:
        return FimConfig(**settings)
    if settings:
        raise ValueError(
            f"config: pass either config or the settings it holds, not both; also got {sorted(settings)} "
            "(put them in the FimConfig)"
        )
    return config


def apply_fim_ranks(
    model: nn.Module,
    dataloader: Iterable,
    n_batches: int | None = None,
    r_min: int | None = None,
    r_max: int | None = None,
    budget: int | None = None,
    estimator: str | None = None,
    aggregation: str | None = None,
    *,
    loss_fn: LossFn | None = None,
    config: FimConfig | None = None,
    allow_trained: bool = False,
    **kwargs,
) -> RankAllocation:
    """Calibrate, allocate and resize the LoRA adapters of ``model`` in place.

    ``model`` is a PEFT LoRA model straight after ``get_peft_model`` (B = 0; a trained
    adapter is refused unless ``allow_trained=True``), not yet wrapped in DDP/FSDP. A model
    sharded with FSDP2 is refused before any calibration (it cannot be resized in place):
    call ``compute_allocation`` on it and build the resized adapter with
    :func:`fimlora.lora_config_for_allocation` (see :mod:`fimlora.resize`).
    Runs ``n_batches`` (default 8) backward passes on ``dataloader`` batches (loss:
    ``model(**batch).loss``, a mean, or ``loss_fn(model, batch)``), scores each
    module by its LoRA-B empirical Fisher (see :mod:`fimlora.fisher`; ``estimator``
    default ``"batch"``, ``aggregation`` default ``"mean"``), splits ``budget``
    (default: the current total rank, sum_m r_m) over the modules within
    [r_min, r_max] (defaults 1 and 2 * r) and resizes every adapter. Further
    settings of :class:`FimConfig` (``scale``, ``adapter_name``, ``seed``, ...)
    go in ``kwargs``: ``budget_unit="params"`` counts the budget in LoRA
    parameters (a rank in module m costs d_in + d_out; default budget the
    current adapter's size), ``budget_fraction=0.5`` takes half the default
    budget, and ``max_lora_rank=K`` caps every rank at vLLM's serving setting K.

    Alternatively pass the settings as one ``config``; then no setting may also be
    given by name (``None`` counts as not given), and a conflict is a ValueError
    naming the arguments rather than one silently winning.

    Returns the RankAllocation, whose ``lr`` (and ``learning_rate``) is the recommended AdamW learning rate
    for the resized adapter (``lr_rule``; see :func:`compute_allocation`); build the optimizer after this call.
    """
    named = dict(n_batches=n_batches, r_min=r_min, r_max=r_max, budget=budget, estimator=estimator,
                 aggregation=aggregation)
    settings = {k: v for k, v in named.items() if v is not None}
    config = resolve_config(config, {**settings, **kwargs})
    check_whole_layers(lora_modules(model, config.adapter_name))  # before any calibration compute
    allocation = compute_allocation(model, dataloader, config, loss_fn, allow_trained=allow_trained)
    apply_allocation(model, allocation, config.adapter_name, seed=config.seed, allow_trained=allow_trained)
    return allocation
