"""The GPU check of issue #15: FIM-LoRA calibration on a Llama-3-8B-shaped model on one GPU; writes the GPU section.

    bash benchmarks/gpu_check.sh                      # one GPU, no network, within a 7-minute budget
    bash benchmarks/gpu_check.sh --cpu-tiny           # the same code path on the CPU at a tiny shape (seconds)
    .venv/bin/python benchmarks/gpu_check.py --help   # what gpu_check.sh runs

The model is LlamaForCausalLM with the shape of Llama-3-8B (32 layers, hidden 4096, intermediate 14336, 32 heads,
8 KV heads, vocab 128256) and random weights (seed 0), built directly on the device in bf16 (no fp32 copy, no
download); LoRA r = 16 (alpha 32) on all seven projections (224 modules); data: 8 batches of 4 x 2048 random tokens
(labels = inputs). Phases, in this order, each guarded (an out-of-memory error or any other exception is recorded
and the next phase runs):

* ``bf16``: calibration time against its floor (N = 8 plain LoRA forward + backward steps, LoRA A and B trainable,
  no optimizer; bench_calibration.floor_steps) for ``estimator="batch"`` and ``"per_example"``: one warm-up of each,
  then up to --repeats rounds, each timing floor, batch and per_example in turn between ``torch.cuda.synchronize()``
  calls. Then the peak ``torch.cuda.max_memory_allocated`` of one LoRA training step (forward + backward, no
  optimizer) and of calibration on one batch with each estimator, each after ``reset_peak_memory_stats``.
  Gradient checkpointing (non-reentrant) is on unless --no-gradient-checkpointing; with it the floor runs in train
  mode so that checkpointing runs there too, as it does in calibration (fimlora keeps it on).
* ``qlora`` (if bitsandbytes imports): the same on the model quantised to 4-bit nf4 (bf16 compute), then
  prepare_model_for_kbit_training (reentrant checkpointing, PEFT's default) and the same LoRA; floor in train mode.
* ``eva``: PEFT's EVA initialisation (rho 2, tau 0.99) on the same 8 batches, until its convergence criterion or
  the end of the time budget, against the batch estimator's calibration time of the ``bf16`` phase.

The time budget (--budget-s, default 420 s from the start of main) bounds the run: the repeats of a phase stop at
its share of the budget, and ``qlora`` and ``eva`` are skipped, with the reason recorded, when their estimated cost
does not fit in what is left. Writes every measurement to --json (docs/benchmarks_gpu.json) and replaces the
``## GPU`` section of --md (docs/benchmarks.md), rendered by bench_calibration.render_gpu, which
bench_calibration.py also uses, so that re-running either script keeps the other's sections. Exits 1 if any phase
failed (out of memory or error), 2 without CUDA unless --cpu-tiny.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench_calibration and memory_child, also when this file is loaded by path

from bench_calibration import (  # noqa: E402  (bench_calibration also puts src/ and the repo root on sys.path)
    ALL_PROJ,
    ESTIMATORS,
    ROOT,
    floor_steps,
    gpu_json_path,
    lora_layer_types,
    lora_step,
    med,
    render_gpu,
    timed,
)

# ----------------------------------------------------------------------------- shapes and settings


class Shape(NamedTuple):
    """A LLaMA shape and its calibration data: ``n_batches`` batches of ``batch_size`` x ``seq`` tokens."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    n_batches: int
    batch_size: int
    seq: int


LLAMA3_8B = Shape(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256, n_batches=8,
                  batch_size=4, seq=2048)
# --cpu-tiny: the same code at a size the CPU runs in seconds. Every projection has d_in a multiple of 64 and d_out
# of 32 (bitsandbytes' CPU 4-bit kernels need it, see tests/references.save_tiny_llama), and a batch has at least
# EVA's 2r = 32 tokens (EVA skips its SVD on fewer tokens than components).
TINY = Shape(layers=2, hidden=64, intermediate=128, heads=2, kv_heads=1, vocab=256, n_batches=2, batch_size=2, seq=32)

LORA_R = 16
EVA_RHO = 2.0
# Shares of the budget (from the start) after which the bf16 and QLoRA phases stop adding timed rounds.
BF16_ROUNDS_UNTIL = 0.35
QLORA_ROUNDS_UNTIL = 0.75
# A QLoRA pass (dequantise, reentrant checkpointing) is assumed to cost at most this many bf16 passes when deciding
# whether the QLoRA phase fits the time left.
QLORA_PASS_FACTOR = 2.0
OPTIONAL = ("qlora", "eva")
OOM_ERRORS = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),)


