"""Fine-tune MiniLM on SST-2-style sentiment with the HF Trainer + FIM-LoRA (offline, CPU or GPU).

    python examples/trainer_fimlora.py --out out/trainer_example
    torchrun --nproc_per_node 2 examples/trainer_fimlora.py --out out/trainer_example_ddp
    accelerate launch --multi_gpu --num_processes 2 examples/trainer_fimlora.py --out out/trainer_example_ddp

Both launchers start 2 DDP processes: NCCL on GPUs, gloo on CPU. (`accelerate launch --cpu --num_processes 2`
needs MPI and otherwise runs ONE process; calibrate_trainer warns when it sees that.)
"""

import argparse

import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from fimlora.app.collators import ClassificationCollator
from fimlora.app.models import load_classifier, load_tokenizer
from fimlora.app.tasks import load_task
from fimlora.app.train import TrainSettings, evaluate
from fimlora.integrations import calibrate_trainer

parser = argparse.ArgumentParser()
parser.add_argument("--out", default="out/trainer_example")
parser.add_argument("--max-steps", type=int, default=200)
parser.add_argument("--n-layers", type=int, default=None)
parser.add_argument("--max-train", type=int, default=2000)
args = parser.parse_args()

task = load_task("sst2", seed=0, max_train=args.max_train, max_test=200)
tok = load_tokenizer("minilm")
base = load_classifier("minilm", num_labels=2, n_layers=args.n_layers, seed=0)
model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, task_type="SEQ_CLS",
                                        target_modules=["query", "key", "value", "attention.output.dense"]))
training_args = TrainingArguments(
    output_dir=args.out, per_device_train_batch_size=16, learning_rate=2e-3, max_steps=args.max_steps,
    logging_steps=20, save_strategy="no", report_to=[], remove_unused_columns=False, seed=0,
    use_cpu=not torch.cuda.is_available(),  # on CPU, torchrun then gives gloo DDP
)
trainer = Trainer(model=model, args=training_args, train_dataset=task.train,
                  data_collator=ClassificationCollator(tok, max_length=64))

allocation = calibrate_trainer(trainer, n_batches=8)  # the one added line: 8 backward passes, resize
trainer.train()

if trainer.is_world_process_zero():
    metrics = evaluate(model, task, tok, TrainSettings(max_length=64, progress=False))
    print(f"ranks: {sorted(set(allocation.ranks.values()))}, SST-2 accuracy: {metrics['accuracy']:.4f}")
    model.save_pretrained(f"{args.out}/adapter")

# Keep every process alive until rank 0 has saved, then shut gloo/NCCL down cleanly.
trainer.accelerator.wait_for_everyone()
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
