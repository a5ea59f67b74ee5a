"""A `fimlora run` worker whose runs are fast fakes: for the concurrency and path-safety tests.

    python sweep_worker.py CONFIG.yaml RESULTS LOG SECONDS_PER_RUN

Everything but ``run_one`` is the real sweep (planning, locks, resume, result writing, keep_adapters).
"""

import json
import os
import sys
import time
from pathlib import Path

import fimlora.bench.sweep as sweep
from fimlora.bench.config import load_config


def fake_run_one(cfg, run, work_dir, log: str, seconds: float) -> dict:
    with open(log, "a") as f:
        f.write(f"{os.getpid()} {run.run_id}\n")
    time.sleep(seconds)
    adapter = Path(work_dir) / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"run": run.run_id}))
    return {"run_id": run.run_id, "status": "ok", "task": run.task, "method": run.method, "r": run.r,
            "seed": run.seed, "metrics": {}, "pid": os.getpid()}  # the sweep adds config and settings hash


if __name__ == "__main__":
    config, results, log, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    sweep.run_one = lambda cfg, run, work: fake_run_one(cfg, run, work, log, seconds)
    print(json.dumps(sweep.run_sweep(load_config(config), results, progress=False)))