class BudgetSpent(Exception):
    """Raised inside EVA's loop when the time budget is spent."""


class Budget:
    """Seconds since the start of the run, against ``total_s``."""

    def __init__(self, total_s: float):
        self.total_s, self.start = total_s, time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.total_s - self.elapsed()

    def at(self, share: float) -> float:
        """The time.monotonic() at which ``share`` of the budget is spent."""
        return self.start + share * self.total_s


# ----------------------------------------------------------------------------- device helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synced(fn, device: torch.device):
    """``fn`` followed by a device synchronisation, so that a wall-clock timer measures its GPU work too."""

    def run():
        fn()
        sync(device)

    return run


def free(device: torch.device) -> None:
    """Collect garbage and give the caching allocator's free blocks back, so one phase's leftovers do not count in
    the next (a recorded exception's traceback is dropped before this is called)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


class PeakMemory:
    """Peak bytes of one step: ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU (--cpu-tiny) the process RSS
    high-water mark (memory_child's VmHWM reset; Linux only), so the tiny run takes the same path."""

    def __init__(self, device: torch.device):
        self.device = device
        self.metric = ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                       else "process RSS high-water mark, CPU")

    def reset(self) -> int:
        """Reset the peak; the bytes in use now."""
        free(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        from memory_child import reset_peak_rss, status_bytes

        ctypes.CDLL(None).malloc_trim(0)
        reset_peak_rss()
        return status_bytes("VmRSS")

    def peak(self) -> int:
        sync(self.device)
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        from memory_child import status_bytes

        return status_bytes("VmHWM")


# ----------------------------------------------------------------------------- model and data


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_base(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """LlamaForCausalLM of ``shape`` with random weights (seed), created on ``device`` in ``dtype``: under the device
    context and the default dtype every parameter is allocated there at once (an 8B model never exists in fp32 or on
    the CPU). RoPE keeps LlamaConfig's default theta: the cost does not depend on it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, max_position_embeddings=max(2048, shape.seq),
                         tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        model = LlamaForCausalLM(config)
    wrong = {n: p.dtype for n, p in model.named_parameters() if p.dtype != dtype or p.device.type != device.type}
    if wrong:
        raise RuntimeError(f"build_base: parameters not in {dtype} on {device}: {dict(list(wrong.items())[:3])}")
    return model.eval()


def make_batches(shape: Shape, device: torch.device, seed: int = 1) -> list[dict]:
    """``n_batches`` batches of random token ids in [1, vocab) (labels = inputs), on ``device``; timings and memory
    depend on the shapes only."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(shape.n_batches):
        ids = torch.randint(1, shape.vocab, (shape.batch_size, shape.seq), generator=g)
        out.append({k: v.to(device) for k, v in
                    {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}.items()})
    return out


def lora_config(**kw):
    from peft import LoraConfig

    return LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, target_modules=list(ALL_PROJ), lora_dropout=0.0,
                      task_type="CAUSAL_LM", **kw)


def add_lora(base: nn.Module) -> nn.Module:
    """PEFT LoRA r = 16 on the seven projections, A drawn from seed 0 (PEFT's defaults otherwise: with a bf16 base
    the adapter weights are fp32, as users get them)."""
    from fimlora.app.builders import build_peft_model

    return build_peft_model(base, lora_config(), seed=0)


def quantise_4bit_(model: nn.Module, device: torch.device, compute_dtype: torch.dtype) -> nn.Module:
    """Replace every projection (not lm_head) by bitsandbytes' Linear4bit holding its weight in nf4, in place.

    This is what transformers' bitsandbytes loading does (replace_with_bnb_linear, then Params4bit(...).to(device)
    quantises each weight; ``is_loaded_in_4bit`` set on the model), done from the weights in memory instead of a
    checkpoint: a random 8B model would otherwise need a 16 GB save to disk first. nf4 without double quantisation
    and the compute dtype given, as BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    bnb_4bit_compute_dtype=...) sets up. Each bf16 weight is freed as soon as its layer is replaced.
    """
    import bitsandbytes as bnb

    # Names, not modules: a list of the modules would keep every replaced bf16 weight alive to the end.
    targets = [(parent, name) for parent, module in model.named_modules() for name, child in module.named_children()
               if name in ALL_PROJ and type(child) is nn.Linear]
    for parent_name, name in targets:
        parent = model.get_submodule(parent_name)
        child = getattr(parent, name)
        q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=False, quant_type="nf4", device="meta")
        q._parameters["weight"] = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=False,
                                                    quant_type="nf4", module=q).to(device)
        if child.bias is not None:
            q.bias = nn.Parameter(child.bias.data, requires_grad=False)
        setattr(parent, name, q)
        del child, parent
    model.is_loaded_in_4bit = True
    return model


