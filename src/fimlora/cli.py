"""The ``fimlora`` command: calibrate, plot, check, export, demo, run, report."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import warnings
from pathlib import Path

from . import __version__
from .app.demo import DEMO_TARGET_MODULES, DemoJob
from .app.jobs import MIN_MAX_LENGTH, CalibrateJob
from .app.tasks import TASK_TYPES, TASKS
from .check import SERVE_ENGINES
from .config import (
    AGGREGATIONS,
    AUTO_RULE_NAMES,
    ESTIMATORS,
    FIM_DEFAULTS,
    LR_RULE_CHOICES,
    SCALE_MODES,
    VLLM_MAX_LORA_RANKS,
    setting_help,
)
from .export import EXPORT_ENGINES

__all__ = ["main", "build_parser"]

logger = logging.getLogger("fimlora")

# Defaults and choices come from the library's and the harness's own constants, never a second list.
def _defaults(cls) -> dict:
    return {f.name: None if f.default is dataclasses.MISSING else f.default for f in dataclasses.fields(cls)}


JOB_DEFAULTS = _defaults(CalibrateJob)
DEMO_DEFAULTS = _defaults(DemoJob)
TARGET_DEFAULT_HELP = "PEFT's default for the architecture, e.g. query and value only on BERT"


# The FimConfig settings calibrate and demo take as flags (--n-batches, ...), with what argparse needs to parse
# them; each flag's help and default are FimConfig's own (config.setting_help, FIM_DEFAULTS).
CALIBRATION_FLAGS = {"n_batches": {"metavar": "N|auto"}, "auto_rule": {"choices": AUTO_RULE_NAMES},
                     "estimator": {"choices": ESTIMATORS}, "aggregation": {"choices": AGGREGATIONS},
                     "scale": {"choices": SCALE_MODES}, "r_min": {"type": int}, "r_max": {"type": int},
                     "seed": {"type": int}, "lr_rule": {"choices": LR_RULE_CHOICES},
                     "lr_batches": {"type": int}, "lr_steps": {"type": int}}


def _add_calibration_args(p: argparse.ArgumentParser, job: dict) -> None:
    g = p.add_argument_group("FIM-LoRA")
    g.add_argument("--r", type=int, default=job["r"],
                   help=f"base LoRA rank r; the budget is (number of modules) x r (default {job['r']})")
    g.add_argument("--alpha", type=float, default=None, help="lora_alpha, > 0 (default 2r)")
    for name, kwargs in CALIBRATION_FLAGS.items():
        default = FIM_DEFAULTS[name]
        shown = "" if default is None else f" (default {default})"
        g.add_argument(f"--{name.replace('_', '-')}", default=default, help=setting_help(name, plain=True) + shown,
                       **kwargs)


def _add_budget_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("budget and serving")
    g.add_argument("--budget", default=None,
                   help="total rank over all modules, N (default: the current total, modules x r); or 0.5x: "
                        "that fraction of the uniform adapter's size in parameters")
    g.add_argument("--budget-params", type=int, default=None,
                   help="total LoRA parameters, sum_m r_m * (d_in + d_out); a rank there costs d_in + d_out")
    g.add_argument("--max-lora-rank", type=int, default=None, choices=VLLM_MAX_LORA_RANKS, metavar="K",
                   help="vLLM's --max-lora-rank to serve with (one of "
                        f"{', '.join(map(str, VLLM_MAX_LORA_RANKS))}); r_max defaults to it and may not exceed it")


def _add_model_data_args(p: argparse.ArgumentParser, job: dict, required: bool = True,
                         target_default: str = TARGET_DEFAULT_HELP) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=required, default=job["model"],
                   help="local folder, offline alias (minilm, smollm2) or hub name"
                        + ("" if required else f" (default {job['model']})"))
    g.add_argument("--data", required=required, default=job["data"],
                   help=f"bundled task ({', '.join(TASKS)}), a .jsonl/.csv/.json file, or hf:NAME[:CONFIG]"
                        + ("" if required else f" (default {job['data']})"))
    g.add_argument("--task-type", choices=TASK_TYPES, default=None,
                   help="what a text/label file's labels are: classification (each distinct label a class) or "
                        "regression (target numbers, MSE); needed when every label is a number and some are not "
                        "whole (scores)")
    g.add_argument("--target-modules", nargs="+", default=None,
                   help=f"LoRA target modules (default: {target_default}); 'all-linear' alone adapts every linear "
                        "layer but the output layer")
    g.add_argument("--n-layers", type=int, default=None, help="keep only the first N layers (fast experiments)")
    g.add_argument("--batch-size", type=int, default=job["batch_size"],
                   help=f"calibration/training batch size (default {job['batch_size']})")
    g.add_argument("--max-length", type=int, default=job["max_length"],
                   help=f"max tokens per example, >= {MIN_MAX_LENGTH} (default {job['max_length']})")
    g.add_argument("--max-train", type=int, default=job["max_train"],
                   help="subsample the training split to this many examples"
                        + (f" (default {job['max_train']})" if job["max_train"] else ""))


def _add_base_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantised base model and DoRA")
    g.add_argument("--load-in-4bit", action="store_true",
                   help="load the base model in 4-bit NF4 through bitsandbytes (QLoRA; pip install 'fimlora[qlora]')")
    g.add_argument("--load-in-8bit", action="store_true",
                   help="load the base model in 8 bits through bitsandbytes (pip install 'fimlora[qlora]')")
    g.add_argument("--use-dora", action="store_true", help="DoRA adapters (PEFT's use_dora) instead of plain LoRA")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fimlora",
        description="Task-informed LoRA ranks from the empirical Fisher of LoRA-B; outputs standard PEFT adapters.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--version", action="version", version=f"fimlora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_calibrate_command, _add_plot_command, _add_check_command, _add_export_command,
                _add_demo_command, _add_run_command, _add_report_command):
        add(sub)
    return parser


def _add_calibrate_command(sub) -> None:
    p = sub.add_parser("calibrate", help="calibrate, allocate and save a resized, untrained adapter",
                       description="Calibrate FIM-LoRA on a model and data set and write the resized, untrained "
                                   "PEFT adapter, rank_map.json and rank_map.png to --out.")
    _add_model_data_args(p, JOB_DEFAULTS)
    _add_base_model_args(p)
    _add_calibration_args(p, JOB_DEFAULTS)
    _add_budget_args(p)
    _add_out_args(p)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_out_args(p: argparse.ArgumentParser) -> None:
    """The output folder of every command that writes one (one rule: :func:`fimlora.io.check_output_dir`)."""
    p.add_argument("--out", required=True, help="output folder: new or empty (a symlink, mount point or prepared "
                                                "folder is written into, not replaced)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier fimlora output in --out; a folder holding anything fimlora did not "
                        "write is refused, never deleted")


def _add_plot_command(sub) -> None:
    p = sub.add_parser("plot", help="draw a rank map heatmap from rank_map.json",
                       description="Draw the layer x module-type heatmap of a rank map (PNG or SVG).")
    p.add_argument("rank_map", help="path to rank_map.json")
    p.add_argument("--out", default=None, help="output image (.png or .svg; default next to the JSON)")
    p.add_argument("--no-scores", action="store_true", help="draw only the rank panel")


def _add_check_command(sub) -> None:
    p = sub.add_parser("check", help="check a saved adapter for the problems that break rank_pattern adapters",
                       description="Check pattern keys, ranks vs tensor shapes, scaling and vLLM max_lora_rank. "
                                   "Exits 1 on any problem.")
    p.add_argument("adapter_dir", help="folder with adapter_config.json and adapter_model.safetensors")
    p.add_argument("--base-model", default=None,
                   help="also match keys against every module of this base model (folder, alias or hub name)")
    p.add_argument("--n-layers", type=int, default=None,
                   help="with --base-model: that model cut to its first N layers, as calibrate --n-layers made "
                        "the adapter")
    p.add_argument("--serve", choices=SERVE_ENGINES, default=None, metavar="ENGINE",
                   help="judge only this engine (" + ", ".join(SERVE_ENGINES) + "): serving the adapter wrongly "
                        "(a refusal, or a module scaled otherwise than PEFT) is a problem, with the command that "
                        "fixes it; without it, every engine that would serve it wrongly is named")


def _add_export_command(sub) -> None:
    p = sub.add_parser("export", help="write an adapter that a serving engine serves exactly as PEFT computes it",
                       description="Fold each module's scale into lora_B where the engine's scale rule differs "
                                   "from PEFT's (vLLM <= 0.31: one lora_alpha/r; llama.cpp: lora_alpha/r_m), or "
                                   "merge the adapter into the base model. Writes fimlora_export.json too.")
    p.add_argument("adapter_dir", help="folder with adapter_config.json and adapter_model.safetensors")
    p.add_argument("--for", dest="engine", required=True, choices=EXPORT_ENGINES, metavar="ENGINE",
                   help="the engine to serve with: " + ", ".join(EXPORT_ENGINES))
    _add_out_args(p)
    p.add_argument("--base-model", default=None,
                   help="base model for --for merged (folder, alias or hub name)")
    p.add_argument("--n-layers", type=int, default=None,
                   help="merge onto the base model cut to its first N layers (an adapter from calibrate --n-layers)")


def _add_demo_command(sub) -> None:
    p = sub.add_parser("demo", help="the offline demo: FIM-LoRA vs uniform LoRA on real MiniLM + SST-2",
                       description="Calibrate FIM-LoRA on MiniLM with the sentiment task, show the rank map, "
                                   "fine-tune uniform LoRA and FIM-LoRA at the same budget, data and seed, and "
                                   "print accuracy, trainable parameters and wall time side by side.")
    _add_model_data_args(p, DEMO_DEFAULTS, required=False, target_default=", ".join(DEMO_TARGET_MODULES))
    _add_calibration_args(p, DEMO_DEFAULTS)
    p.add_argument("--steps", type=int, default=DEMO_DEFAULTS["steps"],
                   help=f"training steps per method (default {DEMO_DEFAULTS['steps']})")
    p.add_argument("--lr", type=float, default=DEMO_DEFAULTS["lr"],
                   help=f"learning rate (default {DEMO_DEFAULTS['lr']})")
    p.add_argument("--max-test", type=int, default=DEMO_DEFAULTS["max_test"], help="subsample the test split")
    p.add_argument("--eval-data", default=DEMO_DEFAULTS["eval_data"],
                   help="your own validation file (.jsonl/.csv) for --data FILE; without it FILE is split 80/20")
    p.add_argument("--out", default=DEMO_DEFAULTS["out"], help=f"output folder (default {DEMO_DEFAULTS['out']})")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_run_command(sub) -> None:
    p = sub.add_parser("run", help="run an experiment grid from a YAML config (resumable, shardable)",
                       description="Run every run of an experiment config; each writes one JSON result. "
                                   "Finished runs are skipped, so a killed sweep resumes where it stopped.")
    p.add_argument("config", help="experiment YAML (see configs/)")
    p.add_argument("--results", default=None, help="results folder (default results/<config name>)")
    p.add_argument("--shard", default=None, help="i/n: run only every n-th run starting at i (0-based)")
    p.add_argument("--only", default=None, help="run only runs whose id contains this text")
    p.add_argument("--list", action="store_true", help="list the runs and whether they are finished, run nothing")
    p.add_argument("--reuse", action="append", default=[], metavar="DIR",
                   help="copy a run's finished result from this results folder instead of running it, when it "
                        "was made with the same settings (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_report_command(sub) -> None:
    p = sub.add_parser("report", help="write the paper's tables (Markdown + CSV) from run results",
                       description="Read every run JSON under RESULTS_DIR and write mean ± std tables, the rank "
                                   "sweep, ablations, FIM vs random counts and rank-map statistics.")
    p.add_argument("results_dir", nargs="+", help="results folder(s)")
    p.add_argument("--out", default=None, help="Markdown output (default RESULTS_DIR/report.md; CSV next to it)")
    p.add_argument("--title", default=None, help="report title")
    p.add_argument("--preface", default=None, help="a Markdown file placed after the commands (the authors' reading)")
    p.add_argument("--command", action="append", default=None, dest="commands",
                   help="a command that produced the results, quoted in the report (repeatable)")


def _job(cls, args):
    """A job dataclass from the parsed arguments that share its field names or FimConfig's."""
    names = {f.name for f in dataclasses.fields(cls)} | set(CALIBRATION_FLAGS)
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    values["progress"] = not getattr(args, "no_progress", False)
    return cls.from_settings(**values)


