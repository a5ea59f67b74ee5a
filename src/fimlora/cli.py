"""The ``fimlora`` command: calibrate, plot, check, demo, run, report."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

__all__ = ["main", "build_parser"]

logger = logging.getLogger("fimlora")


def _add_calibration_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("FIM-LoRA")
    g.add_argument("--r", type=int, default=8, help="base LoRA rank r; the budget is (number of modules) x r (default 8)")
    g.add_argument("--alpha", type=float, default=None, help="lora_alpha (default 2r)")
    g.add_argument("--r-min", type=int, default=1, help="smallest rank per module (default 1)")
    g.add_argument("--r-max", type=int, default=None, help="largest rank per module (default 2r)")
    g.add_argument("--n-batches", type=int, default=8, help="calibration batches N (default 8)")
    g.add_argument("--estimator", choices=["batch", "per_example"], default="batch",
                   help="batch: squared mini-batch gradients (paper); per_example: eq. 1 (default batch)")
    g.add_argument("--aggregation", choices=["mean", "max", "l2"], default="mean",
                   help="module score from its Fisher matrix (default mean)")
    g.add_argument("--scale", choices=["preserve", "fixed_alpha"], default="preserve",
                   help="preserve alpha/r per module (default) or keep alpha fixed")
    g.add_argument("--seed", type=int, default=0, help="seed for data order, head init and new A rows (default 0)")


def _add_model_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=required, default=None if required else "minilm",
                   help="local folder, offline alias (minilm, smollm2) or hub name")
    g.add_argument("--data", required=required, default=None if required else "sst2",
                   help="bundled task (sst2, trec6, boolq, piqa, hellaswag, winogrande, siqa, arc_easy, "
                        "arc_challenge, obqa), a .jsonl/.csv file, or hf:NAME[:CONFIG]")
    g.add_argument("--target-modules", nargs="+", default=None,
                   help="LoRA target modules (default: PEFT's default for the architecture)")
    g.add_argument("--n-layers", type=int, default=None, help="keep only the first N layers (fast experiments)")
    g.add_argument("--batch-size", type=int, default=16, help="calibration/training batch size (default 16)")
    g.add_argument("--max-length", type=int, default=128, help="max tokens per example (default 128)")
    g.add_argument("--max-train", type=int, default=None, help="subsample the training split to this many examples")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fimlora",
        description="Task-informed LoRA ranks from the empirical Fisher of LoRA-B; outputs standard PEFT adapters.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("calibrate", help="calibrate, allocate and save a resized, untrained adapter",
                       description="Calibrate FIM-LoRA on a model and data set and write the resized, untrained "
                                   "PEFT adapter, rank_map.json and rank_map.png to --out.")
    _add_model_data_args(p)
    _add_calibration_args(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    p = sub.add_parser("plot", help="draw a rank map heatmap from rank_map.json",
                       description="Draw the layer x module-type heatmap of a rank map (PNG or SVG).")
    p.add_argument("rank_map", help="path to rank_map.json")
    p.add_argument("--out", default=None, help="output image (.png or .svg; default next to the JSON)")
    p.add_argument("--no-scores", action="store_true", help="draw only the rank panel")

    p = sub.add_parser("check", help="check a saved adapter for the problems that break rank_pattern adapters",
                       description="Check pattern keys, ranks vs tensor shapes, scaling and vLLM max_lora_rank. "
                                   "Exits 1 on any problem.")
    p.add_argument("adapter_dir", help="folder with adapter_config.json and adapter_model.safetensors")
    p.add_argument("--base-model", default=None,
                   help="also match keys against every module of this base model (folder, alias or hub name)")

    p = sub.add_parser("demo", help="the offline demo: FIM-LoRA vs uniform LoRA on real MiniLM + SST-2",
                       description="Calibrate FIM-LoRA on MiniLM with the sentiment task, show the rank map, "
                                   "fine-tune uniform LoRA and FIM-LoRA at the same budget, data and seed, and "
                                   "print accuracy, trainable parameters and wall time side by side.")
    _add_model_data_args(p, required=False)
    _add_calibration_args(p)
    p.set_defaults(r=4, batch_size=16, max_length=64, max_train=2000)
    p.add_argument("--steps", type=int, default=300, help="training steps per method (default 300)")
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate (default 2e-3)")
    p.add_argument("--max-test", type=int, default=None, help="subsample the test split")
    p.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p = sub.add_parser("run", help="run an experiment grid from a YAML config (resumable, shardable)",
                       description="Run every run of an experiment config; each writes one JSON result. "
                                   "Finished runs are skipped, so a killed sweep resumes where it stopped.")
    p.add_argument("config", help="experiment YAML (see configs/)")
    p.add_argument("--results", default=None, help="results folder (default results/<config name>)")
    p.add_argument("--shard", default=None, help="i/n: run only every n-th run starting at i (0-based)")
    p.add_argument("--only", default=None, help="run only runs whose id contains this text")
    p.add_argument("--list", action="store_true", help="list the runs and whether they are finished, run nothing")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    p = sub.add_parser("report", help="write the paper's tables (Markdown + CSV) from run results",
                       description="Read every run JSON under RESULTS_DIR and write mean ± std tables, the rank "
                                   "sweep, ablations, FIM vs random counts and rank-map statistics.")
    p.add_argument("results_dir", nargs="+", help="results folder(s)")
    p.add_argument("--out", default=None, help="Markdown output (default RESULTS_DIR/report.md; CSV next to it)")
    p.add_argument("--title", default=None, help="report title")
    p.add_argument("--preface", default=None, help="a Markdown file placed after the commands (the authors' reading)")
    p.add_argument("--command", action="append", default=None, dest="commands",
                   help="a command that produced the results, quoted in the report (repeatable)")
    return parser


def _lora_config(args, kind: str):
    from peft import LoraConfig

    alpha = args.alpha if args.alpha is not None else 2 * args.r
    return LoraConfig(r=args.r, lora_alpha=alpha, target_modules=args.target_modules, lora_dropout=0.0,
                      task_type="SEQ_CLS" if kind == "classification" else "CAUSAL_LM")


def _fim_config(args):
    from .config import FimConfig

    return FimConfig(n_batches=args.n_batches, r_min=args.r_min, r_max=args.r_max, estimator=args.estimator,
                     aggregation=args.aggregation, scale=args.scale, seed=args.seed,
                     progress=not getattr(args, "no_progress", False))


def _load(args, task):
    import torch
    from peft import get_peft_model

    from .models import load_causal_lm, load_classifier, load_tokenizer

    tok = load_tokenizer(args.model)
    if task.kind == "classification":
        base = load_classifier(args.model, task.num_labels, args.n_layers, seed=args.seed)
    else:
        base = load_causal_lm(args.model, args.n_layers)
    torch.manual_seed(args.seed)
    return tok, get_peft_model(base, _lora_config(args, task.kind))


def _calibration_loader(task, tok, args):
    import torch
    from torch.utils.data import DataLoader

    from .train import collator_for

    g = torch.Generator().manual_seed(args.seed)
    return DataLoader(task.train, batch_size=args.batch_size, shuffle=True, generator=g,
                      collate_fn=collator_for(task, tok, args.max_length))


def _save_rank_map(alloc, out: Path) -> None:
    from .rankmap import plot_rank_map

    alloc.to_json(out / "rank_map.json")
    try:
        plot_rank_map(alloc, out / "rank_map.png")
    except ValueError as e:  # a model without numbered layers has no grid to draw
        logger.warning("rank map plot skipped: %s", e)


def cmd_calibrate(args) -> int:
    from .api import apply_fim_ranks
    from .data import load_task
    from .rankmap import format_rank_table

    out = Path(args.out)
    task = load_task(args.data, seed=args.seed, max_train=args.max_train)
    tok, model = _load(args, task)
    start = time.perf_counter()
    alloc = apply_fim_ranks(model, _calibration_loader(task, tok, args), config=_fim_config(args))
    seconds = time.perf_counter() - start
    alloc.settings.update({"model": args.model, "data": args.data, "calibration_seconds": seconds,
                           "data_meta": task.meta})
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "adapter")
    _save_rank_map(alloc, out)
    print(format_rank_table(alloc))
    print(f"\ncalibration: {seconds:.1f} s; adapter -> {out / 'adapter'}; rank map -> {out / 'rank_map.json'}, "
          f"{out / 'rank_map.png'}")
    return 0


def cmd_plot(args) -> int:
    from .allocation import RankAllocation
    from .rankmap import plot_rank_map

    alloc = RankAllocation.from_json(args.rank_map)
    out = Path(args.out) if args.out else Path(args.rank_map).with_suffix(".png")
    plot_rank_map(alloc, out, scores=not args.no_scores)
    print(f"rank map -> {out}")
    return 0


def cmd_check(args) -> int:
    from .check import check_adapter

    names = None
    if args.base_model:
        from transformers import AutoConfig, AutoModel

        from .models import resolve_model

        cfg = AutoConfig.from_pretrained(resolve_model(args.base_model))
        import torch

        with torch.device("meta"):
            base = AutoModel.from_config(cfg)
        names = [n for n, _ in base.named_modules()]
        # Adapters are saved from task models (BertForSequenceClassification, LlamaForCausalLM):
        # allow the task model's prefix too.
        prefix = getattr(base, "base_model_prefix", "")
        if prefix:
            names += [f"{prefix}.{n}" if n else prefix for n in names]
    report = check_adapter(args.adapter_dir, names)
    print(report.format())
    return 0 if report.ok else 1


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)


def cmd_run(args) -> int:
    from .experiment import _is_finished, expand_runs, load_config, parse_shard, run_sweep

    cfg = load_config(args.config)
    shard = parse_shard(args.shard)
    results = Path(args.results or Path("results") / cfg.name)
    if args.list:
        runs = expand_runs(cfg)
        if shard:
            runs = runs[shard[0]::shard[1]]
        for r in runs:
            print(("done " if _is_finished(results / f"{r.run_id}.json") else "todo ") + r.run_id)
        return 0
    counts = run_sweep(cfg, results, shard=shard, only=args.only, progress=not args.no_progress)
    print(f"{cfg.name}: {counts} -> {results}")
    return 1 if counts["failed"] else 0


def cmd_report(args) -> int:
    from .report import write_report

    dirs = [Path(d) for d in args.results_dir]
    for d in dirs:
        if not d.is_dir():
            raise FileNotFoundError(f"results_dir: {d} is not a folder")
    out = Path(args.out) if args.out else dirs[0] / "report.md"
    preface = Path(args.preface).read_text(encoding="utf-8") if args.preface else None
    write_report(dirs, out, args.title, args.commands, preface)
    print(f"report -> {out} (+ {out.with_suffix('.csv').name})")
    return 0


COMMANDS = {"calibrate": cmd_calibrate, "plot": cmd_plot, "check": cmd_check, "demo": cmd_demo,
            "run": cmd_run, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError) as e:
        print(f"fimlora {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
