"""Setup cost before training: each method's step before its first optimizer step, side by side.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_setup_cost.py      # ~30 min on 2 CPU cores shared with a sweep
    .venv/bin/python benchmarks/bench_setup_cost.py --smoke --out /tmp/b.md   # a tiny seeded LLaMA; the tests

The setup is configs/frontier_decoder.yaml's, the one suite that runs all of these methods: the real SmolLM2-135M
(30 layers), LoRA r = 8 on all seven projections (210 modules), its sst2_mc calibration loader (batches of 8 x 64
tokens, seeded shuffle), seed 42. Every method is prepared exactly as the sweep prepares it
(``fimlora.bench.methods.prepare_method`` with the sweep's ``MethodSpec``, base model and batch factory, as
``fimlora.bench.sweep.run_one`` builds them), so every method gets the same batches in the same order:

* ``lora``: uniform LoRA, the zero-cost reference (builds the adapter);
* ``fim``: FIM-LoRA, N forward + backward passes with only LoRA-B requiring grad, then the allocator and resize;
* ``eva``: PEFT's EVA: no-grad forward passes with an incremental SVD per layer until its components converge
  (it draws batches from the same loader as it needs them), after one no-grad forward of fimlora's row check;
* ``pissa``: PEFT's PiSSA: an SVD of every adapted weight, no data;
* ``lora_ga``: PEFT's LoRA-GA: N forward + backward passes accumulating the full gradient of every adapted
  weight in ``.grad``, then a low-rank SVD of each;
* ``gora``: GoRA (fimlora.bench.gora): N forward + backward passes whose ``torch.autograd.grad`` returns the full
  gradient of every adapted weight, summed into fp32 buffers, then ranks and a pseudo-inverse per module.

FIM-LoRA, LoRA-GA and GoRA use the config's N (4) batches; the script checks the three agree.

Per method, ``REPEATS`` fresh subprocesses (repeats interleaved over the methods): each loads the base model and
draws one batch, frees what it can and resets its RSS high-water mark (as benchmarks/memory_child.py does), then
runs ``prepare_method`` once under counters and reports wall seconds, the peak RSS above the loaded state, and
what it counted for real: batches drawn from the loader, forward passes of the base model (a forward hook),
backward passes through it (a hook on the logits' gradient) and the largest gradient memory autograd handed back
(``.grad`` bytes after each ``backward``, or the tensors ``torch.autograd.grad`` returned, with the parameters
that got them). Every number is reported as a ratio to FIM-LoRA within this one run.

The section also has the arithmetic of the gradient memory and backward FLOPs that needing only LoRA-B gradients
saves against full-weight gradients, at SmolLM2-135M's shapes (from its config) and at Llama-3-8B's, and compares
the SmolLM2 arithmetic with what was measured, including one forward + backward timed both ways on one batch.

The section is written between marker lines into --out (docs/benchmarks.md) before its "## GPU" section, the
measurements to docs/bench_setup_cost.json; bench_calibration.py keeps the section when it regenerates the others.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT), str(HERE)]

from sections import section_script_main, wrap  # noqa: E402

NAME = "bench_setup_cost.py"
JSON_NAME = "bench_setup_cost.json"
# The zero-cost reference first, then the methods in the order the section discusses them.
METHODS = ("lora", "fim", "fim_lr", "eva", "pissa", "lora_ga", "gora")
LABELS = {"lora": "LoRA (reference)", "fim": "FIM-LoRA", "fim_lr": "FIM-LoRA + recommended LR", "eva": "EVA",
          "pissa": "PiSSA", "lora_ga": "LoRA-GA", "gora": "GoRA"}
WHAT = {"lora": "builds the adapter",
        "fim": "N fwd+bwd, grads of LoRA-B only; allocator; resize (`lr_rule: none`)",
        "fim_lr": "as FIM-LoRA, then its learning-rate rule on the resized adapter (the default `lr_rule`)",
        "eva": "no-grad fwd + incremental SVD per layer until converged",
        "pissa": "SVD of every adapted weight, no data",
        "lora_ga": "N fwd+bwd, full grads of adapted weights in .grad; low-rank SVD each",
        "gora": "N fwd+bwd, full grads of adapted weights (autograd.grad) into fp32 sums; pinv per module"}
GRADIENT_METHODS = ("fim", "lora_ga", "gora")  # the methods that run backward passes, with the same N
RANK = 8
SEED = 42
CONFIG = "configs/frontier_decoder.yaml"
ALL_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Per size: subprocess repeats per method, and repeats of the one-batch step timing.
# Two repeats in the full run: with a sweep on the same 2 cores one repeat of the six methods takes ~13 minutes.
REPEATS = {"full": 2, "smoke": 1}
STEP_REPEATS = {"full": 3, "smoke": 1}
# The smoke setup: a seeded 2-layer LLaMA (hidden 64) and N random-token batches of 4 x 16.
SMOKE = {"layers": 2, "hidden": 64, "batches": 4, "batch_size": 4, "seq": 16}
# The memory child's environment (benchmarks/bench_calibration.py's CHILD_ENV: one thread, glibc's mmap threshold
# fixed so freed tensors go back to the OS and the RSS follows the live tensors).
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
MIB = 2**20

# Llama-3-8B (config of meta-llama/Meta-Llama-3-8B): 32 layers, hidden 4096, intermediate 14336, 32 query heads and
# 8 KV heads of 128 (k/v out 1024), vocabulary 128256. Attention FLOPs at a 2048-token sequence.
LLAMA3_8B = {"model": "Llama-3-8B", "layers": 32, "hidden": 4096, "intermediate": 14336, "kv": 1024,
             "vocab": 128256, "seq": 2048}
ARITH_RANKS = (8, 16)


# ----------------------------------------------------------------------------- the setup


class Setup(NamedTuple):
    """What every method is prepared from: ``base()`` a fresh base model, ``batches()`` a fresh iterable of the
    calibration batches (the same batches in the same order on every call), ``spec(method)`` its MethodSpec."""

    label: str
    base: Callable
    batches: Callable[[], Iterable]
    spec: Callable
    dims: dict  # the base model's shapes, for the arithmetic


def _config():
    from fimlora.bench.config import load_config

    return load_config(ROOT / CONFIG)


def _settings(cfg):
    from fimlora.app.train import TrainSettings

    return TrainSettings(**{**cfg.train, "seed": SEED, "progress": False})


def llama_dims(config, seq: int) -> dict:
    """The shapes the arithmetic needs from a LLaMA-style transformers config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {"layers": config.num_hidden_layers, "hidden": config.hidden_size,
            "intermediate": config.intermediate_size, "kv": config.num_key_value_heads * head_dim,
            "vocab": config.vocab_size, "seq": seq}


