"""One peak-memory measurement of bench_calibration.py's section 3, in the fresh process it needs.

    python benchmarks/memory_child.py CASE_JSON MODE

CASE_JSON is a bench_calibration.Case as a JSON object; MODE is one of bench_calibration.MEMORY_MODES:
``load`` (build the LoRA model and one batch), ``train`` (one LoRA forward + backward), ``batch`` or
``per_example`` (calibration with that estimator on the batch). Prints one JSON line with byte counts:
{"peak": RSS high-water mark at the end, "loaded": the same after loading, "fisher_bytes": fp32 size of
all LoRA-B matrices}. Linux only (reads /proc/self/status).
"""

from __future__ import annotations

import json
import sys

import torch
from bench_calibration import MEMORY_MODES, Case, lora_model, make_batches

from fimlora import FimConfig, compute_fisher


def peak_rss() -> int:
    """This process's resident-set high-water mark (VmHWM) in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("memory: /proc/self/status has no VmHWM line")


def measure(case: Case, mode: str) -> dict:
    """Run ``mode`` once on the case's model and first batch; the peaks in bytes."""
    model = lora_model(case)
    batches = make_batches(case)[:1]
    loaded = peak_rss()
    if mode == "train":
        model.eval()  # same dropout state as calibration
        model(**batches[0]).loss.backward()
    elif mode in ("batch", "per_example"):
        compute_fisher(model, batches, FimConfig(n_batches=1, estimator=mode, progress=False))
    fisher_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if "lora_B" in n)
    return {"peak": peak_rss(), "loaded": loaded, "fisher_bytes": fisher_bytes}


def main(argv=None) -> int:
    case_json, mode = sys.argv[1:] if argv is None else argv
    if mode not in MEMORY_MODES:
        raise SystemExit(f"memory_child: MODE must be one of {list(MEMORY_MODES)}, got {mode!r}")
    torch.set_num_threads(1)
    print(json.dumps(measure(Case(**json.loads(case_json)), mode)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