def cmd_calibrate(args) -> int:
    from .app.jobs import CalibrateJob, run_calibrate
    from .rankmap import format_rank_table

    result = run_calibrate(_job(CalibrateJob, args))
    print(format_rank_table(result.allocation))
    batches = result.allocation.settings.get("n_batches_used")
    labels = f" (labels {result.task.label_names})" if result.task.label_names else ""
    print(f"\ndata: {result.task.meta.get('n_train')} training examples of {args.data}{labels}; "
          f"calibrated on {batches} shuffled batches of {args.batch_size}")
    if "stop_reason" in result.allocation.settings:
        print(f"n_batches auto: stopped after {batches} batch{'' if batches == 1 else 'es'}; "
              f"{result.allocation.settings['stop_reason']}")
    print(f"calibration: {result.seconds:.1f} s; wrote " + ", ".join(str(f) for f in result.files))
    for note in result.notes:
        print(f"note: {note}")
    return 0


def cmd_plot(args) -> int:
    from .allocation import RankAllocation
    from .rankmap import plot_rank_map

    alloc = RankAllocation.from_json(args.rank_map)
    out = Path(args.out) if args.out else Path(args.rank_map).with_suffix(".png")
    print(f"rank map -> {plot_rank_map(alloc, out, scores=not args.no_scores)}")
    return 0


