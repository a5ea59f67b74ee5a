"""The report: selection helpers, the verdicts and rank sweep, and a whole report from fake run JSONs."""

from __future__ import annotations

import json

import pytest

from fimlora.experiments.report import (
    accuracies,
    build_report,
    load_results,
    mean_std,
    rank_sweep,
    select_runs,
    verdicts,
)
from fimlora.extras import MissingExtraError


def test_mean_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, 0.0)


def _fake_run(method, seed, accs, r=2):
    return {"method": method, "r": r, "seed": seed, "status": "ok", "fim_variant": {},
            "metrics": {t: {"accuracy": a} for t, a in accs.items()}}


def test_select_runs_and_accuracies_keep_run_order_and_skip_diverged_runs():
    runs = [_fake_run("lora", 1, {"a": 0.5}), _fake_run("fim", 1, {"a": 0.6}, r=4),
            {**_fake_run("fim", 2, {"a": 0.7}), "fim_variant": {"r_min": 2}}, _fake_run("fim", 3, {"a": 0.8}),
            {**_fake_run("fim", 4, {"a": 0.9}), "status": "diverged"}]
    assert [x["seed"] for x in select_runs(runs, method="fim")] == [1, 2, 3, 4]
    assert [x["seed"] for x in select_runs(runs, method="fim", r=2, variant="")] == [3, 4]
    assert [x["seed"] for x in select_runs(runs, variant="r_min=2")] == [2]
    assert accuracies(select_runs(runs, method="fim", r=2), "a") == [0.7, 0.8]  # the diverged run has none
    assert accuracies(runs, "b") == []


def test_verdicts_judge_each_task_and_the_average_against_seed_noise():
    runs = [_fake_run("lora", s, {"a": 0.50 + d, "b": 0.60 + d}) for s, d in ((1, 0.0), (2, 0.01), (3, 0.02))]
    runs += [_fake_run("fim", s, {"a": 0.50 + d, "b": 0.70 + d}) for s, d in ((1, 0.0), (2, 0.01), (3, 0.02))]
    text = verdicts(runs)
    assert "- a, r = 2: FIM-LoRA 51.00 ± 1.00: tie vs LoRA (+0.00)" in text
    assert "- b, r = 2: FIM-LoRA 71.00 ± 1.00: win vs LoRA (+10.00)" in text
    assert "- Avg, r = 2: FIM-LoRA 61.00 ± 1.00: win vs LoRA (+5.00)" in text
    assert "std over seeds of one method on one task is 1.00" in text
    assert "Test-set resolution" not in text  # the fake metrics carry no test size
    sized = [{**x, "metrics": {t: {**m, "n": 50} for t, m in x["metrics"].items()}} for x in runs]
    assert "one test example is worth 2.00 points on a (n = 50), 2.00 points on b (n = 50)" in verdicts(sized)
    single = verdicts([{**x, "metrics": {"a": x["metrics"]["a"]}} for x in runs])
    assert "Avg" not in single  # one task: no separate average line
    # one run per task (the encoder suites): the same per-seed Avg as a mixture scored on both tasks
    separate = verdicts([{**x, "metrics": {t: x["metrics"][t]}} for x in runs for t in ("a", "b")])
    assert "- Avg, r = 2: FIM-LoRA 61.00 ± 1.00: win vs LoRA (+5.00)" in separate


def test_rank_sweep_of_a_mixture_is_the_average_over_tasks():
    runs = [_fake_run("lora", s, {"a": 0.5, "b": 0.7}, r=r) for s in (1, 2) for r in (2, 8)]
    runs += [_fake_run("fim", s, {"a": 0.6, "b": 0.8 + 0.02 * s}, r=r) for s in (1, 2) for r in (2, 8)]
    (table,) = rank_sweep(runs)
    assert table.startswith("#### Avg over 2 tasks")
    assert "| LoRA | 60.00 ± 0.00 | 60.00 ± 0.00 |" in table
    assert "| FIM-LoRA | 71.50 ± 0.71 | 71.50 ± 0.71 |" in table
    separate = [{**x, "task": t, "metrics": {t: x["metrics"][t]}} for x in runs for t in ("a", "b")]
    assert [t.split("\n")[0] for t in rank_sweep(separate)] == ["#### a", "#### b"]  # one task per run


