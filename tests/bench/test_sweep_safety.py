"""Sweeps share a results folder safely, never leave it, and never keep results made with other settings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fimlora.bench.config import load_config, task_id
from fimlora.bench.sweep import plan_sweep

WORKER = Path(__file__).with_name("sweep_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def config(tmp_path, tasks="[sst2]", seeds="[1, 2, 3, 4, 5, 6]", extra="") -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(f"name: c\nmodel: minilm\nmethods: [lora]\nseeds: {seeds}\nranks: [2]\ntasks: {tasks}\n"
                 f"train: {{max_steps: 5}}\n{extra}")
    return p


def start(cfg: Path, results: Path, log: Path, seconds: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, str(WORKER), str(cfg), str(results), str(log), str(seconds)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def executions(log: Path) -> list[str]:
    return [line.split()[1] for line in log.read_text().splitlines()] if log.exists() else []


def test_two_workers_on_one_folder_run_each_run_exactly_once(tmp_path):
    cfg, results, log = config(tmp_path, extra="keep_adapters: true\n"), tmp_path / "results", tmp_path / "log"
    a, b = start(cfg, results, log, 0.4), start(cfg, results, log, 0.4)
    ca, cb = finish(a), finish(b)
    ran = executions(log)
    assert sorted(ran) == sorted(set(ran)) and len(ran) == 6  # no run twice, none lost
    assert ca["ok"] + cb["ok"] == 6 and ca["ok"] > 0 and cb["ok"] > 0  # both did work
    for run_id in ran:
        record = json.loads((results / f"{run_id}.json").read_text())
        assert record["status"] == "ok"
        assert json.loads((results / "adapters" / run_id / "adapter_config.json").read_text()) == {"run": run_id}
    again = finish(start(cfg, results, log, 0.0))
    assert again["skipped"] == 6 and again["ok"] == 0


def test_a_killed_workers_lock_dies_with_it(tmp_path):
    cfg, results, log = config(tmp_path, seeds="[1]"), tmp_path / "results", tmp_path / "log"
    holder = start(cfg, results, log, 60)
    for _ in range(600):
        if executions(log):
            break
        time.sleep(0.05)
    assert executions(log) == ["sst2__lora__r2__s1"]
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    counts = finish(start(cfg, results, log, 0.0))
    assert counts["ok"] == 1 and counts["busy"] == 0
    assert json.loads((results / "sst2__lora__r2__s1.json").read_text())["status"] == "ok"


def test_a_task_given_as_a_path_stays_under_results(tmp_path):
    data = tmp_path / "elsewhere" / "my reviews.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n" for i in range(10)))
    tasks = f"['{data}', '{tmp_path / 'elsewhere' / '..' / 'elsewhere' / 'my reviews.jsonl'}']"
    cfg = config(tmp_path, tasks=f"['{data}']", seeds="[1]", extra="keep_adapters: true\n")
    results, log = tmp_path / "results", tmp_path / "log"
    counts = finish(start(cfg, results, log, 0.0))
    assert counts["ok"] == 1
    tid = task_id(str(data))
    written = sorted(p.relative_to(results).as_posix() for p in results.rglob("*") if p.is_file())
    assert f"{tid}__lora__r2__s1.json" in written
    assert f"adapters/{tid}__lora__r2__s1/adapter_config.json" in written
    assert sorted(p.name for p in data.parent.iterdir()) == ["my reviews.jsonl"]  # nothing beside the data
    assert tasks  # the same file through '..' has the same id (checked in test_config)


def test_changed_settings_rerun_and_keep_the_old_result(tmp_path):
    results, log = tmp_path / "results", tmp_path / "log"
    finish(start(config(tmp_path, seeds="[1, 2]"), results, log, 0.0))
    changed = config(tmp_path, seeds="[1, 2]").read_text().replace("max_steps: 5", "max_steps: 7")
    (tmp_path / "c.yaml").write_text(changed)
    plan = plan_sweep(load_config(tmp_path / "c.yaml"), results)
    assert plan.stale == {"sst2__lora__r2__s1", "sst2__lora__r2__s2"} and not plan.finished
    counts = finish(start(tmp_path / "c.yaml", results, log, 0.0))
    assert counts["ok"] == 2 and counts["skipped"] == 0
    for seed in (1, 2):
        record = json.loads((results / f"sst2__lora__r2__s{seed}.json").read_text())
        assert record["config"]["train"] == {"max_steps": 7}
    stale = sorted((results / ".stale").iterdir())
    assert len(stale) == 2 and all(json.loads(p.read_text())["config"]["train"] == {"max_steps": 5} for p in stale)
    # a result that is not a result ([] / null) is not finished, and is not a crash
    (results / "sst2__lora__r2__s1.json").write_text("[]")
    (results / "sst2__lora__r2__s2.json").write_text("null")
    assert not plan_sweep(load_config(tmp_path / "c.yaml"), results).finished


def test_a_rewritten_data_file_makes_its_results_stale_and_never_reused(tmp_path, monkeypatch):
    """Issue 20, 2: a result stands for the data it was trained on, not for the file's name."""
    import fimlora.bench.sweep as sweep
    from tests.bench.sweep_worker import fake_run_one

    log = tmp_path / "log"
    monkeypatch.setattr(sweep, "run_one", lambda cfg, run, work: fake_run_one(cfg, run, work, str(log), 0.0))
    train, test = tmp_path / "train.jsonl", tmp_path / "test.csv"
    train.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n" for i in range(10)))
    test.write_text("text,label\nu,0\nv,1\n")
    cfg = load_config(config(tmp_path, tasks=f"[{{train: '{train}', test: '{test}'}}, '{train}']", seeds="[1]"))
    first, other = tmp_path / "first", tmp_path / "other"
    assert sweep.run_sweep(cfg, first, progress=False)["ok"] == 2
    assert len(plan_sweep(cfg, first).finished) == 2
    # Other texts and three classes under the same name: both tasks read it, so neither result stands.
    train.write_text("".join(json.dumps({"text": f"other {i}", "label": i % 3}) + "\n" for i in range(10)))
    plan = plan_sweep(cfg, first)
    assert not plan.finished and len(plan.stale) == 2
    counts = sweep.run_sweep(cfg, other, progress=False, reuse=[first])
    assert counts["reused"] == 0 and counts["ok"] == 2, counts
    # The test file alone changes only the task that reads it.
    done = sweep.run_sweep(cfg, first, progress=False)
    assert done["ok"] == 2 and len(list((first / ".stale").iterdir())) == 2
    test.write_text("text,label\nu,1\nv,0\n")
    plan = plan_sweep(cfg, first)
    assert plan.stale == {r.run_id for r in plan.runs if r.task != task_id(str(train))}
    assert plan.finished == {r.run_id for r in plan.runs if r.task == task_id(str(train))}