def method_spec(cfg, method: str, task_label: str, kind: str, n_train: int, settings):
    """The sweep's MethodSpec for ``method``; ``fim`` is the rank allocation alone (``lr_rule: none``), ``fim_lr`` the
    same calibration followed by the default learning-rate rule, so the two rows' difference is the rule's cost."""
    from fimlora.bench.config import RunSpec
    from fimlora.bench.sweep import _method_spec
    from fimlora.config import lr_rule_table

    spec = _method_spec(cfg, RunSpec(task_label, "fim" if method == "fim_lr" else method, RANK, SEED), kind, n_train,
                        settings)
    if spec.method == "fim":
        spec.fim = {**spec.fim, "lr_rule": lr_rule_table()["default_rule"] if method == "fim_lr" else "none"}
    return spec


def full_setup() -> Setup:
    """configs/frontier_decoder.yaml at r = RANK, seed SEED: its base model, loader and MethodSpecs, built as
    ``fimlora.bench.sweep.run_one`` builds them."""
    from fimlora.app.builders import build_base_model, build_calibration_loader, build_tokenizer
    from fimlora.bench.config import RunSpec
    from fimlora.bench.sweep import _load_tasks, causal_lm_dtype

    cfg = _config()
    if sorted(cfg.target_modules) != sorted(ALL_PROJ):
        raise ValueError(f"{CONFIG}: expected LoRA on the seven projections {ALL_PROJ}, got {cfg.target_modules}")
    settings = _settings(cfg)
    task_label = cfg.task_labels[0]
    train_task, _ = _load_tasks(cfg, RunSpec(task_label, "fim", RANK, SEED))
    tok = build_tokenizer(cfg.model)
    base = functools.partial(build_base_model, cfg.model, train_task, cfg.n_layers, SEED,
                             causal_lm_dtype(settings.precision))
    batches = functools.partial(build_calibration_loader, train_task, tok, settings.batch_size, settings.max_length,
                                SEED)

    spec = functools.partial(method_spec, cfg, task_label=task_label, kind=train_task.kind,
                             n_train=len(train_task.train), settings=settings)

    from transformers import AutoConfig

    from fimlora.app.models import resolve_model

    dims = llama_dims(AutoConfig.from_pretrained(resolve_model(cfg.model)), settings.max_length)
    return Setup(f"SmolLM2-135M (real, 30 layers) / {task_label}", base, batches, spec,
                 {"model": "SmolLM2-135M", **dims})


