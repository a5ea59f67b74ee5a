"""torch.distributed helpers: sum Fisher statistics, agree on scores, refuse what cannot be calibrated or resized.

Two supported orders. Every process calibrates on its own batches; the Fisher sums and
counts are all-reduced, so the result equals one calibration over the union of the
batches.

* The full PEFT model fits in every process (DDP, FSDP, DeepSpeed): calibrate and resize
  it (``apply_fim_ranks``), and only then wrap or shard it (``accelerate``/Trainer do this
  when training starts).
* It does not: shard it with FSDP2 (``torch.distributed.fsdp.fully_shard``), calibrate the
  sharded model (``compute_allocation``: the statistics come from hooks on each LoRA-B,
  whose input and output gradient are whole in every process), then build the resized
  adapter afresh from the allocation (:func:`fimlora.lora_config_for_allocation`,
  ``get_peft_model`` on the base model, :func:`fimlora.apply_resized_lora_a`) and shard that.
  A sharded model is never resized in place. DeepSpeed ZeRO-3 and FSDP1 wrappers are refused.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "is_distributed",
    "is_main_process",
    "all_reduce_sums",
    "broadcast_object",
    "gather_rows",
    "check_not_sharded",
    "check_can_calibrate",
    "is_fsdp2_sharded",
    "full_tensor",
    "check_not_wrapped",
    "wrapped_advice",
]

_SHARDED_ADVICE = ("calibrate and resize the full (unwrapped) PEFT model in every process first, then wrap or "
                   "shard it (accelerate/Trainer do this when training starts); see fimlora.distributed")
_FSDP2_ADVICE = ("for a model that does not fit in one process, shard it with FSDP2 (torch.distributed.fsdp."
                 "fully_shard per decoder layer and at the root) and calibrate the sharded model; see "
                 "docs/distributed.md, 'Models that do not fit on one device'")
_RESIZE_SHARDED_ADVICE = ("a sharded model is not resized in place: compute_allocation on it, then build the resized "
                          "adapter with fimlora.lora_config_for_allocation and get_peft_model on the base model, "
                          "apply_resized_lora_a, and shard that; see docs/distributed.md, 'Models that do not fit "
                          "on one device'")


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_main_process() -> bool:
    return not is_distributed() or torch.distributed.get_rank() == 0


def all_reduce_sums(sums: dict[str, torch.Tensor], counts: dict[str, int]) -> dict[str, int]:
    """Sum the per-module Fisher sums (in place) and counts over all processes."""
    if not is_distributed():
        return counts
    names = list(sums)
    for name in names:
        torch.distributed.all_reduce(sums[name], op=torch.distributed.ReduceOp.SUM)
    device = sums[names[0]].device
    c = torch.tensor([float(counts[n]) for n in names], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(c, op=torch.distributed.ReduceOp.SUM)
    return {n: int(round(v)) for n, v in zip(names, c.tolist())}


def all_reduce_count(n: int, device: torch.device) -> int:
    if not is_distributed():
        return n
    t = torch.tensor([float(n)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return int(round(t.item()))


def gather_rows(rows: torch.Tensor | None) -> torch.Tensor | None:
    """Every process's rows (a CPU tensor), concatenated in rank order; None if any process has None.

    Identity when not distributed. A collective: every process must call it.
    """
    if not is_distributed():
        return rows
    boxes = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(boxes, rows)
    if any(b is None for b in boxes):
        return None
    return torch.cat(boxes)


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s object on every process (identity when not distributed)."""
    if not is_distributed():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def wrapped_advice(wrapper: nn.Module) -> str:
    """What to do about a PEFT model found inside ``wrapper`` (DDP, FSDP, DeepSpeed, accelerate, ...)."""
    advice = "calibrate before wrapping: call apply_fim_ranks on the PeftModel before DDP/FSDP wraps it"
    # FSDP's inner module holds flat, sharded parameters, so handing it over does not help.
    if "FullyShardedDataParallel" in type(wrapper).__name__:
        return advice
    return advice + " (or pass model.module)"


