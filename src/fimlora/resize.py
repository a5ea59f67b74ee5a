"""Resizing LoRA adapters in place so that PEFT sees a consistent rank_pattern adapter.

For a module going from rank r to r' (k = min(r, r')):

    A' (r', d_in)  = [A[:k]; new rows initialised as PEFT initialises A]
    B' (d_out, r') = [B[:, :k], 0]

and ``r``, ``lora_alpha`` and ``scaling`` on the layer plus ``rank_pattern`` and
``alpha_pattern`` in the config are updated together, because PEFT recomputes
scaling from (r, lora_alpha, use_rslora) on reload and in ``set_scale``.
All new tensors are built and checked before any is swapped in.

The module's update is scaling * B A = scaling * sum_j B[:, j] A[j]; shrinking drops the terms
j >= r', which are zero for a fresh adapter (B = 0). With trained B they are not, so shrinking a
trained module is refused unless ``allow_trained=True``; growing keeps every term.

The base layer is never touched, so every layer :func:`fimlora.modules.lora_modules` accepts is
resized the same way: plain, GPT-2 Conv1D (fan_in_fan_out), bitsandbytes 4/8-bit and other quantised
bases. DoRA keeps its magnitude vector m (d_out,): at B = 0, m = ||W||_row whatever the rank, and
B' A' = B A, so the layer's output is unchanged; a DoRA adapter with B != 0 is refused
(:func:`fimlora.modules.check_dora_fresh`).

Rank 0 (allocations with ``r_min=0``): PEFT cannot hold a rank-0 LoRA module, so the module loses its
adapter. Its LoRA layer is replaced by the base layer it wraps, and the config's ``target_modules``
becomes the list of kept modules' full names (rank_pattern/alpha_pattern name only those), so
``save_pretrained`` writes no tensors for the dropped modules and a stock reload or ``merge_and_unload``
rebuilds exactly the kept ones. At B = 0 the dropped update s B A was zero, so the output is unchanged.

A sharded (FSDP2) model is not resized in place. Since B = 0 at initialisation, building the adapter
afresh with the allocated ranks is equivalent: :func:`lora_config_for_allocation` gives the LoraConfig
(every module's rank and alpha as full ``rank_pattern``/``alpha_pattern`` keys), ``get_peft_model`` on
the base model builds it, and :func:`apply_resized_lora_a` sets A to what :func:`apply_allocation` would
have produced (the old A rows, gathered with :func:`lora_a_weights`, then the seeded new rows), so that
the two paths give bit-identical adapters.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn

from .allocation import RankAllocation, check_alphas, lora_scaling, serving_base
from .config import check_bool, check_int, check_number
from .distributed import check_not_sharded, full_tensor
from .modules import (
    LoraModuleInfo,
    base_model_of,
    check_dora_fresh,
    check_fresh_adapter,
    check_same_modules,
    exact_target_modules,
    lora_config_of,
    lora_modules,
    pattern_keys,
)

__all__ = [
    "apply_allocation",
    "apply_resized_lora_a",
    "check_whole_layers",
    "lora_a_weights",
    "lora_config_for_allocation",
    "resized_adapter",
    "resized_lora_a",
    "resized_lora_weights",
]

logger = logging.getLogger(__name__)


def _module_seed(seed: int, name: str) -> int:
    # Stable across processes and Python runs (unlike hash()), so every rank of a
    # distributed job draws identical new A rows.
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def resized_lora_a(a: torch.Tensor, new_r: int, init_lora_weights, generator: torch.Generator) -> torch.Tensor:
    """New A' (new_r, d_in) from A (r, d_in): A'[:k] = A[:k] (k = min(r, new_r)), new rows drawn; A untouched.

    New A rows follow PEFT: kaiming_uniform(a=sqrt(5)) for ``True``/``False``
    (bound 1/sqrt(d_in)), normal(std=1/r') for ``"gaussian"``. Computed in fp32
    on the CPU generator, then cast to A's dtype and device.
    """
    r, d_in = a.shape
    k = min(r, new_r)
    new_a = torch.empty((new_r, d_in), dtype=a.dtype, device=a.device)
    new_a[:k].copy_(a.detach()[:k])
    if new_r > k:
        rows = torch.empty((new_r - k, d_in), dtype=torch.float32)
        if init_lora_weights == "gaussian":
            rows.normal_(0.0, 1.0 / new_r, generator=generator)
        else:
            bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)) on fan_in = d_in
            rows.uniform_(-bound, bound, generator=generator)
        new_a[k:].copy_(rows.to(device=a.device, dtype=a.dtype))
    return new_a


def resized_lora_weights(
    a: torch.Tensor,
    b: torch.Tensor,
    new_r: int,
    init_lora_weights,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """New (A', B') for rank ``new_r`` from A (r, d_in) and B (d_out, r); inputs untouched.

    A' as :func:`resized_lora_a`; B' (d_out, new_r) = [B[:, :k], 0].
    """
    k = min(a.shape[0], new_r)
    new_a = resized_lora_a(a, new_r, init_lora_weights, generator)
    new_b = torch.zeros((b.shape[0], new_r), dtype=b.dtype, device=b.device)
    new_b[:, :k].copy_(b.detach()[:, :k])
    return new_a, new_b


def _module_generator(seed: int, name: str) -> torch.Generator:
    """The generator of module ``name``'s new A rows: the same in every process and in both resize paths."""
    return torch.Generator().manual_seed(_module_seed(seed, name))


def _allocation_seed(allocation: RankAllocation, seed: int | None) -> int:
    return int(allocation.settings.get("seed", 0)) if seed is None else seed


def _build_linear(weight: torch.Tensor, bias: torch.Tensor | None, requires_grad: bool) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = torch.nn.utils.skip_init(
        nn.Linear, in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    lin.weight = nn.Parameter(weight, requires_grad=requires_grad)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().clone(), requires_grad=requires_grad)
    return lin


def kept_modules(allocation: RankAllocation) -> list[str]:
    """The modules that keep an adapter (rank > 0), in allocation order."""
    return [name for name, r in allocation.ranks.items() if r > 0]


def _validate(allocation: RankAllocation, infos: list[LoraModuleInfo], kept_only: bool = False) -> None:
    """The allocation fits the model's LoRA modules (all of them, or with ``kept_only`` the rank > 0 ones:
    a model built afresh for the allocation has no layer for a dropped module)."""
    expected = kept_modules(allocation) if kept_only else allocation.ranks
    what = "the model's LoRA modules" + (" (the allocation's modules with rank > 0)" if kept_only else "")
    check_same_modules("allocation", expected, [i.name for i in infos], what)
    for info in infos:
        d_in, d_out = allocation.shapes[info.name]
        if (d_in, d_out) != (info.in_features, info.out_features):
            raise ValueError(
                f"allocation.shapes[{info.name!r}]: must match the model's layer (d_in, d_out)="
                f"({info.in_features}, {info.out_features}), got ({d_in}, {d_out})"
            )
        check_int(f"allocation.ranks[{info.name!r}]", allocation.ranks[info.name], minimum=0)
        if allocation.ranks[info.name] > 0:  # a dropped module's alpha (0 under scale="preserve") is never used
            check_number(f"allocation.alphas[{info.name!r}]", allocation.alphas[info.name], minimum=0)


def _check_some_kept(allocation: RankAllocation) -> None:
    if not kept_modules(allocation):
        raise ValueError(
            f"allocation.ranks: every one of the {len(allocation.ranks)} modules has rank 0, which would leave no "
            "adapter; raise the budget or r_min"
        )


def _check_droppable(allocation: RankAllocation, infos: list[LoraModuleInfo], adapter_name: str) -> None:
    """Rank 0 removes a module's LoRA layer: refuse if nothing would be kept or the layer holds other adapters."""
    _check_some_kept(allocation)
    dropped = [i for i in infos if allocation.ranks[i.name] == 0]
    for info in dropped:
        others = sorted(set(info.layer.r) - {adapter_name})
        if others:
            raise ValueError(
                f"allocation.ranks[{info.name!r}]: rank 0 removes the module's LoRA layer, but it also holds "
                f"adapter(s) {others}; drop modules only in a model with one adapter, or set r_min >= 1"
            )


def _check_keeps_trained(allocation: RankAllocation, infos: list[LoraModuleInfo], adapter_name: str) -> None:
    """Refuse shrinking r -> r' where the dropped LoRA-B columns B[:, r':] are non-zero (output would change)."""
    for info in infos:
        new_r = allocation.ranks[info.name]
        dropped = info.layer.lora_B[adapter_name].weight.detach()[:, new_r:]
        if new_r < info.r and (dropped != 0).any():
            raise ValueError(
                f"allocation.ranks[{info.name!r}]: shrinking from r={info.r} to {new_r} drops trained rank "
                f"components (LoRA-B columns {new_r}..{info.r - 1} are non-zero, max |B| = "
                f"{dropped.abs().max().item():.3g}), so the module's output would change; resize a freshly "
                "initialised adapter (B = 0), or pass allow_trained=True to truncate anyway"
            )


def apply_allocation(
    model: nn.Module,
    allocation: RankAllocation,
    adapter_name: str = "default",
    seed: int | None = None,
    *,
    allow_trained: bool = False,
) -> nn.Module:
    """Resize every LoRA module of ``adapter_name`` to ``allocation.ranks`` in place.

    Works on the model the allocation was computed on or on a fresh model with
    the same LoRA config (e.g. an allocation loaded from JSON). Returns ``model``.
    Parameters are replaced by new objects: build the optimizer afterwards.
    On any error the model is left untouched. New A rows are drawn from
    ``seed`` (default: the seed recorded in the allocation's settings).
    Shrinking a module whose dropped LoRA-B columns are non-zero (a trained adapter)
    is refused unless ``allow_trained=True``; growing one is always exact. A DoRA
    adapter must have B = 0 whatever ``allow_trained`` says (its magnitude vector
    is rank-independent only there). A module allocated rank 0 loses its LoRA layer
    (replaced by its base layer) and the config's ``target_modules`` lists the kept
    modules; refused if no module would be kept or the layer holds another adapter.
    Also refused: a map made for another LoRA config (``base_r``, ``base_alpha``,
    ``use_rslora``) or whose alphas do not follow its own scale rule (see
    :func:`fimlora.allocation.check_alphas`). The config's global r/lora_alpha follow
    :func:`fimlora.allocation.serving_base` (``max_lora_rank``).
    """
    config, infos, plan = _plan(model, allocation, adapter_name, seed, allow_trained)
    # Swap: only assignments from here on, nothing that can fail half-way.
    _swap_in(plan, adapter_name, bool(config.use_rslora))
    dropped = [info for info, _ in plan.dropped]
    # One full, non-overlapping key per module: overlapping keys resolve in sorted
    # order after a reload and can silently change ranks or scales.
    _set_patterns(config, allocation)
    if dropped:
        _forget_dropped(model, dropped)
    changed = sum(1 for i in infos if allocation.ranks[i.name] != i.r)
    logger.info("fimlora: resized %d of %d LoRA modules (%d dropped at rank 0; budget %d %s)", changed, len(infos),
                len(dropped), allocation.budget, allocation.budget_unit)
    return model


@contextlib.contextmanager
def resized_adapter(model: nn.Module, allocation: RankAllocation, adapter_name: str = "default",
                    seed: int | None = None, *, allow_trained: bool = False):
    """Inside the block, the model's LoRA layers are the ones :func:`apply_allocation` would build (same ranks,
    alphas, scales and seeded new A rows; rank-0 modules replaced by their base layer); on exit, whatever happened,
    every original layer, weight, rank, alpha and scale is back. The LoRA config (rank_pattern, target_modules, r)
    is never touched, so this is for measuring the resized adapter (``compute_allocation``'s learning rate), not
    for training or saving it.
    """
    config, _, plan = _plan(model, allocation, adapter_name, seed, allow_trained)
    saved = [(info.layer, info.layer.lora_A[adapter_name], info.layer.lora_B[adapter_name],
              info.layer.r[adapter_name], info.layer.lora_alpha[adapter_name], info.layer.scaling[adapter_name])
             for info, *_ in plan.staged]
    try:
        _swap_in(plan, adapter_name, bool(config.use_rslora))
        yield model
    finally:
        for layer, lin_a, lin_b, r, alpha, scaling in saved:
            layer.lora_A[adapter_name], layer.lora_B[adapter_name] = lin_a, lin_b
            layer.r[adapter_name], layer.lora_alpha[adapter_name] = r, alpha
            layer.scaling[adapter_name] = scaling
        for info, (parent, child) in plan.dropped:
            setattr(parent, child, info.layer)
        for info, *_ in plan.staged:
            if info.dora:
                info.layer.lora_magnitude_vector[adapter_name]._cache_clear()


class _Plan(NamedTuple):
    staged: list  # _stage_module's tuples, one per kept module
    dropped: list  # (info, (parent, attribute)) per module allocated rank 0


def _plan(model: nn.Module, allocation: RankAllocation, adapter_name: str, seed: int | None, allow_trained: bool):
    """Every check and every new layer of a resize, built before anything in the model changes:
    (LoRA config, module infos, _Plan)."""
    check_bool("allow_trained", allow_trained)
    seed = _allocation_seed(allocation, seed)
    config = lora_config_of(model, adapter_name)
    infos = lora_modules(model, adapter_name)
    _check_applicable(allocation, infos, config, adapter_name, allow_trained)
    staged = [_stage_module(info, allocation, adapter_name, config.init_lora_weights, seed)
              for info in infos if allocation.ranks[info.name] > 0]
    dropped = [(info, _parent_of(model, info)) for info in infos if allocation.ranks[info.name] == 0]
    return config, infos, _Plan(staged, dropped)


def _swap_in(plan: _Plan, adapter_name: str, use_rslora: bool) -> None:
    """The plan's layers in place: plain assignments, nothing that can fail half-way."""
    for module in plan.staged:
        _swap_module(module, adapter_name, use_rslora)
    for info, (parent, child) in plan.dropped:
        setattr(parent, child, info.layer.get_base_layer())


def _parent_of(model: nn.Module, info: LoraModuleInfo) -> tuple[nn.Module, str]:
    """(parent module, attribute name) holding ``info.layer`` inside the base model."""
    parent_name, _, child = info.name.rpartition(".")
    parent = base_model_of(model).get_submodule(parent_name)
    if getattr(parent, child, None) is not info.layer:
        raise ValueError(f"model: module {info.name!r} is not where its name says; refusing to drop it")
    return parent, child


def _set_patterns(config, allocation: RankAllocation) -> None:
    """The allocation's ranks and alphas as one non-overlapping key per kept module; with dropped modules,
    ``target_modules`` names exactly the kept ones, so a save and a stock reload build only those; the global
    r and lora_alpha as :func:`fimlora.allocation.serving_base` gives them (vLLM's ``--max-lora-rank``).

    Keys come from :func:`fimlora.modules.pattern_keys`: the full name, or ``^name$`` where the full name would
    also match another module (``fc`` and ``inner.fc``). Overlapping keys resolve in sorted order after a reload
    and can silently change ranks or scales. Full names match exactly in PEFT's list form of ``target_modules``
    (a name or a ``.name`` suffix) unless one kept name ends another module's name; then, and when the config's
    target_modules was already a regex string, ``target_modules`` becomes a regex PEFT full-matches against
    exactly the kept names (PEFT refuses ``layers_to_transform``/``layers_pattern`` next to a string, and every
    kept module already passed them). A kept module also passed ``exclude_modules``, which stays.
    """
    kept = kept_modules(allocation)
    keys = pattern_keys(allocation.ranks)
    config.rank_pattern = {keys[name]: allocation.ranks[name] for name in kept}
    config.alpha_pattern = {keys[name]: _as_number(allocation.alphas[name]) for name in kept}
    if len(kept) < len(allocation.ranks):
        # "all-linear" is a shortcut PEFT expands to a set of names, not a regex.
        regex_target = isinstance(config.target_modules, str) and config.target_modules != "all-linear"
        if regex_target or any(keys[name] != name for name in kept):
            config.target_modules = exact_target_modules(kept)
            config.layers_to_transform = config.layers_pattern = None
        else:
            config.target_modules = kept
    r, alpha = serving_base(allocation, int(config.r), float(config.lora_alpha))
    config.r, config.lora_alpha = r, _as_number(alpha)


def _forget_dropped(model: nn.Module, dropped: list[LoraModuleInfo]) -> None:
    """The PEFT model's own list of targeted modules loses the dropped ones, as its config did."""
    gone = {i.name for i in dropped}
    lora_model = getattr(model, "base_model", model)
    if isinstance(getattr(lora_model, "targeted_module_names", None), list):
        lora_model.targeted_module_names = [n for n in lora_model.targeted_module_names if n not in gone]


def _check_applicable(allocation: RankAllocation, infos: list[LoraModuleInfo], config, adapter_name: str,
                      allow_trained: bool) -> None:
    """Every rule an allocation must meet before anything changes (whole model, modules, shapes, trained B, rsLoRA)."""
    check_whole_layers(infos)
    check_dora_fresh(infos, adapter_name)
    _validate(allocation, infos)
    _check_droppable(allocation, infos, adapter_name)
    if not allow_trained:
        _check_keeps_trained(allocation, infos, adapter_name)
    _check_scales(allocation, config, "the model's LoRA config")


def check_whole_layers(infos: list[LoraModuleInfo]) -> None:
    """Refuse resizing in place when the LoRA layers are sharded (FSDP2 DTensors, ZeRO-3), with the way to go."""
    for info in infos:
        check_not_sharded(info.layer, prefix=info.name)


def _check_scales(allocation: RankAllocation, config, what: str) -> None:
    """The map was made for this LoRA config (base r, lora_alpha, use_rslora) and its alphas follow its own scale
    rule (:func:`fimlora.allocation.check_alphas`); otherwise the resized modules would get scales nobody chose."""
    _check_rslora(allocation, config)
    for field, attr in (("base_r", "r"), ("base_alpha", "lora_alpha")):
        mine, theirs = getattr(allocation, field), getattr(config, attr)
        if not math.isclose(float(mine), float(theirs), rel_tol=1e-9):
            raise ValueError(f"allocation.{field}: must equal {attr}={theirs} of {what} (the map's alphas and "
                             f"scales were computed from its {attr}); got {mine}: compute the map on this adapter")
    check_alphas(allocation)


def _check_rslora(allocation: RankAllocation, config) -> None:
    if bool(config.use_rslora) != bool(allocation.use_rslora):
        raise ValueError(
            f"allocation.use_rslora: is {allocation.use_rslora} but the adapter's config has "
            f"use_rslora={config.use_rslora}; the alphas would give a different scale"
        )


def _stage_module(info: LoraModuleInfo, allocation: RankAllocation, adapter_name: str, init_lora_weights,
                  seed: int) -> tuple:
    """The new A and B linears of one module, built and checked; the model is not touched."""
    new_r = allocation.ranks[info.name]
    old_a = info.layer.lora_A[adapter_name]
    old_b = info.layer.lora_B[adapter_name]
    gen = _module_generator(seed, info.name)
    new_a, new_b = resized_lora_weights(old_a.weight, old_b.weight, new_r, init_lora_weights, gen)
    if not (torch.isfinite(new_a).all() and torch.isfinite(new_b).all()):
        raise ValueError(f"model: non-finite LoRA weights in module {info.name!r}; refusing to resize")
    lin_a = _build_linear(new_a, None, old_a.weight.requires_grad)
    lin_b = _build_linear(new_b, old_b.bias, old_b.weight.requires_grad)
    lin_a.train(old_a.training)
    lin_b.train(old_b.training)
    return info, lin_a, lin_b, new_r, float(allocation.alphas[info.name])


def _swap_module(staged: tuple, adapter_name: str, use_rslora: bool) -> None:
    """Put one staged module in place: plain assignments, so nothing can fail half-way."""
    info, lin_a, lin_b, new_r, alpha = staged
    layer = info.layer
    layer.lora_A[adapter_name] = lin_a
    layer.lora_B[adapter_name] = lin_b
    layer.r[adapter_name] = new_r
    layer.lora_alpha[adapter_name] = alpha
    layer.scaling[adapter_name] = lora_scaling(alpha, new_r, use_rslora)
    if info.dora:
        # The magnitude vector stays (it does not depend on the rank at B = 0). PEFT's optional
        # DoRA cache (weight norm, B A) has the same values (B' A' = B A) but was computed from
        # the replaced parameters; drop it so nothing refers to them.
        layer.lora_magnitude_vector[adapter_name]._cache_clear()


def _as_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


# ---------------------------------------------------------------------------
# The resized adapter built afresh (for sharded models): config, then A


def lora_config_for_allocation(allocation: RankAllocation, lora_config):
    """The LoraConfig of the resized adapter; plain data, nothing is changed.

    A copy of ``lora_config`` (the config the allocation was computed with) whose ``rank_pattern`` and
    ``alpha_pattern`` give every module its allocated rank r'_m and alpha'_m under its full name, the keys
    :func:`apply_allocation` writes. ``get_peft_model(base, config)`` then builds an adapter with the same
    ranks, alphas and scales (alpha'_m / r'_m, or alpha'_m / sqrt(r'_m) with rsLoRA) and B = 0; its A is
    PEFT's random init until :func:`apply_resized_lora_a` sets it as :func:`apply_allocation` would. Modules
    allocated rank 0 get no adapter: ``target_modules`` then lists the kept modules' full names.
    """
    from peft import LoraConfig

    if not isinstance(lora_config, LoraConfig):
        raise ValueError(f"lora_config: must be a peft.LoraConfig, got {type(lora_config).__name__}")
    _check_scales(allocation, lora_config, "lora_config")
    _check_some_kept(allocation)
    config = copy.deepcopy(lora_config)
    _set_patterns(config, allocation)
    return config


def lora_a_weights(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Every module's whole LoRA-A (r, d_in), detached copies; a sharded (FSDP2) A is gathered.

    Under FSDP2 this is a collective: call it in every process. What :func:`apply_resized_lora_a` needs from
    the model the allocation was computed on.
    """
    return {i.name: full_tensor(i.layer.lora_A[adapter_name].weight.detach()).clone()
            for i in lora_modules(model, adapter_name)}


def _check_built_from(allocation: RankAllocation, infos: list[LoraModuleInfo], old_a: Mapping[str, torch.Tensor]):
    """The model has the allocation's ranks and alphas, and ``old_a`` holds each module's old A (r_m, d_in)
    (for every module of the allocation, or at least for the kept ones)."""
    _validate(allocation, infos, kept_only=True)
    missing = [i.name for i in infos if i.name not in old_a]
    unknown = [n for n in old_a if n not in allocation.ranks]
    if missing or unknown:
        raise ValueError(f"old_a: must hold the old LoRA-A of every module of the allocation (lora_a_weights of the "
                         f"model it was computed on); missing {missing[:3]}, unknown {unknown[:3]}")
    for info in infos:
        rank, alpha = allocation.ranks[info.name], float(allocation.alphas[info.name])
        if (info.r, info.alpha) != (rank, alpha):
            raise ValueError(
                f"model: LoRA module {info.name!r} has r={info.r}, lora_alpha={info.alpha} but the allocation "
                f"gives r={rank}, alpha={alpha}; build it with get_peft_model(base, lora_config_for_allocation("
                "allocation, lora_config))"
            )
        want = (allocation.old_ranks[info.name], info.in_features)
        if tuple(old_a[info.name].shape) != want:
            raise ValueError(f"old_a[{info.name!r}]: must be the old LoRA-A of shape (r, d_in)={want}, got "
                             f"{tuple(old_a[info.name].shape)}")


def apply_resized_lora_a(
    model: nn.Module,
    allocation: RankAllocation,
    old_a: Mapping[str, torch.Tensor],
    adapter_name: str = "default",
    seed: int | None = None,
) -> nn.Module:
    """Set every module's A as :func:`apply_allocation` would have resized it; returns ``model``.

    ``model``: built with ``get_peft_model(base, lora_config_for_allocation(allocation, lora_config))``,
    before it is sharded, with B = 0. ``old_a``: the old A of every module (:func:`lora_a_weights` of the
    model the allocation was computed on). A'_m = [old_a_m[:k]; new rows from ``seed``] exactly as in
    :func:`apply_allocation` (the same generator per module; ``seed`` defaults to the allocation's), so both
    paths give bit-identical A and B and, after the same training, the same adapter. Everything is checked
    before A is changed; on error the model is untouched.
    """
    seed = _allocation_seed(allocation, seed)
    config = lora_config_of(model, adapter_name)
    infos = lora_modules(model, adapter_name)
    check_whole_layers(infos)
    check_fresh_adapter(infos, adapter_name)
    _check_rslora(allocation, config)
    _check_built_from(allocation, infos, old_a)
    new = {}
    for info in infos:
        a = info.layer.lora_A[adapter_name].weight
        old = old_a[info.name].to(device=a.device, dtype=a.dtype)
        new[info.name] = resized_lora_a(old, info.r, config.init_lora_weights, _module_generator(seed, info.name))
    with torch.no_grad():
        for info in infos:
            info.layer.lora_A[adapter_name].weight.copy_(new[info.name])
    return model
