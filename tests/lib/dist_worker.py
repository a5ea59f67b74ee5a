"""Run by tests/test_distributed.py under torchrun: each process calibrates on its own shard of batches.

Rank 1 perturbs its own scores before the broadcast (a stand-in for floating-point
differences between processes), so the processes agree only if rank 0's scores are
really broadcast.
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))  # the repository root: tests.*
import fimlora  # noqa: E402
import fimlora.api  # noqa: E402
from fimlora import FimConfig, compute_fisher, compute_scores  # noqa: E402
from fimlora.distributed import broadcast_object  # noqa: E402
from fimlora.modules import lora_modules  # noqa: E402
from tests.references import lm_batches, lora_llama  # noqa: E402

LOCAL_SCORES = []


def reversed_scores(fisher, aggregation="mean"):
    """This process's scores, values reversed over the modules: a different allocation unless overridden."""
    scores = compute_scores(fisher, aggregation)
    local = dict(zip(scores, reversed(list(scores.values()))))
    LOCAL_SCORES.append(local)
    return local


def main(out_dir: str, estimator: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    if rank == 1:
        fimlora.api.compute_scores = reversed_scores
    batches = lm_batches(n_batches=6, seed=11)[rank::world]  # a DistributedSampler-style shard
    model = lora_llama(seed=0)
    cfg = FimConfig(n_batches=len(batches), estimator=estimator, progress=True, seed=3)
    fisher = compute_fisher(model, batches, cfg)
    alloc = fimlora.apply_fim_ranks(model, batches, config=cfg)
    local_scores = list(LOCAL_SCORES)
    auto = fimlora.compute_allocation(lora_llama(seed=0), lm_batches(n_batches=40, seed=5)[rank::world],
                                      n_batches="auto", estimator=estimator, progress=False)
    torch.save({"fisher": fisher.fisher, "n_batches": fisher.n_batches, "n_examples": fisher.n_examples,
                "unit_scores": fisher.unit_scores, "confidence": alloc.confidence,
                "auto": (auto.settings["n_batches_used"], auto.settings["stop_reason"], auto.ranks),
                "scores": alloc.scores, "ranks": alloc.ranks, "local_scores": local_scores,
                "broadcast": broadcast_object({"rank": rank, "payload": list(range(rank + 1))}),
                "A": {i.name: i.layer.lora_A["default"].weight.detach().clone() for i in lora_modules(model)}},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