def _full_run(method, seed, acc, variant=None, status="ok"):
    """A run JSON with every field the report reads; FIM-LoRA runs carry a two-layer rank map."""
    ranks = {f"model.layers.{i}.self_attn.{p}": 1 + i for i in (0, 1) for p in ("q_proj", "v_proj")}
    run_id = f"t__{method}__r2__s{seed}" + "".join(f"__{k}{v}" for k, v in (variant or {}).items())
    return {"run_id": run_id, "experiment": "e", "task": "t", "method": method, "r": 2, "seed": seed,
            "status": status, "fim_variant": variant or {}, "metrics": {"t": {"accuracy": acc, "n": 40}},
            "calibration_seconds": 1.0, "train_seconds": 10.0, "trainable_params": 1000,
            "method_info": {"scores": {n: 1.0 for n in ranks}} if method == "fim" else {},
            "rank_map_before_training": ranks, "versions": {"torch": "T"}, "machine": {"cpu_count": 2}}


def _write_runs(folder, runs):
    for run in runs:
        (folder / f"{run['run_id']}.json").write_text(json.dumps(run))


def test_build_report_from_run_files(tmp_path):
    _write_runs(tmp_path, [_full_run("lora", 1, 0.50), _full_run("lora", 2, 0.60), _full_run("fim", 1, 0.70),
                           _full_run("fim", 2, 0.80, status="diverged"),
                           _full_run("fim", 1, 0.55, variant={"r_min": 1}),
                           _full_run("fim", 1, 0.65, variant={"r_min": 2})])
    (tmp_path / "rank_map.json").write_text("{}")  # a known non-run file: skipped without a warning
    md, table = build_report(tmp_path, figures_dir=None, title="T")
    assert md.startswith("# T\n\n6 runs from experiment(s) e; torch T, transformers None, peft None; None x2")
    assert "| Method | t | Avg |" in md
    assert "| LoRA | 55.00 ± 7.07 | 55.00 ± 7.07 |" in md
    assert "| FIM-LoRA ⚠ 1 diverged | 70.00 ± 0.00 (n=1) | 70.00 ± 0.00 (n=1) |" in md
    assert "- t, r = 2: FIM-LoRA 70.00 ± 0.00: win vs LoRA (+15.00)" in md
    assert "#### t, r = 2: r_min\n\n| r_min | Acc. (%) |\n|---|---|\n| r_min = 1 | 55.00 ± 0.00 |" in md
    assert "mean rank by type: self_attn.q_proj 1.50, self_attn.v_proj 1.50" in md
    assert "| FIM-LoRA (r_min=2) | 1.00 | 10.0 | 1,000 |  |" in md
    assert table.splitlines() == ["table,r,method,variant,task,mean,std,n",
                                  "main,2,lora,,t,55.0,7.0710678118654755,2", "main,2,fim,,t,70.0,0.0,1"]


def test_report_without_the_plotting_extra_warns_and_keeps_the_tables(tmp_path, monkeypatch):
    import fimlora.rankmap

    def no_matplotlib(*args, **kwargs):
        raise MissingExtraError("plot_rank_map: drawing the rank map needs the 'matplotlib' package")

    monkeypatch.setattr(fimlora.rankmap, "plot_rank_map", no_matplotlib)
    _write_runs(tmp_path, [_full_run("fim", 1, 0.7)])
    with pytest.warns(UserWarning, match="report: rank-map figures left out: .*matplotlib"):
        md, _ = build_report(tmp_path, figures_dir=tmp_path / "figs")
    assert "mean rank by type" in md and "![rank map" not in md


def test_report_names_result_files_it_cannot_read(tmp_path):
    (tmp_path / "good.json").write_text(json.dumps({"run_id": "a", "status": "ok", "metrics": {}}))
    (tmp_path / "torn.json").write_text('{"run_id": "b", "sta')
    (tmp_path / "list.json").write_text("[]")
    with pytest.warns(UserWarning) as caught:
        runs = load_results(tmp_path)
    assert [r["run_id"] for r in runs] == ["a"]
    messages = " ".join(str(w.message) for w in caught)
    assert "torn.json" in messages and "list.json is not a run result" in messages
