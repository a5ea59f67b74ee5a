"""Run by tests/lib/test_distributed.py under torchrun: calibration of a model sharded with FSDP2 (fully_shard).

Each process shards the same seeded tiny LLaMA per decoder layer and at the root, calibrates on its own
shard of the batches with both estimators, and saves what it computed; the test compares it with one
unsharded process over all the batches. The worker also checks that calibration left the sharded model
as it was (requires_grad, no .grad) and trainable (a training step then reaches A and B), and that
resizing it in place is refused.
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))  # the repository root: tests.*
import fimlora  # noqa: E402
from fimlora import FimConfig, compute_fisher  # noqa: E402
from tests.references import lm_batches, lora_llama  # noqa: E402


def sharded_llama():
    from torch.distributed.fsdp import fully_shard

    model = lora_llama(seed=0)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def grad_state(model):
    return {n: (p.requires_grad, p.grad is None, type(p).__name__) for n, p in model.named_parameters()}


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    batches = lm_batches(n_batches=6, seed=11)[rank::world]  # a DistributedSampler-style shard
    model = sharded_llama()
    before = grad_state(model)
    result = {}
    for estimator in ("batch", "per_example"):
        cfg = FimConfig(n_batches=len(batches), estimator=estimator, progress=False, seed=3)
        fisher = compute_fisher(model, batches, cfg)
        alloc = fimlora.compute_allocation(model, batches, cfg)
        result[estimator] = {"fisher": fisher.fisher, "n_batches": fisher.n_batches,
                             "n_examples": fisher.n_examples, "scores": alloc.scores, "ranks": alloc.ranks}
    result["state_restored"] = grad_state(model) == before
    try:
        fimlora.apply_fim_ranks(model, batches, config=FimConfig(n_batches=1, progress=False))
        result["resize_refused"] = ""
    except ValueError as e:
        result["resize_refused"] = str(e)
    # Training after calibration: requires_grad of A was switched off and back on; FSDP2 must see it again
    # (at B = 0, dL/dA is exactly 0, but A must get a gradient tensor).
    model.train()
    model(**batches[0]).loss.backward()
    result["trained_grads"] = {n: None if p.grad is None else float(p.grad.full_tensor().abs().sum())
                               for n, p in model.named_parameters() if "lora_" in n}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
