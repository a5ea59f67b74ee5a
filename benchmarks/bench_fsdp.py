"""FSDP2-sharded calibration against the sharded training it precedes: per-process peak memory and time.

    .venv/bin/python benchmarks/bench_fsdp.py                          # minutes; section 6 of docs/benchmarks.md
    .venv/bin/python benchmarks/bench_fsdp.py --smoke --out /tmp/b.md  # under a minute; used by the tests

Every case and mode runs in a fresh `torchrun --nproc_per_node 2` (gloo, one thread per process): the model
(llama_base with LoRA r = 8 on every projection) is sharded with fully_shard per decoder layer and at the root,
then each process runs on its own N batches:

* ``train``: one sharded training step (forward, backward, AdamW step), the peak memory to compare with;
* ``floor``: N sharded forward + backward passes with LoRA A and B trainable, no optimizer, eval mode (as
  calibration): the time to compare with;
* ``batch``/``per_example``: ``compute_fisher`` with that estimator on the N batches.

Memory (modes ``train``, ``batch``, ``per_example``, one fresh torchrun each): the RSS high-water mark (VmHWM,
reset after the model is built and sharded and the progress bar's module is imported) of one run, per process.
Time (mode ``time``, one torchrun): after one warm-up run of each, ``repeats`` rounds of floor, batch and
per_example back to back, each a barrier-to-barrier wall time; the ratios are per round (the machine is shared,
so the three runs of a round see the same load). Targets
(issue 14): calibration peak <= the training step's peak + that process's Fisher buffers (fp32, the size of
every module's whole B; the batch estimator also holds one B-sized fp32 gradient per module during a
backward), and calibration time <= 1.05 x the floor.

The section is written between two marker lines into --out (docs/benchmarks.md), before its "## GPU"
section; bench_calibration.py keeps it when it regenerates the other sections.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT), str(HERE)]

from memory_child import status_bytes  # noqa: E402
from sections import put_section, wrap  # noqa: E402

NAME = "bench_fsdp.py"  # the marked section's name in docs/benchmarks.md (see sections.py)
MEMORY_MODES = ("train", "batch", "per_example")
TIMED = ("floor", "batch", "per_example")
ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (label, layers, hidden, (batches per process, batch size, sequence length))
CASES = {
    "full": [("llama 4x256", 4, 256, (8, 8, 64)), ("llama 8x512", 8, 512, (8, 8, 128))],
    "smoke": [("llama 2x64", 2, 64, (2, 4, 16))],
}
# As bench_calibration.CHILD_ENV: single-threaded, glibc's mmap threshold fixed so the RSS follows live tensors.
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}


# ----------------------------------------------------------------------------- the worker (one process of torchrun)


def sharded_model(layers: int, hidden: int):
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import fully_shard

    from tests.references import llama_base

    model = get_peft_model(llama_base(layers, hidden), LoraConfig(r=8, lora_alpha=16, target_modules=ALL_PROJ,
                                                                   task_type="CAUSAL_LM"))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def run_mode(model, batches, mode: str, optimizer) -> None:
    """One run of ``mode`` on this process's batches (see the module docstring)."""
    from fimlora import FimConfig, compute_fisher

    if mode == "train":
        model.train()
        model(**batches[0]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    elif mode == "floor":
        model.eval()
        for b in batches:
            model(**b).loss.backward()
        model.zero_grad(set_to_none=True)
    else:
        compute_fisher(model, batches, FimConfig(n_batches=len(batches), estimator=mode, progress=False))


def worker(case: list, mode: str, repeats: int, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from tests.references import lm_batches

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    _, layers, hidden, (n, bs, seq) = case
    model = sharded_model(layers, hidden)
    batches = lm_batches(n_batches=n, batch_size=bs, seq=seq, seed=100 + rank)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]) if mode == "train" else None
    fisher_bytes = sum(p.numel() * 4 for name, p in model.named_parameters() if "lora_B" in name)  # whole B, fp32
    import tqdm.auto  # noqa: F401  (calibration's progress bar: a one-time import, not calibration's memory)

    if mode == "time":
        row = {"seconds": timed_rounds(model, batches, repeats)}
    else:
        ctypes.CDLL(None).malloc_trim(0)
        dist.barrier()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS
        loaded = status_bytes("VmRSS")
        run_mode(model, batches, mode, optimizer)
        row = {"loaded": loaded, "peak": status_bytes("VmHWM"), "fisher_bytes": fisher_bytes}
    Path(out_dir, f"{mode}.rank{rank}.json").write_text(json.dumps(row))
    dist.destroy_process_group()