def cmd_check(args) -> int:
    from .check import check_adapter

    base_modules = None
    if args.n_layers is not None and not args.base_model:
        raise ValueError(f"n_layers: cuts the base model given with --base-model; got --n-layers {args.n_layers} "
                         "without one")
    if args.base_model:
        from .app.models import base_module_shapes

        base_modules = base_module_shapes(args.base_model, args.n_layers, _adapter_task_type(args.adapter_dir))
    report = check_adapter(args.adapter_dir, base_modules, serve=args.serve)
    print(report.format())
    return 0 if report.ok else 1


def _adapter_task_type(adapter_dir: str) -> str | None:
    """The adapter config's task_type, which names the task model PEFT loads it onto; None when the config cannot
    be read (check_adapter reports why)."""
    from .check import CONFIG_NAME, UnreadableAdapter, read_adapter_config

    try:
        return read_adapter_config(Path(adapter_dir) / CONFIG_NAME).get("task_type")
    except (UnreadableAdapter, OSError):
        return None


def cmd_export(args) -> int:
    from .export import export_adapter

    base = None
    if args.base_model:
        if args.engine != "merged":
            raise ValueError(f"base-model: only --for merged uses a base model, got --for {args.engine}")
        from .app.models import resolve_model

        base = resolve_model(args.base_model)
    plan = export_adapter(args.adapter_dir, args.engine, args.out, base_model=base, overwrite=args.overwrite,
                          n_layers=args.n_layers)
    changed = sum(f != 1.0 for f in plan.b_factors.values())
    print(f"exported {args.adapter_dir} for {args.engine} -> {args.out} ({plan.rule}; lora_B rescaled in {changed} "
          f"of {len(plan.b_factors)} module(s))")
    print(f"serve: {plan.record()['serve']}")
    return 0


