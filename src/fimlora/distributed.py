"""torch.distributed helpers: sum Fisher statistics, agree on scores, refuse sharded models.

Supported order with DDP, FSDP or DeepSpeed: every process builds the full PEFT
model, calibrates on its own batches (the Fisher sums and counts are all-reduced,
so the result equals one calibration over the union of the batches), resizes
identically, and only then is the model wrapped/sharded (``accelerate``/Trainer
do this when training starts).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "is_distributed",
    "is_main_process",
    "all_reduce_sums",
    "broadcast_object",
    "check_not_sharded",
    "check_not_wrapped",
    "wrapped_advice",
]

_SHARDED_ADVICE = ("calibrate and resize the full (unwrapped) PEFT model in every process first, then wrap or "
                   "shard it (accelerate/Trainer do this when training starts); see fimlora.distributed")


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


def check_not_sharded(model: nn.Module) -> None:
    """Refuse FSDP-wrapped, FSDP2/DTensor-sharded or ZeRO-3-partitioned models with what to do instead."""
    for name, module in model.named_modules():
        if type(module).__name__ in ("FullyShardedDataParallel", "DistributedDataParallel"):
            raise ValueError(
                f"model: {name or 'the model'} is wrapped in {type(module).__name__}; {wrapped_advice(module)}"
            )
    for name, p in model.named_parameters():
        if type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor":
            raise ValueError(f"model: parameter {name} is a sharded DTensor (FSDP2); {_SHARDED_ADVICE}")
        if hasattr(p, "ds_id") or hasattr(p, "ds_numel"):
            raise ValueError(f"model: parameter {name} is partitioned by DeepSpeed ZeRO-3; {_SHARDED_ADVICE}")
        if p.numel() == 0:
            raise ValueError(f"model: parameter {name} is empty (a sharded or partitioned model?); {_SHARDED_ADVICE}")