def timed_rounds(model, batches, repeats: int) -> dict[str, list[float]]:
    """Seconds of each TIMED mode per round, barrier to barrier, after one warm-up run of each."""
    import torch.distributed as dist

    for mode in TIMED:
        run_mode(model, batches, mode, None)
    seconds = {mode: [] for mode in TIMED}
    for _ in range(repeats):
        for mode in TIMED:
            dist.barrier()
            t = time.perf_counter()
            run_mode(model, batches, mode, None)
            dist.barrier()
            seconds[mode].append(time.perf_counter() - t)
    return seconds


# ----------------------------------------------------------------------------- the parent: launch, render, write


def launch(case: tuple, mode: str, repeats: int, out_dir: str) -> None:
    env = {**os.environ, **CHILD_ENV,
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH"))
                                         if p)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           "--worker", json.dumps([case, mode, repeats, out_dir])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bench_fsdp: {case[0]} {mode} failed:\n{proc.stderr[-3000:]}")


def measure(size: str, repeats: int) -> list[dict]:
    rows = []
    for case in CASES[size]:
        with tempfile.TemporaryDirectory() as tmp:
            for mode in (*MEMORY_MODES, "time"):
                print(f"{case[0]}: {mode}", flush=True)
                launch(case, mode, repeats, tmp)
            runs = {m: [json.loads(Path(tmp, f"{m}.rank{r}.json").read_text()) for r in (0, 1)]
                    for m in (*MEMORY_MODES, "time")}
        rows.append({"label": case[0], "batches": case[3], "runs": runs})
    return rows


def mb(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.1f}"


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2


def render_row(row: dict) -> tuple[list[str], list[str]]:
    """The memory rows (one per process) and the time row of one case."""
    runs = row["runs"]
    n, bs, seq = row["batches"]
    memory = []
    for rank in (0, 1):
        train, fisher = runs["train"][rank]["peak"], runs["batch"][rank]["fisher_bytes"]
        cells = [row["label"], str(rank), mb(runs["train"][rank]["loaded"]), mb(train), mb(fisher)]
        for est in ("batch", "per_example"):
            peak = runs[est][rank]["peak"]
            cells += [mb(peak), "yes" if peak <= train + fisher else "NO"]
        memory.append("| " + " | ".join(cells) + " |")
    # The slower process sets the pace (barrier to barrier), so each round's times are the same on both.
    seconds = runs["time"][0]["seconds"]
    floor = seconds["floor"]
    cells = [row["label"], f"2 x {n} x [{bs}, {seq}]", f"{median(floor):.3f}"]
    for est in ("batch", "per_example"):
        ratios = [a / b for a, b in zip(seconds[est], floor)]
        cells += [f"{median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})",
                  "yes" if median(ratios) <= 1.05 else "NO"]
    return memory, ["| " + " | ".join(cells) + " |"]


def render_section(rows: list[dict], repeats: int, command: str, note: str) -> str:
    import torch

    memory, timing = [], []
    for row in rows:
        m, t = render_row(row)
        memory += m
        timing += t
    lines = [
        "## 6. FSDP2-sharded calibration (2 processes, gloo, CPU)", "",
        f"Generated by `{command}` on {time.strftime('%Y-%m-%d')} (torch {torch.__version__}, {repeats} timed "
        f"repeats, one thread per process).{' Machine note: ' + note if note else ''} A seeded LLaMA of the size "
        "in the label, LoRA r = 8 on every projection, sharded with `fully_shard` per decoder layer and at the "
        "root; every process calibrates on its own N batches. Each case and mode runs in a fresh `torchrun "
        "--nproc_per_node 2`.", "",
        "Peak memory per process (MB, RSS high-water mark from the end of loading and sharding; the training "
        "step is forward, backward and an AdamW step). Target: calibration peak <= training step peak + that "
        "process's Fisher buffers (fp32, the size of every module's whole B).", "",
        "| model | process | loaded | training step peak | Fisher buffers | batch peak | within | "
        "per_example peak | within |",
        "|---|---|---|---|---|---|---|---|---|", *memory, "",
        "Time against the sharded floor: N sharded forward + backward passes with LoRA A and B trainable (no "
        "optimizer), in the same process, floor and both estimators back to back in each round. Median of the "
        "per-round ratios (min–max), barrier to barrier. Target: <= 1.05.", "",
        "| model | batches | floor s | batch / floor | within | per_example / floor | within |",
        "|---|---|---|---|---|---|---|", *timing,
    ]
    return wrap(NAME, "\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat: checks the script runs")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--note", default="", help="a sentence about the machine during the run")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(*json.loads(args.worker))
        return 0
    size = "smoke" if args.smoke else "full"
    repeats = 1 if args.smoke else args.repeats
    rows = measure(size, repeats)
    command = "python benchmarks/bench_fsdp.py" + (" --smoke" if args.smoke else "")
    out = Path(args.out)
    old = out.read_text() if out.exists() else ""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(put_section(old, render_section(rows, repeats, command, args.note), NAME))
    out.with_name(out.stem + "_fsdp.json").write_text(json.dumps(rows, indent=2))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