def smoke_setup() -> Setup:
    """A seeded LLaMA of SMOKE's size and random-token batches, with the same config's MethodSpecs."""
    from tests.references import llama_base, lm_batches

    cfg = _config()
    settings = _settings(cfg)
    s = SMOKE
    batches = lm_batches(s["batches"], s["batch_size"], s["seq"])
    base = functools.partial(llama_base, s["layers"], s["hidden"], SEED)

    spec = functools.partial(method_spec, cfg, task_label="smoke", kind="multiple_choice", n_train=64,
                             settings=settings)

    return Setup(f"tiny llama {s['layers']}x{s['hidden']}", base, functools.partial(list, batches), spec,
                 {"model": "tiny llama", **llama_dims(base().config, s["seq"])})


SETUPS = {"full": full_setup, "smoke": smoke_setup}


def calibration_batches(setup: Setup) -> int:
    """N, the batches of the methods that run backward passes; refuses a config where they differ."""
    from fimlora.bench.registry import settings_block
    from fimlora.config import FimConfig

    n = {"fim": setup.spec("fim").fim.get("n_batches", FimConfig.n_batches),
         "lora_ga": settings_block("lora_ga").value(setup.spec("lora_ga").lora_ga, "n_batches"),
         "gora": settings_block("gora").value(setup.spec("gora").gora, "n_batches")}
    if len(set(n.values())) != 1:
        raise ValueError(f"{CONFIG}: FIM-LoRA, LoRA-GA and GoRA must calibrate on the same number of batches: {n}")
    return int(n["fim"])


# ----------------------------------------------------------------------------- counting, for real


class CountingBatches:
    """A batch factory that counts the batches drawn from every iterable it hands out (``len`` passes through:
    EVA asks for it)."""

    def __init__(self, factory: Callable[[], Iterable]):
        self.factory = factory
        self.drawn = 0

    def __call__(self):
        return _Counted(self.factory(), self)


class _Counted:
    def __init__(self, iterable, owner: CountingBatches):
        self.iterable, self.owner = iterable, owner

    def __len__(self):
        return len(self.iterable)

    def __iter__(self):
        for batch in self.iterable:
            self.owner.drawn += 1
            yield batch


def _param_role(name: str) -> str:
    return "LoRA-B" if "lora_B" in name else "LoRA-A" if "lora_A" in name else "base weight"


@contextlib.contextmanager
def counted_passes(model):
    """Counts ``model``'s forward passes (a forward hook) and the backward passes that reach its logits (a hook on
    their gradient, registered on each forward whose logits require grad), and records the most gradient memory
    autograd handed back at once: after each ``torch.autograd.backward`` (``Tensor.backward`` calls it) the bytes
    of every ``.grad`` of ``model``'s parameters (PEFT's modules sit inside it), or the tensors each
    ``torch.autograd.grad`` returned; with how many parameters of each role (LoRA-B, LoRA-A, base weight) had them.
    The two autograd functions are wrapped only inside the block."""
    import torch

    counts = {"forward": 0, "backward": 0, "grad_bytes": 0, "grad_params": {}}

    def on_logits_grad(grad):
        counts["backward"] += 1

    def after_forward(module, args, kwargs, output):
        counts["forward"] += 1
        logits = getattr(output, "logits", None)
        if isinstance(logits, torch.Tensor) and logits.requires_grad:
            logits.register_hook(on_logits_grad)

    def record(pairs):
        held = sum(g.nbytes for _, g in pairs)
        if held >= counts["grad_bytes"]:
            roles = [_param_role(n) for n, _ in pairs]
            counts["grad_bytes"] = held
            counts["grad_params"] = {r: roles.count(r) for r in sorted(set(roles))}

    backward, grad = torch.autograd.backward, torch.autograd.grad

    def counting_backward(*args, **kwargs):
        out = backward(*args, **kwargs)
        record([(n, p.grad) for n, p in model.named_parameters() if p.grad is not None])
        return out

    def counting_grad(outputs, inputs, *args, **kwargs):
        grads = grad(outputs, inputs, *args, **kwargs)
        names = {id(p): n for n, p in model.named_parameters()}
        seq = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
        record([(names.get(id(p), "not the model's"), g) for p, g in zip(seq, grads) if g is not None])
        return grads

    handle = model.register_forward_hook(after_forward, with_kwargs=True)
    torch.autograd.backward, torch.autograd.grad = counting_backward, counting_grad
    try:
        yield counts
    finally:
        torch.autograd.backward, torch.autograd.grad = backward, grad
        handle.remove()