def check_not_wrapped(model: nn.Module, inner_types: tuple[type, ...]) -> None:
    """Refuse a wrapper whose ``.module`` chain leads to an ``inner_types`` model (a PeftModel), naming the fix."""
    inner = model
    # Bounded: real wrapper chains are a few deep, and a module may (oddly) be its own ``.module``.
    for _ in range(16):
        inner = getattr(inner, "module", None)
        if not isinstance(inner, nn.Module):
            return
        if isinstance(inner, inner_types):
            raise ValueError(f"model: the PEFT model is wrapped in {type(model).__name__}; {wrapped_advice(model)}")


def _is_dtensor(p: torch.Tensor) -> bool:
    return type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor"


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor gathered from every process (a collective: call it on all), else ``t``."""
    return t.full_tensor() if _is_dtensor(t) else t


def is_fsdp2_sharded(model: nn.Module) -> bool:
    """True when a parameter of ``model`` is a DTensor (FSDP2's ``fully_shard``)."""
    return any(_is_dtensor(p) for p in model.parameters())


def _wrapper_problem(model: nn.Module) -> str | None:
    """FSDP1 and DDP wrap the model in a module whose ``.module`` holds it (FSDP1 with flat, sharded parameters)."""
    for name, module in model.named_modules():
        if type(module).__name__ in ("FullyShardedDataParallel", "DistributedDataParallel"):
            return f"model: {name or 'the model'} is wrapped in {type(module).__name__}; {wrapped_advice(module)}"
    return None


def _fsdp2_problem(name: str, p: torch.Tensor) -> str | None:
    """Why DTensor parameter ``p`` is not an FSDP2 (or HSDP) shard, or None.

    FSDP shards dim 0 and HSDP also replicates; any other placement is tensor parallelism, where LoRA-B's input
    and output gradient are themselves sharded and the hooks would not see whole activations.
    """
    from torch.distributed.tensor import Replicate, Shard

    bad = [pl for pl in p.placements if not (isinstance(pl, Replicate) or (isinstance(pl, Shard) and pl.dim == 0))]
    if bad:
        return (f"model: parameter {name} is a DTensor placed as {list(p.placements)}; only FSDP2/HSDP sharding "
                "(Shard(0), Replicate) is supported, not tensor parallelism (LoRA-B's activations would be "
                "sharded too)")
    return None


def _parameter_problem(name: str, p: torch.Tensor, allow_fsdp2: bool) -> str | None:
    """Why parameter ``p`` is sharded in a way calibration (``allow_fsdp2``) or in-place resizing cannot handle."""
    if _is_dtensor(p):
        if not allow_fsdp2:
            return f"model: parameter {name} is a sharded DTensor (FSDP2); {_RESIZE_SHARDED_ADVICE}"
        return _fsdp2_problem(name, p)
    if hasattr(p, "ds_id") or hasattr(p, "ds_numel"):
        return (f"model: parameter {name} is partitioned by DeepSpeed ZeRO-3, which fimlora does not calibrate; "
                f"{_SHARDED_ADVICE}; or, {_FSDP2_ADVICE}")
    if p.numel() == 0:
        return f"model: parameter {name} is empty (a sharded or partitioned model?); {_SHARDED_ADVICE}"
    return None


def _sharding_problem(model: nn.Module, allow_fsdp2: bool, prefix: str = "") -> str | None:
    problem = _wrapper_problem(model)
    if problem is not None:
        return problem
    for name, p in model.named_parameters(prefix=prefix):
        problem = _parameter_problem(name, p, allow_fsdp2)
        if problem is not None:
            return problem
    return None


def check_can_calibrate(model: nn.Module) -> None:
    """Refuse FSDP1/DDP-wrapped, ZeRO-3-partitioned or tensor-parallel models, naming what to do instead.

    A full model or one sharded with FSDP2 (``fully_shard``, DTensor parameters sharded on dim 0) passes.
    """
    problem = _sharding_problem(model, allow_fsdp2=True)
    if problem is not None:
        raise ValueError(problem)


def check_not_sharded(model: nn.Module, prefix: str = "") -> None:
    """Refuse FSDP-wrapped, FSDP2/DTensor-sharded or ZeRO-3-partitioned models (resizing in place needs whole ones).

    ``prefix``: the module's name, put before parameter names in the error.
    """
    problem = _sharding_problem(model, allow_fsdp2=False, prefix=prefix)
    if problem is not None:
        raise ValueError(problem)