def fisher_bytes(model: nn.Module) -> int:
    """fp32 size of all LoRA-B matrices: the Fisher buffers calibration allocates."""
    return sum(p.numel() * 4 for n, p in model.named_parameters() if "lora_B" in n)


def lora_summary(model: nn.Module) -> dict:
    from fimlora.modules import lora_modules

    infos = lora_modules(model)
    return {"modules": len(infos), "layer_types": lora_layer_types(model),
            "params": sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)}


# ----------------------------------------------------------------------------- measurements


def time_calibration(model, batches, step_mode: str, device: torch.device, repeats: int, until: float) -> dict:
    """Seconds of the floor and of both estimators over all batches: one warm-up of each, then rounds (floor, batch,
    per_example in turn, so drift hits all three alike) until ``repeats`` rounds or time.monotonic() passes
    ``until`` (at least one round). Also how many modules each estimator scored above zero."""
    from fimlora import FimConfig, compute_fisher, compute_scores

    last = {}

    def calibrate(estimator):
        config = FimConfig(n_batches=len(batches), estimator=estimator, progress=False)
        last[estimator] = compute_fisher(model, batches, config)

    jobs = {"floor": functools.partial(floor_steps, model, batches, step_mode)}
    jobs.update({est: functools.partial(calibrate, est) for est in ESTIMATORS})
    out = {"warmup": {}, **{k: [] for k in jobs}}
    for k, fn in jobs.items():
        sync(device)
        out["warmup"][k] = timed(synced(fn, device), 1)[0]
    while len(out["floor"]) < repeats:
        t = time.monotonic()
        for k, fn in jobs.items():
            sync(device)
            out[k] += timed(synced(fn, device), 1)
        if time.monotonic() + (time.monotonic() - t) > until:
            break
    out["positive_scores"] = {est: sum(s > 0 for s in compute_scores(last[est]).values()) for est in ESTIMATORS}
    return out


def measure_memory(model, batch, step_mode: str, device: torch.device) -> dict:
    """Peak bytes (PeakMemory) of one LoRA training step and of calibration on ``batch`` with each estimator, each
    from a reset after freeing the previous one's leftovers; ``before`` is what was in use at the reset."""
    from fimlora import FimConfig, compute_fisher

    probe = PeakMemory(device)
    steps = {"train": lambda: lora_step(model, batch, step_mode)}
    steps.update({est: functools.partial(compute_fisher, model, [batch],
                                         FimConfig(n_batches=1, estimator=est, progress=False))
                  for est in ESTIMATORS})
    out = {"metric": probe.metric, "fisher_bytes": fisher_bytes(model)}
    for mode, fn in steps.items():
        before = probe.reset()
        fn()
        out[mode] = {"before": before, "peak": probe.peak()}
        model.zero_grad(set_to_none=True)
    return out


def guarded(record: dict, key: str, device: torch.device, fn, label: str | None = None) -> bool:
    """record[key] = fn() with status "ok"; on an out-of-memory error or any other exception, the status and the
    message instead (the traceback's frames, which hold the phase's tensors, are dropped before freeing)."""
    t = time.monotonic()
    label = label or key
    print(f"  {label} ...", flush=True)
    try:
        record[key] = {"status": "ok", **fn()}
        ok = True
    except OOM_ERRORS as e:
        record[key] = {"status": "oom", "error": str(e)[:600]}
        ok = False
    except Exception as e:  # noqa: BLE001 - one phase's failure is recorded; the next phase still runs
        record[key] = {"status": "error", "error": f"{type(e).__name__}: {e}"[:600],
                       "traceback": traceback.format_exc()[-3000:]}
        ok = False
    record[key]["seconds"] = time.monotonic() - t
    free(device)
    if device.type == "cuda":  # what the step left allocated: a leak between phases would show here
        record[key]["allocated_after"] = torch.cuda.memory_allocated(device)
    print(f"  {label}: {record[key]['status']} ({record[key]['seconds']:.1f} s)", flush=True)
    return ok


def skipped(reason: str) -> dict:
    return {"status": "skipped", "reason": reason}


# ----------------------------------------------------------------------------- phases