def run_method(setup: Setup, method: str, base) -> dict:
    """``prepare_method`` for ``method`` on ``base`` with the setup's batches, under the counters: wall seconds,
    batches drawn, forward and backward passes, gradient memory, and what the method reported."""
    from transformers import set_seed

    from fimlora.bench.methods import prepare_method

    loader = CountingBatches(setup.batches)
    spec = setup.spec(method)
    set_seed(spec.seed)  # as run_one does before prepare_method
    with counted_passes(base) as passes:
        start = time.perf_counter()
        model, info, _ = prepare_method(spec, base, loader)
        seconds = time.perf_counter() - start
    ranks = {k: v for k, v in info.items() if k in ("allocated_ranks", "eva_ranks")}
    kept = next(iter(ranks.values()), None)
    lora_b = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_B" in n)
    del model
    return {"method": method, "seconds": seconds, "calibration_seconds": info.get("calibration_seconds", 0.0),
            "batches_drawn": loader.drawn, "forward": passes["forward"], "backward": passes["backward"],
            "grad_bytes": passes["grad_bytes"], "grad_params": passes["grad_params"],
            "eva_forward_passes": info.get("eva_forward_passes"),
            "modules_after": len(kept) if kept is not None else None, "lora_b_bytes_after": lora_b}


# ----------------------------------------------------------------------------- the subprocess per method


def child(size: str, method: str) -> dict:
    """One method in this fresh process: load, reset the RSS high-water mark, run, read it (memory_child.py's way)."""
    import torch
    from memory_child import reset_peak_rss, status_bytes

    torch.set_num_threads(1)
    setup = SETUPS[size]()
    base = setup.base()
    next(iter(setup.batches()))  # tokenizer and loader warmed up before the reset
    load_peak = status_bytes("VmHWM")
    ctypes.CDLL(None).malloc_trim(0)
    reset_peak_rss()
    loaded = status_bytes("VmRSS")
    row = run_method(setup, method, base)
    peak = status_bytes("VmHWM")
    return {**row, "peak": peak, "loaded": loaded, "load_peak": load_peak, "above_loaded": peak - loaded}


def run_child(size: str, method: str) -> dict:
    out = subprocess.run([sys.executable, str(HERE / NAME), "--child", size, method], capture_output=True, text=True,
                         timeout=1800, env={**os.environ, **CHILD_ENV})
    if out.returncode != 0:
        raise RuntimeError(f"{NAME} --child {size} {method}: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- one step, both ways


@contextlib.contextmanager
def grads_only_on(model, params):
    """Only ``params`` require grad (eval mode); every flag and ``.grad`` restored on exit."""
    all_params = list(model.parameters())
    flags, grads, mode = [p.requires_grad for p in all_params], [p.grad for p in all_params], model.training
    try:
        for p in all_params:
            p.requires_grad_(False)
            p.grad = None
        for p in params:
            p.requires_grad_(True)
        model.eval()
        yield
    finally:
        for p, f, g in zip(all_params, flags, grads):
            p.requires_grad_(f)
            p.grad = g
        model.train(mode)


def time_step(setup: Setup, repeats: int) -> dict:
    """One forward + backward on the first calibration batch of the uniform r = RANK adapter, timed (alternating,
    after a warm-up) with only LoRA-B requiring grad (FIM-LoRA's calibration) and with only the adapted base
    weights requiring grad (the full-weight gradients of LoRA-GA and GoRA, ``torch.autograd.grad`` as GoRA asks);
    each also forward-only with the same flags, so backward = step - forward."""
    import torch

    from fimlora.bench.methods import _uniform_lora
    from fimlora.modules import lora_modules

    torch.manual_seed(SEED)
    model = _uniform_lora(setup.spec("lora"), setup.base())
    batch = next(iter(setup.batches()))
    infos = lora_modules(model)
    flags = {"lora_b": [i.layer.lora_B["default"].weight for i in infos],
             "full_w": [i.layer.get_base_layer().weight for i in infos]}

    def forward(params):
        with grads_only_on(model, params):
            model(**batch).loss.detach()

    def step(params):
        with grads_only_on(model, params):
            torch.autograd.grad(model(**batch).loss, params)

    jobs = {f"{k}_{part}": functools.partial(fn, v) for k, v in flags.items()
            for part, fn in (("forward", forward), ("step", step))}
    for fn in jobs.values():
        fn()
    times = {k: [] for k in jobs}
    for _ in range(repeats):
        for k, fn in jobs.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {"batch_shape": list(batch["input_ids"].shape), "repeats": repeats, "seconds": times}


# ----------------------------------------------------------------------------- arithmetic


def projection_shapes(dims: dict) -> list[tuple[int, int]]:
    """(d_in, d_out) of one layer's q, k, v, o, gate, up, down projections."""
    h, i, kv = dims["hidden"], dims["intermediate"], dims["kv"]
    return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]


