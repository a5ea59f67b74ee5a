"""RunResult and upgrade: every result under results/ loads, and a loaded result writes back the keys it was read
with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fimlora.bench.config import RunSpec, run_settings_hash
from fimlora.bench.report import load_results
from fimlora.bench.results import NOT_RESULT_FOLDERS, NOT_RUN_RESULTS, RunResult, upgrade

RESULTS = Path(__file__).resolve().parents[2] / "results"
FILES = sorted(p for p in RESULTS.rglob("*.json")
               if not NOT_RESULT_FOLDERS & set(p.parts) and p.name not in NOT_RUN_RESULTS
               and not p.name.endswith(".error.json"))


def test_the_repository_has_old_and_new_results():
    records = [json.loads(p.read_text(encoding="utf-8")) for p in FILES]
    assert len(records) > 800
    assert any("settings_hash" not in d for d in records) and any("settings_hash" in d for d in records)


def test_every_result_under_results_loads_and_writes_back_its_keys():
    for path in FILES:
        d = json.loads(path.read_text(encoding="utf-8"))
        run = RunResult.from_dict(d)
        written = run.to_dict()
        # Same keys (upgrade may add the settings hash an old file lacked, never rename one); the order is the
        # current sweep's (the earliest results wrote config before versions).
        assert set(d) <= set(written) and set(written) - set(d) <= {"settings_hash"}, path
        assert {k: written[k] for k in d} == d, path
        assert dict(run) == written and run["metrics"] is run.metrics


def test_a_result_is_written_with_the_current_sweeps_keys_in_its_order():
    path = next(p for p in FILES if "data_contents" in json.loads(p.read_text(encoding="utf-8")))
    d = json.loads(path.read_text(encoding="utf-8"))
    assert list(RunResult.from_dict(d).to_dict()) == list(d)
    assert RunResult.from_dict(d).to_json() == json.dumps(d, indent=2) + "\n"


def test_load_results_reads_every_experiment_folder():
    runs = load_results(sorted(p for p in RESULTS.iterdir() if p.is_dir()))
    assert len(runs) == len(FILES) and all(isinstance(run, RunResult) for run in runs)


def test_upgrade_gives_an_old_result_the_hash_of_the_config_it_recorded():
    path = next(p for p in FILES if "settings_hash" not in json.loads(p.read_text(encoding="utf-8")))
    d = json.loads(path.read_text(encoding="utf-8"))
    spec = RunSpec(d["task"], d["method"], d["r"], d["seed"], tuple(sorted(d["fim_variant"].items())))
    assert spec.run_id == d["run_id"]
    assert upgrade(d)["settings_hash"] == run_settings_hash(d["config"], spec)
    assert upgrade({"run_id": "a", "status": "ok"}) == {"run_id": "a", "status": "ok", "fim_variant": {},
                                                         "method_info": {}}


def test_a_result_without_its_identity_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="status: a run result needs a non-empty string, got None"):
        RunResult.from_dict({"run_id": "a"})


def test_keys_this_code_does_not_know_are_kept_after_the_known_ones():
    run = RunResult.from_dict({"run_id": "a", "status": "ok", "pid": 7})
    assert list(run.to_dict())[-1] == "pid" and run["pid"] == 7 and run.get("config") is None