class Run(NamedTuple):
    shape: Shape
    device: torch.device
    dtype: torch.dtype
    batches: list
    budget: Budget
    repeats: int
    checkpointing: bool


def phase_bf16(run: Run) -> dict:
    """The base model in ``run.dtype`` with LoRA: timing (floor, batch, per_example) then memory."""
    t = time.monotonic()
    base = build_base(run.shape, run.device, run.dtype)
    if run.checkpointing:
        with warnings.catch_warnings():  # transformers 5 renames it activation_checkpointing_enable; 4.x has only this
            warnings.simplefilter("ignore", FutureWarning)
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = add_lora(base)
    build_s = time.monotonic() - t
    step_mode = "train" if run.checkpointing else "eval"
    out = {"build_seconds": build_s, "step_mode": step_mode, "lora": lora_summary(model)}
    guarded(out, "timing", run.device, lambda: time_calibration(
        model, run.batches, step_mode, run.device, run.repeats, run.budget.at(BF16_ROUNDS_UNTIL)), "bf16 timing")
    guarded(out, "memory", run.device, lambda: measure_memory(model, run.batches[0], step_mode, run.device),
            "bf16 memory")
    return out


def qlora_estimate(bf16: dict | None) -> float | None:
    """Seconds the QLoRA phase is expected to need at most: a build plus a warm-up and one round of the bf16 timing,
    scaled by QLORA_PASS_FACTOR; None without a bf16 timing."""
    timing = (bf16 or {}).get("timing", {})
    if timing.get("status") != "ok":
        return None
    one_round = sum(timing[k][0] for k in ("floor", *ESTIMATORS))
    return bf16["build_seconds"] + QLORA_PASS_FACTOR * (sum(timing["warmup"].values()) + one_round)


def phase_qlora(run: Run) -> dict:
    """4-bit nf4 base (quantise_4bit_), prepare_model_for_kbit_training, LoRA: timing then memory, in train mode."""
    from peft import prepare_model_for_kbit_training

    probe = PeakMemory(run.device)
    t = time.monotonic()
    base = build_base(run.shape, run.device, run.dtype)
    build_s = time.monotonic() - t
    t = time.monotonic()
    quantise_4bit_(base, run.device, run.dtype)
    free(run.device)
    quantise_s = time.monotonic() - t
    model_bytes = probe.reset() if run.device.type == "cuda" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        base = prepare_model_for_kbit_training(base, gradient_checkpointing_kwargs={"use_reentrant": True})
    model = add_lora(base)
    out = {"build_seconds": build_s, "quantise_seconds": quantise_s, "quantised_model_bytes": model_bytes,
           "step_mode": "train", "lora": lora_summary(model)}
    guarded(out, "timing", run.device, lambda: time_calibration(
        model, run.batches, "train", run.device, run.repeats, run.budget.at(QLORA_ROUNDS_UNTIL)), "qlora timing")
    guarded(out, "memory", run.device, lambda: measure_memory(model, run.batches[0], "train", run.device),
            "qlora memory")
    return out


def eva_hash_estimate(shape: Shape, device: torch.device, dtype: torch.dtype) -> float | None:
    """Seconds PEFT's EVA spends hashing layer inputs before its first SVD, from a probe; None if EVA's HashHook
    is not where this peft version was read (peft/tuners/lora/eva.py).

    EVA's first forward hashes every target layer's input to find layers that share one (q, k, v; gate, up): the
    input goes to the CPU and into a Python tuple of floats (HashHook.hash_fn), one per token and feature, for
    all 224 layers. The probe times that on 512 tokens of ``hidden`` features and scales it to every layer's input
    width (hidden for six projections, intermediate for down_proj) over a batch's tokens (all of them carry a label).
    """
    try:
        from peft.tuners.lora.eva import HashHook
    except ImportError:
        return None
    rows = min(512, shape.batch_size * shape.seq)
    x = torch.randn(rows, shape.hidden, device=device, dtype=dtype)
    sync(device)
    t = time.perf_counter()
    HashHook.hash_fn(x.cpu())
    per_element = (time.perf_counter() - t) / x.numel()
    elements = shape.batch_size * shape.seq * shape.layers * (6 * shape.hidden + shape.intermediate)
    return per_element * elements