def arithmetic(dims: dict, r: int) -> dict:
    """Gradient memory and backward FLOPs per token with all seven projections of every layer adapted at rank r.

    Memory: full-weight gradients of the adapted matrices (sum d_in d_out) against LoRA-B's (sum d_out r), each in
    fp32 and bf16. FLOPs (a multiply-add is 2), per token, matrix products only (norms, activations, softmax and
    RoPE left out): forward 2 sum d_in d_out + the output layer 2 V h + attention 2 T h per layer (scores and
    values, causal: T/2 positions on average) + the LoRA path 2 sum r (d_in + d_out). The backward of both runs the
    input-gradient products: 2 sum d_in d_out + 2 V h + attention 4 T h per layer (twice its forward). Full-weight
    gradients (on the bare base, LoRA-GA's) add the weight-gradient products, 2 sum d_in d_out; LoRA-B gradients
    instead add LoRA-B's weight gradient 2 sum r d_out and the LoRA path's input gradients 2 sum r (d_out + d_in)
    (through B, then A; A's weight gradient is not asked for)."""
    shapes = projection_shapes(dims) * dims["layers"]
    w = sum(i * o for i, o in shapes)
    b = sum(o * r for _, o in shapes)
    a = sum(i * r for i, _ in shapes)
    head = 2 * dims["vocab"] * dims["hidden"]
    attention = 2 * dims["seq"] * dims["hidden"] * dims["layers"]
    forward = 2 * w + head + attention
    shared = 2 * w + head + 2 * attention
    full_bwd = shared + 2 * w
    lora_b_bwd = shared + 2 * b + 2 * (b + a)
    full_step, lora_b_step = forward + full_bwd, forward + 2 * (a + b) + lora_b_bwd
    return {"model": dims["model"], "r": r, "layers": dims["layers"], "modules": len(shapes), "seq": dims["seq"],
            "adapted_params": w, "lora_b_params": b,
            "full_grad_bytes": {"fp32": 4 * w, "bf16": 2 * w}, "lora_b_grad_bytes": {"fp32": 4 * b, "bf16": 2 * b},
            "flops_per_token": {"forward": forward, "backward_full_w": full_bwd, "backward_lora_b": lora_b_bwd,
                                "step_full_w": full_step, "step_lora_b": lora_b_step},
            "backward_saved": 1 - lora_b_bwd / full_bwd, "step_saved": 1 - lora_b_step / full_step}


# ----------------------------------------------------------------------------- measure


def _machine() -> dict:
    from fimlora.bench.sweep import machine_info

    return {**machine_info(), "loadavg": list(os.getloadavg())}


def measure(size: str) -> dict:
    """Every method's subprocess rows (repeats interleaved over the methods), the step timing and the arithmetic."""
    import torch

    from fimlora.io import package_versions

    began = time.perf_counter()
    setup = SETUPS[size]()
    n = calibration_batches(setup)
    start = _machine()
    rows = {m: [] for m in METHODS}
    for k in range(REPEATS[size]):
        for method in METHODS:
            print(f"repeat {k + 1}/{REPEATS[size]}: {method}", flush=True)
            rows[method].append(run_child(size, method))
    print("one step, both ways", flush=True)
    step = time_step(setup, STEP_REPEATS[size])
    batch_shape = step["batch_shape"]
    measured_dims = {**setup.dims, "seq": batch_shape[1]}
    arith = [arithmetic(measured_dims, r) for r in ARITH_RANKS] + [arithmetic(LLAMA3_8B, r) for r in ARITH_RANKS]
    return {"command": f"python benchmarks/{NAME}" + (" --smoke" if size == "smoke" else ""),
            "date": time.strftime("%Y-%m-%d"), "size": size, "setup": setup.label, "config": CONFIG, "rank": RANK,
            "seed": SEED, "n_batches": n, "batch_shape": batch_shape, "repeats": REPEATS[size],
            "machine": {**start, "loadavg_end": list(os.getloadavg()), "torch_threads": torch.get_num_threads()},
            "versions": package_versions(), "wall_seconds": time.perf_counter() - began, "methods": rows,
            "step": step, "arithmetic": arith}


