"""FIM-LoRA on a model sharded with FSDP2: calibrate sharded, rebuild the adapter at the new ranks, train it sharded.

    python examples/fsdp_calibrate.py --out out/fsdp_example
    torchrun --nproc_per_node 2 examples/fsdp_calibrate.py --out out/fsdp_example

No process ever holds the whole PEFT model's gradients or optimizer state: the model is sharded with
`fully_shard` per decoder layer and at the root before calibration. Steps: (1) compute_allocation on the
sharded model (each process calibrates on its own batches; statistics come from hooks on each LoRA-B);
(2) rank_map.json; (3) the resized adapter is built afresh with get_peft_model from the allocation's
LoraConfig, its A set as apply_allocation would have (apply_resized_lora_a), then sharded; (4) a few
training steps; (5) the adapter is gathered and saved by rank 0, and checked as `fimlora check` does.

Offline and self-contained: a seeded random LLaMA-shaped model and a synthetic copy task (the second
half of each row repeats the first). gloo on CPU, NCCL on GPUs (one GPU per process). With a real model,
load the base model in step (1) and again in step (3) instead of `base_model()`.
"""

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

import fimlora
from fimlora.check import check_adapter
from fimlora.rankmap import save_rank_map

parser = argparse.ArgumentParser()
parser.add_argument("--out", default="out/fsdp_example")
parser.add_argument("--layers", type=int, default=4)
parser.add_argument("--hidden", type=int, default=128)
parser.add_argument("--n-batches", type=int, default=4, help="calibration batches per process")
parser.add_argument("--steps", type=int, default=20, help="training steps")
parser.add_argument("--batch-size", type=int, default=8)
parser.add_argument("--seq", type=int, default=32)
args = parser.parse_args()

if "RANK" not in os.environ:  # plain `python`: a group of one process
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
if cuda:
    torch.cuda.set_device(device)
VOCAB = 256
LORA = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def base_model():
    torch.manual_seed(0)  # every process builds the same weights
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                      max_position_embeddings=2 * args.seq)
    return LlamaForCausalLM(cfg)


def shard(peft_model):
    """FSDP2: every decoder layer is its own unit, the root holds the rest (embeddings, norm, lm_head)."""
    for layer in peft_model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(peft_model)
    return peft_model


def batches(n, seed):
    """This process's n batches of the copy task: the second half of each row repeats the first."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        half = torch.randint(1, VOCAB, (args.batch_size, args.seq // 2), generator=g)
        ids = torch.cat([half, half], dim=1).to(device)
        labels = ids.clone()
        labels[:, : args.seq // 2] = -100  # only the copied half is predictable
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


out = Path(args.out)
# (1) calibrate the sharded model; every process gets rank 0's scores and the same ranks
torch.manual_seed(100)
model = shard(get_peft_model(base_model(), LORA).to(device))
allocation = fimlora.compute_allocation(model, batches(args.n_batches, seed=1000 + rank), n_batches=args.n_batches,
                                        seed=0, progress=rank == 0)
old_a = fimlora.lora_a_weights(model)  # gathered from the shards: every process calls it
del model

# (2) the rank map
if rank == 0:
    out.mkdir(parents=True, exist_ok=True)
    save_rank_map(allocation, out)
    print(f"{len(allocation.ranks)} modules, ranks {min(allocation.ranks.values())}..{max(allocation.ranks.values())},"
          f" budget {allocation.budget} -> {out / 'rank_map.json'}")

# (3) the resized adapter, built afresh and then sharded
model = get_peft_model(base_model(), fimlora.lora_config_for_allocation(allocation, LORA))
fimlora.apply_resized_lora_a(model, allocation, old_a)
model = shard(model.to(device))

# (4) train it sharded
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
model.train()
for step, batch in enumerate(batches(args.steps, seed=2000 + rank)):
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
        print(f"step {step}: loss {loss.item():.3f}")

# (5) gather the LoRA tensors (a collective: every process), save on rank 0
adapter = {n: p.detach().full_tensor().cpu() for n, p in model.named_parameters() if "lora_" in n}
if rank == 0:
    model.save_pretrained(out / "adapter", state_dict=adapter)
    report = check_adapter(out / "adapter")
    print(report.format())
    print(f"adapter -> {out / 'adapter'}")
dist.barrier()
dist.destroy_process_group()