def phase_eva(run: Run, fim_seconds: float | None) -> dict:
    """PEFT's EVA (rho 2) on the same batches, from a fresh base; stopped at the end of the budget by a forward
    pre-hook (EVA cycles its batches in memory, so the hook, not the iterable, sees each forward)."""
    from peft import EvaConfig, initialize_lora_eva_weights
    from peft.tuners.lora import LoraLayer

    from fimlora.app.builders import build_peft_model

    estimate = eva_hash_estimate(run.shape, run.device, run.dtype)
    left = run.budget.left()
    if estimate is not None and estimate > left:
        return skipped(f"PEFT's EVA first hashes every target layer's input as a Python tuple on the CPU "
                       f"(HashHook); at this shape that alone is estimated at {estimate:.0f} s from a probe, more "
                       f"than the {left:.0f} s left of the budget (a larger --budget-s runs it)")
    base = build_base(run.shape, run.device, run.dtype)
    model = build_peft_model(base, lora_config(init_lora_weights="eva", eva_config=EvaConfig(rho=EVA_RHO)),
                             seed=None, low_cpu_mem_usage=True)
    model.eval()
    forwards = []
    deadline = run.budget.at(1.0)

    def count_or_stop(module, args, kwargs):
        if time.monotonic() > deadline:
            raise BudgetSpent
        forwards.append(1)

    handle = model.register_forward_pre_hook(count_or_stop, with_kwargs=True)
    out = {"rho": EVA_RHO, "hash_estimate_seconds": estimate, "fim_batch_seconds": fim_seconds}
    sync(run.device)
    t = time.perf_counter()
    try:
        initialize_lora_eva_weights(model, run.batches, show_progress_bar=False)
    except BudgetSpent:
        out.update(status="stopped", reason="time budget spent before EVA converged")
    finally:
        sync(run.device)
        handle.remove()
    out.update(eva_seconds=time.perf_counter() - t, forward_passes=len(forwards))
    if "status" not in out:
        # fimlora.lora_modules refuses EVA-initialised adapters (not resizable), so count PEFT's layers directly.
        ranks = [m.r["default"] for m in model.modules() if isinstance(m, LoraLayer) and "default" in m.lora_A]
        out.update(modules_kept=len(ranks), rank_min=min(ranks), rank_max=max(ranks))
    return out


# ----------------------------------------------------------------------------- the run