# ----------------------------------------------------------------------------- render


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def _spread(xs: list[float], fmt: str = ".3g") -> str:
    if len(xs) == 1:
        return format(xs[0], fmt)
    return f"{format(_med(xs), fmt)} ({format(min(xs), fmt)}–{format(max(xs), fmt)})"


def _ratio(x: float, ref: float) -> str:
    return f"{x / ref:.2f}" if ref > 0 else "n/a"


def _pct(share: float) -> str:
    """A share in whole percent, never "-0%"."""
    return f"{round(100 * share) + 0}%"


def _mib(n_bytes: float) -> str:
    return f"{n_bytes / MIB:,.1f}"


def _size(n_bytes: float) -> str:
    """Bytes in MiB below a GiB, else GiB."""
    return f"{n_bytes / MIB:,.1f} MiB" if n_bytes < 2**30 else f"{n_bytes / 2**30:,.2f} GiB"


def _same(rows: list[dict], key: str):
    """The value every repeat agrees on (passes are deterministic), or the values joined by "/"."""
    values = [r[key] for r in rows]
    return values[0] if len(set(map(str, values))) == 1 else " / ".join(map(str, values))


def summary(data: dict) -> dict:
    """Per method: median seconds, median RSS above loaded, and their ratios to FIM-LoRA's."""
    out = {}
    fim = data["methods"]["fim"]
    fim_s, fim_mem = _med([r["seconds"] for r in fim]), _med([r["above_loaded"] for r in fim])
    for m, rows in data["methods"].items():
        s, mem = _med([r["seconds"] for r in rows]), _med([r["above_loaded"] for r in rows])
        out[m] = {"seconds": s, "seconds_over_fim": s / fim_s, "above_loaded": mem,
                  "above_loaded_over_fim": mem / fim_mem if fim_mem > 0 else None,
                  "grad_bytes": _med([r["grad_bytes"] for r in rows])}
    return out


