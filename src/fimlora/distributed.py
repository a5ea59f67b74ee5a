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

__all__ = ["is_distributed", "is_main_process", "all_reduce_sums", "broadcast_object", "check_not_sharded"]


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


def check_not_sharded(model: nn.Module) -> None:
    """Refuse FSDP-wrapped, FSDP2/DTensor-sharded or ZeRO-3-partitioned models with what to do instead."""
    advice = ("calibrate and resize the full (unwrapped) PEFT model in every process first, then wrap or "
              "shard it (accelerate/Trainer do this when training starts); see fimlora.distributed")
    for name, module in model.named_modules():
        if type(module).__name__ in ("FullyShardedDataParallel", "DistributedDataParallel"):
            raise ValueError(f"model: {name or 'the model'} is wrapped in {type(module).__name__}; {advice}")
    for name, p in model.named_parameters():
        if type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor":
            raise ValueError(f"model: parameter {name} is a sharded DTensor (FSDP2); {advice}")
        if hasattr(p, "ds_id") or hasattr(p, "ds_numel"):
            raise ValueError(f"model: parameter {name} is partitioned by DeepSpeed ZeRO-3; {advice}")
        if p.numel() == 0:
            raise ValueError(f"model: parameter {name} is empty (a sharded or partitioned model?); {advice}")
