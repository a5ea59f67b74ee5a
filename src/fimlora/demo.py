"""``fimlora demo``: FIM-LoRA against uniform LoRA on real MiniLM and SST-2, offline, in minutes."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

__all__ = ["run_demo"]


def _row(label: str, values: list[str], width: int = 16) -> str:
    return f"{label:<26}" + "".join(f"{v:>{width}}" for v in values)


def run_demo(args) -> int:
    import torch

    from .allocation import atomic_write_text
    from .api import apply_fim_ranks, versions
    from .cli import _calibration_loader, _fim_config, _load, _save_rank_map
    from .data import load_task
    from .modules import lora_modules
    from .rankmap import format_rank_table
    from .train import TrainSettings, evaluate, finetune, trainable_parameters

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.target_modules is None:
        # all four attention projections are 384x384 in MiniLM: equal rank budget = equal parameter budget
        args.target_modules = ["query", "key", "value", "attention.output.dense"]
    progress = not args.no_progress
    print(f"[1/5] data: {args.data}; model: {args.model}")
    task = load_task(args.data, seed=args.seed, max_train=args.max_train, max_test=args.max_test)
    print(f"      train {len(task.train)} / test {len(task.test)} examples, labels {task.label_names}, "
          f"meta {json.dumps({k: v for k, v in task.meta.items() if 'source' not in k})}")
    tok, uniform = _load(args, task)
    fim = copy.deepcopy(uniform)  # same base, same head init, same A init: only the ranks differ

    print(f"[2/5] calibrating FIM-LoRA: {args.n_batches} backward passes")
    start = time.perf_counter()
    alloc = apply_fim_ranks(fim, _calibration_loader(task, tok, args), config=_fim_config(args))
    calib_s = time.perf_counter() - start
    alloc.settings.update({"model": args.model, "data": args.data, "calibration_seconds": calib_s})
    _save_rank_map(alloc, out)
    print(format_rank_table(alloc))
    print(f"      rank map -> {out / 'rank_map.json'}, {out / 'rank_map.png'}")

    settings = TrainSettings(learning_rate=args.lr, max_steps=args.steps, batch_size=args.batch_size,
                             max_length=args.max_length, seed=args.seed, progress=progress, logging_steps=25)
    results = {}
    for step, (name, model) in enumerate((("uniform LoRA", uniform), ("FIM-LoRA", fim)), start=3):
        print(f"[{step}/5] fine-tuning {name}: {args.steps} steps, batch {args.batch_size}, lr {args.lr}")
        torch.manual_seed(args.seed)
        train = finetune(model, task, tok, settings, str(out / "trainer"))
        metrics = evaluate(model, task, tok, settings)
        lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
        results[name] = {"accuracy": metrics["accuracy"], "trainable_params": trainable_parameters(model),
                         "lora_params": lora, "train_seconds": train["train_seconds"],
                         "train_loss": train["train_loss"],
                         "ranks": {i.name: i.r for i in lora_modules(model)}}
        model.save_pretrained(out / ("adapter_uniform" if name == "uniform LoRA" else "adapter_fim"))
    results["FIM-LoRA"]["calibration_seconds"] = calib_s

    u, f = results["uniform LoRA"], results["FIM-LoRA"]
    print("\n[5/5] results on", task.meta.get("test_source", task.name), f"({len(task.test)} examples)")
    print(_row("", ["uniform LoRA", "FIM-LoRA"]))
    print(_row("accuracy", [f"{u['accuracy']:.4f}", f"{f['accuracy']:.4f}"]))
    print(_row("trainable params (all)", [f"{u['trainable_params']:,}", f"{f['trainable_params']:,}"]))
    print(_row("LoRA params", [f"{u['lora_params']:,}", f"{f['lora_params']:,}"]))
    print(_row("calibration (s)", ["-", f"{calib_s:.1f}"]))
    print(_row("training (s)", [f"{u['train_seconds']:.1f}", f"{f['train_seconds']:.1f}"]))
    print(_row("final train loss", [f"{u['train_loss']:.4f}", f"{f['train_loss']:.4f}"]))
    print("\nOne seed on a short schedule: a difference here is within seed noise unless it is large; "
          "`fimlora` experiments give mean ± std over seeds.")
    print(f"adapters -> {out / 'adapter_uniform'}, {out / 'adapter_fim'} (load with PeftModel.from_pretrained)")
    record = {"results": results, "data_meta": task.meta, "args": {k: v for k, v in vars(args).items()},
              "versions": versions()}
    atomic_write_text(out / "demo_results.json", json.dumps(record, indent=2, default=str) + "\n")
    return 0