def render_section(data: dict, command: str, note: str) -> str:
    """The "Setup cost before training" section of docs/benchmarks.md from :func:`measure`'s output."""
    methods, n, summ = data["methods"], data["n_batches"], summary(data)
    m = data["machine"]
    shape = data["batch_shape"]
    lines = ["## 9. Setup cost before training: FIM-LoRA against EVA, PiSSA, LoRA-GA and GoRA", "",
             f"Generated by `{command}` on {data['date']}; "
             + ", ".join(f"{k} {v}" for k, v in data["versions"].items())
             + f". Machine: {m['processor']}, {m['cpu_count']} cores, torch threads 1 in every measuring process; "
             f"1-minute load average {m['loadavg'][0]:.1f} at the start, {m['loadavg_end'][0]:.1f} at the end."
             + (f" {note}" if note else ""), "",
             f"**Setup.** {data['setup']}, `{data['config']}` at r = {data['rank']} on all seven projections, seed "
             f"{data['seed']}; every method prepared exactly as the sweep prepares it (`prepare_method` with the "
             f"sweep's `MethodSpec`, base model and calibration loader, as `run_one` builds them), so all get the "
             f"same batches ({shape[0]} x {shape[1]} tokens) in the same order. FIM-LoRA, LoRA-GA and GoRA use the "
             f"config's N = {n} batches; EVA draws from the same loader until its components converge; PiSSA reads "
             f"no data. Each method ran in {data['repeats']} fresh subprocess(es) (repeats interleaved over the "
             "methods): the base model and one batch loaded, freed heap trimmed and the RSS high-water mark reset "
             "(as `benchmarks/memory_child.py` does), then `prepare_method` once. Passes are counted on the model, "
             "not inferred: forward passes by a forward hook on the base model, backward passes by a hook on the "
             "gradient of its logits, batches as drawn from the loader. Gradient memory is what autograd handed back "
             "at its largest: the `.grad` bytes after a `backward`, or the tensors `torch.autograd.grad` returned.",
             "", "| method | what runs before training | batches drawn | forward passes | backward passes | "
             "seconds, median (min–max) | time / FIM | peak RSS above loaded, MiB | memory / FIM | gradients held, "
             "MiB (tensors of) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for method, rows in methods.items():
        s = summ[method]
        grads = rows[0]["grad_params"]
        held = (f"{_mib(s['grad_bytes'])} ({', '.join(f'{v} {k}' for k, v in grads.items())})" if grads else "0")
        mem_ratio = f"{s['above_loaded_over_fim']:.2f}" if s["above_loaded_over_fim"] is not None else "n/a"
        lines.append(f"| {LABELS[method]} | {WHAT[method]} | {_same(rows, 'batches_drawn')} | "
                     f"{_same(rows, 'forward')} | {_same(rows, 'backward')} | "
                     f"{_spread([r['seconds'] for r in rows])} | {s['seconds_over_fim']:.2f} | "
                     f"{_mib(s['above_loaded'])} | {mem_ratio} | {held} |")
    eva = methods["eva"][0]
    fim_rows = methods["fim"]
    lines += ["", f"Seconds are the whole `prepare_method` call (building the adapter included). EVA's forward "
              f"passes include one no-grad forward of fimlora's check that every layer gets enough input rows "
              f"(`check_eva_rows`), before EVA's own {eva['eva_forward_passes']}. Times are ratios within this one "
              "run: on a shared machine absolute seconds move from run to run; passes and bytes do not."]
    lines += [""] + render_gradients(data, summ) + [""] + render_arithmetic(data) + [""] + render_check(data, fim_rows)
    return wrap(NAME, "\n".join(lines) + "\n")


def _arith(data: dict, model: str, r: int) -> dict:
    return next(a for a in data["arithmetic"] if a["model"] == model and a["r"] == r)


def render_gradients(data: dict, summ: dict) -> list[str]:
    """What needing only LoRA-B gradients saves, measured on this setup."""
    fim, ga, gora = (summ[m]["grad_bytes"] for m in GRADIENT_METHODS)
    extra = {m: summ[m]["above_loaded"] - summ["fim"]["above_loaded"] for m in ("lora_ga", "gora")}
    return [f"**Gradient memory, measured.** FIM-LoRA's backward leaves gradients on LoRA-B alone: {_mib(fim)} MiB. "
            f"LoRA-GA's leaves the full gradient of every adapted weight: {_mib(ga)} MiB ({ga / fim:,.0f}x); "
            f"GoRA's `autograd.grad` returns as much, {_mib(gora)} MiB ({gora / fim:,.0f}x), and it sums them into "
            f"fp32 buffers of the same size besides. Above FIM-LoRA's peak RSS, LoRA-GA needs "
            f"{_mib(extra['lora_ga'])} MiB more and GoRA {_mib(extra['gora'])} MiB more."]


def render_arithmetic(data: dict) -> list[str]:
    small = data["arithmetic"][0]["model"]
    lines = ["**Arithmetic** (all seven projections of every layer adapted; FLOPs per token of matrix products, "
             "norms and activations left out; see `arithmetic` in the script). Full-weight gradients: the "
             "adapted matrices' d_out x d_in gradients (LoRA-GA, GoRA; GoRA also keeps fp32 sums of that size). "
             "LoRA-B gradients: d_out x r per module (FIM-LoRA; its Fisher buffers are fp32 of that size). Without "
             "weight gradients the backward skips each adapted matrix's weight-gradient product (2 d_in d_out per "
             "token) but still runs its input-gradient product, and adds LoRA-B's small products. Attention at "
             f"the sequence length T given ({small}: the measured batches' {data['batch_shape'][1]} tokens).", "",
             "| model | r | adapted params | full-weight grads fp32 / bf16 | LoRA-B grads fp32 / bf16 | full / LoRA-B "
             "| backward GFLOP/token, full-weight / LoRA-B only | backward saved | fwd+bwd step saved |",
             "|---|---|---|---|---|---|---|---|---|"]
    for a in data["arithmetic"]:
        f = a["flops_per_token"]
        label = f"{a['model']} ({a['layers']} layers, T = {a['seq']})"
        lines.append(f"| {label} | {a['r']} | {a['adapted_params'] / 1e6:,.1f} M | "
                     f"{_size(a['full_grad_bytes']['fp32'])} / {_size(a['full_grad_bytes']['bf16'])} | "
                     f"{_size(a['lora_b_grad_bytes']['fp32'])} / {_size(a['lora_b_grad_bytes']['bf16'])} | "
                     f"{a['adapted_params'] / a['lora_b_params']:,.0f}x | "
                     f"{f['backward_full_w'] / 1e9:.3g} / {f['backward_lora_b'] / 1e9:.3g} | "
                     f"{_pct(a['backward_saved'])} | {_pct(a['step_saved'])} |")
    big = _arith(data, LLAMA3_8B["model"], 16)
    lines += ["", f"At Llama-3-8B with all seven projections adapted, full-weight gradients alone are "
              f"{_size(big['full_grad_bytes']['bf16'])} in bf16 (the size of the bf16 weights of those matrices) and "
              f"{_size(big['full_grad_bytes']['fp32'])} in fp32, GoRA's fp32 sums another "
              f"{_size(big['full_grad_bytes']['fp32'])}; FIM-LoRA's LoRA-B gradients at r = 16 are "
              f"{_size(big['lora_b_grad_bytes']['fp32'])} in fp32. Each calibration batch's backward does "
              f"{_pct(big['backward_saved'])} fewer FLOPs ({_pct(big['step_saved'])} of the forward + backward step)."]
    # measured against arithmetic at the benchmark's own size
    a = _arith(data, small, data["rank"])
    summ = summary(data)
    step = data["step"]["seconds"]
    bwd = {k: _med([s - f for s, f in zip(step[f"{k}_step"], step[f"{k}_forward"])]) for k in ("lora_b", "full_w")}
    stp = {k: _med(step[f"{k}_step"]) for k in ("lora_b", "full_w")}
    full_exact = summ["lora_ga"]["grad_bytes"] == a["full_grad_bytes"]["fp32"]
    b_exact = summ["fim"]["grad_bytes"] == a["lora_b_grad_bytes"]["fp32"]
    lines += ["", f"**Measured against the arithmetic at {small}, r = {data['rank']}.** Gradient bytes: FIM-LoRA "
              f"{_mib(summ['fim']['grad_bytes'])} MiB measured, {_mib(a['lora_b_grad_bytes']['fp32'])} computed "
              f"({'exact' if b_exact else 'DIFFERENT'}); LoRA-GA {_mib(summ['lora_ga']['grad_bytes'])} measured, "
              f"{_mib(a['full_grad_bytes']['fp32'])} computed ({'exact' if full_exact else 'DIFFERENT'}). One "
              f"forward + backward on one {data['step']['batch_shape'][0]} x {data['step']['batch_shape'][1]} batch "
              f"(median of {data['step']['repeats']}, alternating; backward = step - forward-only): with only "
              f"LoRA-B requiring grad {stp['lora_b']:.2f} s (backward {bwd['lora_b']:.2f} s), with the adapted "
              f"weights requiring grad {stp['full_w']:.2f} s (backward {bwd['full_w']:.2f} s): the backward "
              f"{_pct(1 - bwd['lora_b'] / bwd['full_w'])} shorter and the step "
              f"{_pct(1 - stp['lora_b'] / stp['full_w'])} shorter, against {_pct(a['backward_saved'])} and "
              f"{_pct(a['step_saved'])} fewer FLOPs."]
    return lines


def render_check(data: dict, fim_rows: list[dict]) -> list[str]:
    roles = fim_rows[0]["grad_params"]
    only_b = set(roles) == {"LoRA-B"}
    return [f"**FIM-LoRA asks autograd for LoRA-B gradients only** (`fimlora.fisher.calibration_state`: every "
            f"parameter's `requires_grad` off, then on for each LoRA-B; one `loss.backward()` per batch): in this "
            f"run its backward left `.grad` on {', '.join(f'{v} {k}' for k, v in roles.items())} parameters"
            + (" and nothing else." if only_b else ": NOT only LoRA-B.")]


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:
        size, method = argv[1:3]
        print(json.dumps(child(size, method)))
        return 0
    return section_script_main(argv, __doc__, NAME, "setup_cost", ROOT / "docs" / "benchmarks.md", measure,
                               render_section, json_name=JSON_NAME)


if __name__ == "__main__":
    sys.exit(main())
