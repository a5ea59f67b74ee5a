"""One peak-memory measurement of bench_calibration.py's section 3, in the fresh process it needs.

    python benchmarks/memory_child.py CASE_JSON MODE

CASE_JSON is a bench_calibration.Case as a JSON object; MODE is one of bench_calibration.MEMORY_MODES:
``load`` (build the LoRA model and one batch), ``train`` (one LoRA training step, bench_calibration.lora_step),
``batch`` or ``per_example`` (calibration with that estimator on the batch). Prints one JSON line with byte
counts: {"peak": RSS high-water mark from the end of loading to the end of MODE, "loaded": RSS at the end of
loading, "load_peak": the high-water mark of loading, "fisher_bytes": fp32 size of all LoRA-B matrices} and
"lora_layers" (LoRA layer classes and their counts). Linux and glibc only (reads /proc/self/status,
writes /proc/self/clear_refs, calls malloc_trim).
"""

from __future__ import annotations

import ctypes
import json
import sys

import torch
from bench_calibration import MEMORY_MODES, Case, lora_layer_types, lora_model, lora_step, make_batches

from fimlora import FimConfig, compute_fisher


def status_bytes(field: str) -> int:
    """A kB field of /proc/self/status (VmHWM: resident-set high-water mark, VmRSS: resident set) in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"memory: /proc/self/status has no {field} line")


def reset_peak_rss() -> None:
    """Set this process's VmHWM to its current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(case: Case, mode: str) -> dict:
    """Run ``mode`` once on the case's model and first batch; the peaks in bytes."""
    model = lora_model(case)
    batches = make_batches(case)[:1]
    load_peak = status_bytes("VmHWM")
    ctypes.CDLL(None).malloc_trim(0)  # glibc: give freed heap (e.g. of loading) back before the reset
    reset_peak_rss()
    loaded = status_bytes("VmRSS")
    if mode == "train":
        lora_step(model, batches[0], case.step_mode)
    elif mode in ("batch", "per_example"):
        compute_fisher(model, batches, FimConfig(n_batches=1, estimator=mode, progress=False))
    peak = status_bytes("VmHWM")
    fisher_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if "lora_B" in n)
    return {"peak": peak, "loaded": loaded, "load_peak": load_peak, "fisher_bytes": fisher_bytes,
            "lora_layers": lora_layer_types(model)}


def main(argv=None) -> int:
    case_json, mode = sys.argv[1:] if argv is None else argv
    if mode not in MEMORY_MODES:
        raise SystemExit(f"memory_child: MODE must be one of {list(MEMORY_MODES)}, got {mode!r}")
    torch.set_num_threads(1)
    print(json.dumps(measure(Case(**json.loads(case_json)), mode)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