def machine(device: torch.device) -> dict:
    out = {"device": device.type, "processor": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count(), "cuda": torch.version.cuda,
           "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(name=props.name, total_memory=props.total_memory)
    return out


def versions() -> dict:
    import importlib.metadata as md

    from fimlora.io import package_versions

    out = package_versions()
    try:
        out["bitsandbytes"] = md.version("bitsandbytes")
    except md.PackageNotFoundError:
        out["bitsandbytes"] = "not installed"
    return out


def bnb_missing() -> str | None:
    """Why the QLoRA phase cannot run, or None."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # noqa: BLE001 - an import that fails for any reason (no CUDA library) means no QLoRA
        return f"bitsandbytes does not import ({type(e).__name__}: {e})"[:300]
    return None


def check(run: Run, skip: tuple[str, ...] = ()) -> dict:
    """Every phase of the check; the JSON that render_gpu reads (without command, date and note)."""
    phases = {}
    guarded(phases, "bf16", run.device, lambda: phase_bf16(run))
    bf16 = phases["bf16"]
    if "qlora" in skip:
        phases["qlora"] = skipped("--skip qlora")
    elif (why := bnb_missing()) is not None:
        phases["qlora"] = skipped(why)
    elif (need := qlora_estimate(bf16)) is not None and need > run.budget.left():
        phases["qlora"] = skipped(f"estimated {need:.0f} s ({QLORA_PASS_FACTOR} x a bf16 warm-up and round, plus a "
                                  f"build), more than the {run.budget.left():.0f} s left of the budget (a larger "
                                  "--budget-s runs it)")
    else:
        guarded(phases, "qlora", run.device, lambda: phase_qlora(run))
    timing = bf16.get("timing", {})
    fim_seconds = med(timing["batch"]) if timing.get("status") == "ok" else None
    if "eva" in skip:
        phases["eva"] = skipped("--skip eva")
    else:
        guarded(phases, "eva", run.device, lambda: phase_eva(run, fim_seconds))
    return {"shape": run.shape._asdict(), "lora_r": LORA_R, "targets": list(ALL_PROJ),
            "dtype": str(run.dtype).removeprefix("torch."), "gradient_checkpointing": run.checkpointing,
            "budget_s": run.budget.total_s, "repeats": run.repeats, "machine": machine(run.device),
            "versions": versions(), "phases": phases}


def failed(phases: dict) -> list[str]:
    """"phase" or "phase.part" for every phase or part whose status is oom or error."""
    out = []
    for name, p in phases.items():
        if p["status"] in ("oom", "error"):
            out.append(name)
        out += [f"{name}.{k}" for k, v in p.items() if isinstance(v, dict) and v.get("status") in ("oom", "error")]
    return out


GPU_HEADING = "## GPU"


def replace_gpu_section(md: str, section: list[str]) -> str:
    """``md`` with its ``## GPU`` section (to the next ``## `` heading or the end) replaced by ``section``'s lines,
    or with the section appended if it has none."""
    lines = md.splitlines()
    starts = [i for i, line in enumerate(lines) if line == GPU_HEADING]
    if len(starts) > 1:
        raise ValueError(f"markdown: has {len(starts)} {GPU_HEADING!r} headings; expected at most one")
    body = "\n".join(section).strip("\n").splitlines()
    if not starts:
        lines += ["", *body] if lines else body
    else:
        i = starts[0]
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
        lines[i:end] = body if end == len(lines) else [*body, ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-tiny", action="store_true",
                   help=f"run on the CPU at a tiny shape ({TINY.layers} layers, hidden {TINY.hidden}); writes to a "
                        "temporary folder unless --json/--md are given")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="model dtype (CUDA runs are bf16; float32 is for --cpu-tiny)")
    p.add_argument("--budget-s", type=float, default=420.0, help="time budget of all phases, seconds")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per phase, at most")
    p.add_argument("--skip", nargs="+", choices=OPTIONAL, default=[], help="optional phases not to run")
    p.add_argument("--no-gradient-checkpointing", action="store_true",
                   help="bf16 phase without gradient checkpointing (floor in eval mode)")
    p.add_argument("--json", default=None, help="default: beside --md, docs/benchmarks_gpu.json")
    p.add_argument("--md", default=None, help="Markdown whose GPU section is replaced; default docs/benchmarks.md")
    p.add_argument("--note", default="", help="a sentence about the machine during the run")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats: must be >= 1, got {args.repeats}")
    if args.cpu_tiny:
        device, shape = torch.device("cpu"), TINY
    elif not torch.cuda.is_available():
        print(f"gpu_check: torch.cuda.is_available() is False (torch {torch.__version__}, built for CUDA "
              f"{torch.version.cuda}); install a CUDA build of torch into .venv, or pass --cpu-tiny to check the "
              "script on the CPU at a tiny shape", file=sys.stderr)
        return 2
    else:
        device, shape = torch.device("cuda", torch.cuda.current_device()), LLAMA3_8B
        if args.dtype != "bfloat16":
            p.error(f"--dtype: GPU runs are bfloat16, got {args.dtype}")
    default_dir = Path(tempfile.gettempdir()) / "fimlora-gpu-check-tiny" if args.cpu_tiny else ROOT / "docs"
    out_md = Path(args.md) if args.md else default_dir / "benchmarks.md"
    out_json = Path(args.json) if args.json else gpu_json_path(out_md)
    if args.cpu_tiny and not args.md and not out_md.exists() and (ROOT / "docs" / "benchmarks.md").exists():
        out_md.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / "docs" / "benchmarks.md", out_md)  # a copy whose GPU section the tiny run replaces

    budget = Budget(args.budget_s)
    batches = make_batches(shape, device)
    run = Run(shape, device, getattr(torch, args.dtype), batches, budget, args.repeats,
              not args.no_gradient_checkpointing)
    print(f"gpu_check: {'CPU tiny shape' if args.cpu_tiny else torch.cuda.get_device_name(device)}, budget "
          f"{args.budget_s:.0f} s", flush=True)
    data = {"command": "bash benchmarks/gpu_check.sh" + (" --cpu-tiny" if args.cpu_tiny else ""),
            "date": time.strftime("%Y-%m-%d"), "note": args.note, "cpu_tiny": args.cpu_tiny, **check(run, args.skip)}
    data["wall_s"] = budget.elapsed()
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(data, indent=2, default=str))
    out_md.write_text(replace_gpu_section(out_md.read_text() if out_md.exists() else "", render_gpu(data)))
    for name, phase in data["phases"].items():
        print(f"  {name}: {phase['status']} {phase.get('reason') or phase.get('error') or ''}".rstrip(), flush=True)
    print(f"-> {out_json}, {out_md} ({data['wall_s']:.0f} s)")
    bad = failed(data["phases"])
    if bad:
        print(f"gpu_check: failed: {', '.join(bad)} (see {out_json})", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