def cmd_demo(args) -> int:
    from .app.demo import DemoJob, run_demo

    run_demo(_job(DemoJob, args))
    return 0


def cmd_run(args) -> int:
    from .bench.config import load_config, parse_shard
    from .bench.sweep import plan_sweep, run_sweep

    cfg = load_config(args.config)
    shard = parse_shard(args.shard)
    results = Path(args.results or Path("results") / cfg.name)
    if args.list:
        plan = plan_sweep(cfg, results, shard, args.only)
        for run in plan.runs:
            print(f"{_run_state(plan, run.run_id):<6} {run.run_id}")
        return 0
    counts = run_sweep(cfg, results, shard=shard, only=args.only, progress=not args.no_progress, reuse=args.reuse)
    print(f"{cfg.name}: {counts['total']} runs in this plan: {counts['ok']} ok, {counts['diverged']} diverged, "
          f"{counts['failed']} failed, {counts['skipped']} already done, {counts['reused']} reused, "
          f"{counts['busy']} held by another worker"
          + (f", {counts['undecided']} cell(s) without a chosen learning rate yet" if counts.get('undecided') else "")
          + f" -> {results}")
    return 1 if counts["failed"] else 0


def _run_state(plan, run_id: str) -> str:
    for state, ids in (("done", plan.finished), ("stale", plan.stale), ("failed", plan.failed)):
        if run_id in ids:
            return state
    return "todo"


def cmd_report(args) -> int:
    from .bench.report import write_report

    out = write_report([Path(d) for d in args.results_dir], args.out, args.title, args.commands, args.preface)
    print(f"report -> {out} (+ {out.with_suffix('.csv').name})")
    return 0


COMMANDS = {"calibrate": cmd_calibrate, "plot": cmd_plot, "check": cmd_check, "export": cmd_export, "demo": cmd_demo,
            "run": cmd_run, "report": cmd_report}


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line a user reads (what and why), without the source line that raised them."""
    print(f"fimlora: warning: {message}", file=sys.stderr)


class _UserFormatter(logging.Formatter):
    """Log records in the same one-line shape as warnings and errors: ``fimlora: warning: ...`` (another library's
    records keep that library's name)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        source = "fimlora" if record.name.split(".")[0] == "fimlora" else record.name
        if source == "fimlora":
            message = message.removeprefix("fimlora: ")  # older messages carry the prefix themselves
        text = f"{source}: {record.levelname.lower()}: {message}"
        return f"{text}\n{self.formatException(record.exc_info)}" if record.exc_info else text


def main(argv: list[str] | None = None) -> int:
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(_UserFormatter())
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, handlers=[handler])
    # bitsandbytes (imported by PEFT when installed) warns on every import that it cannot fetch an optional
    # CPU kernel from the hub; nothing a user of this command can act on.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.showwarning = _show_warning
    try:
        return COMMANDS[args.command](args)
    except (ValueError, OSError, ImportError) as e:
        # OSError covers a hub name without network (transformers raises it with advice) and unreadable files.
        # Bad input or a missing extra: the message says what to change; a traceback would bury it.
        print(f"fimlora {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
