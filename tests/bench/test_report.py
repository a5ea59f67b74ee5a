"""The report: selection helpers, the verdicts and rank sweep, and a whole report from fake run JSONs."""

from __future__ import annotations

import json

import pytest

from fimlora.bench.report import (
    build_report,
    load_results,
    mean_std,
    paired_comparison,
    paired_scoreboard,
    rank_sweep,
    scoreboard_table,
    select_runs,
    task_scores,
    verdicts,
)
from fimlora.extras import MissingExtraError


def test_mean_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, 0.0)


def _fake_run(method, seed, accs, r=2):
    return {"method": method, "r": r, "seed": seed, "status": "ok", "fim_variant": {},
            "metrics": {t: {"accuracy": a} for t, a in accs.items()}}


def test_select_runs_and_task_scores_keep_run_order_and_skip_diverged_runs():
    runs = [_fake_run("lora", 1, {"a": 0.5}), _fake_run("fim", 1, {"a": 0.6}, r=4),
            {**_fake_run("fim", 2, {"a": 0.7}), "fim_variant": {"r_min": 2}}, _fake_run("fim", 3, {"a": 0.8}),
            {**_fake_run("fim", 4, {"a": 0.9}), "status": "diverged"}]
    assert [x["seed"] for x in select_runs(runs, method="fim")] == [1, 2, 3, 4]
    assert [x["seed"] for x in select_runs(runs, method="fim", r=2, variant="")] == [3, 4]
    assert [x["seed"] for x in select_runs(runs, variant="r_min=2")] == [2]
    assert task_scores(select_runs(runs, method="fim", r=2), "a") == [0.7, 0.8]  # the diverged run has none
    assert task_scores(runs, "b") == []


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
    assert table.splitlines() == ["table,r,method,variant,task,mean,std,n,metric",
                                  "main,2,lora,,t,55.0,7.0710678118654755,2,accuracy",
                                  "main,2,fim,,t,70.0,0.0,1,accuracy"]


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


# The paper's Table 1, LoRA row: MNLI, SST-2, CoLA, MRPC, QQP, QNLI, STS-B, RTE; its Avg is 88.67.
PAPER_LORA = {"mnli": 90.31, "sst2": 96.14, "cola": 70.46, "mrpc": 92.22, "qqp": 88.99, "qnli": 94.09,
              "stsb": 91.25, "rte": 85.92}
# The metrics each GLUE task records; the first is the one the paper's column shows, the others are decoys
# (a report that showed accuracy for CoLA or MRPC would print 11.11).
GLUE_RECORDS = {"mnli": ("accuracy", "accuracy_mismatched"), "sst2": ("accuracy",), "cola": ("matthews", "accuracy"),
                "mrpc": ("f1", "accuracy"), "qqp": ("f1", "accuracy"), "qnli": ("accuracy",),
                "stsb": ("pearson", "spearman"), "rte": ("accuracy",)}


def _glue_run(task, method, seed, value, experiment="glue_large", metrics=None):
    names = metrics or GLUE_RECORDS[task]
    recorded = {name: (value if i == 0 else 0.1111) for i, name in enumerate(names)}
    return {**_full_run(method, seed, 0.0), "run_id": f"hf-glue-{task}__{method}__r2__s{seed}",
            "experiment": experiment, "task": f"hf-glue-{task}",
            "metrics": {f"glue:{task}": {**recorded, "n": 100, "primary": "accuracy"}}}


def test_glue_table_shows_the_papers_metric_in_each_column_and_its_average(tmp_path):
    runs = [_glue_run(t, "lora", seed, v / 100, "glue_small" if t in ("cola", "mrpc", "stsb", "rte") else "glue_large")
            for t, v in PAPER_LORA.items() for seed in (1, 2)]
    _write_runs(tmp_path, runs)
    md, table = build_report(tmp_path)
    glue = md[md.index("## GLUE (the paper's Table 1 layout)"):md.index("## glue_large")]
    assert ("| Method | MNLI (Acc) | SST-2 (Acc) | CoLA (Mcc) | MRPC (F1) | QQP (F1) | QNLI (Acc) | STS-B (Pearson) "
            "| RTE (Acc) | Avg |") in glue
    assert ("| LoRA | 90.31 ± 0.00 | 96.14 ± 0.00 | 70.46 ± 0.00 | 92.22 ± 0.00 | 88.99 ± 0.00 | 94.09 ± 0.00 "
            "| 91.25 ± 0.00 | 85.92 ± 0.00 | 88.67 ± 0.00 |") in glue
    assert "CoLA Matthews correlation" in glue and "MRPC F1 of the positive class" in glue
    assert "Mcc = Matthews correlation" in glue
    # each experiment's own section names its columns' metrics too
    assert "| Method | CoLA (Mcc) | MRPC (F1) | STS-B (Pearson) | RTE (Acc) | Avg |" in md
    assert "glue,2,lora,,glue:cola,70.46,0.0,2,matthews" in table.splitlines()


def test_glue_table_keeps_the_layout_when_tasks_are_missing_and_leaves_out_old_results(tmp_path):
    old_cola = _glue_run("cola", "lora", 1, 0.80, metrics=("accuracy",))  # written before Matthews was recorded
    _write_runs(tmp_path, [_glue_run("rte", "lora", 1, 0.70), old_cola])
    md, _ = build_report(tmp_path)
    assert "| LoRA | – | – | – | – | – | – | – | 70.00 ± 0.00 | – |" in md  # no Avg without all eight
    assert "Left out: glue:cola: 1 run(s) have no matthews recorded (made before it was; rerun them)." in md


def test_a_regression_task_reports_its_headline_correlation(tmp_path):
    runs = [{**_full_run("lora", seed, 0.0), "run_id": f"scores__lora__r2__s{seed}", "task": "scores",
             "metrics": {"scores": {"pearson": p, "spearman": 0.1, "n": 10, "primary": "pearson"}}}
            for seed, p in ((1, 0.80), (2, 0.90))]
    _write_runs(tmp_path, runs)
    md, _ = build_report(tmp_path)
    assert ("#### r = 2 (% of each column's metric (Pearson = Pearson correlation), mean ± std over 2 seeds; "
            "trainable parameters)") in md
    assert "| Method | scores (Pearson) | Avg |" in md and "| LoRA | 85.00 ± 7.07 | 85.00 ± 7.07 |" in md


def test_fim_eva_is_judged_against_fim_and_eva(tmp_path):
    runs = [_full_run(m, s, acc) for m, accs in (("fim", (0.60, 0.62)), ("eva", (0.70, 0.71)),
                                                  ("fim_eva", (0.80, 0.81)), ("lora", (0.5, 0.5)))
            for s, acc in zip((1, 2), accs)]
    _write_runs(tmp_path, runs)
    md, _ = build_report(tmp_path)
    assert "| FIM ranks + EVA directions | 80.50 ± 0.71 |" in md
    assert ("- t, r = 2: FIM ranks + EVA directions 80.50 ± 0.71: win vs FIM-LoRA (+19.50); win vs EVA (+10.00) "
            "→ beats both") in md
    runs = [{**r, "metrics": {"t": {"accuracy": 0.705, "n": 40}}} if r["method"] == "fim_eva" else r for r in runs]
    _write_runs(tmp_path, runs)
    md, _ = build_report(tmp_path)
    assert "win vs FIM-LoRA (+9.50); tie vs EVA (+0.00) → beats one of them" in md


def _correct_run(method, seed, correct, r=2, task="t"):
    """A run whose accuracy on ``task`` is the mean of its per-example ``correct`` list."""
    return {**_fake_run(method, seed, {}, r=r),
            "metrics": {task: {"accuracy": sum(correct) / len(correct), "n": len(correct), "correct": correct}}}


def test_paired_comparison_of_identical_correctness_is_zero_with_p_one():
    correct = [1, 0, 1, 1, 0, 1, 0, 0, 1, 1]
    result = paired_comparison([_correct_run("fim", s, correct) for s in (1, 2)],
                               [_correct_run("lora", s, correct) for s in (1, 2)], "t")
    assert result["difference"] == 0.0 and result["ci_low"] == result["ci_high"] == 0.0
    assert result["p_value"] == 1.0 and result["n_seeds"] == 2 and result["n_examples"] == 10


def test_paired_comparison_where_one_method_is_right_wherever_the_other_is_wrong():
    fim = [_correct_run("fim", s, [1, 0] * 50) for s in (1, 2, 3)]
    lora = [_correct_run("lora", s, [0, 1] * 50) for s in (1, 2, 3)]
    assert paired_comparison(fim, lora, "t")["p_value"] == 1.0  # 50 each way: no difference
    fim = [_correct_run("fim", s, [1] * 100) for s in (1, 2, 3)]
    lora = [_correct_run("lora", s, [0] * 100) for s in (1, 2, 3)]
    result = paired_comparison(fim, lora, "t")
    assert result["difference"] == 1.0 and result["ci_low"] == result["ci_high"] == 1.0
    assert result["p_value"] == pytest.approx(1 / 10_001)  # no resample as extreme as the null


def test_paired_comparison_pairs_only_the_seeds_both_methods_have_and_says_why_it_is_not_there():
    fim = [_correct_run("fim", s, [1, 1, 0, 0]) for s in (1, 2, 3)]
    lora = [_correct_run("lora", s, [1, 1, 0, 0]) for s in (2, 3, 4)]
    assert paired_comparison(fim, lora, "t")["n_seeds"] == 2
    old = [{**run, "metrics": {"t": {"accuracy": 0.5, "n": 4}}} for run in lora]  # made before `correct`
    assert paired_comparison(fim, old, "t") == ("paired bootstrap n/a: results lack per-example correctness (made "
                                                "before issue 22 recorded `correct`; seed(s) [2, 3]; rerun them)")
    assert paired_comparison(fim, [_correct_run("lora", 9, [1])], "t") == (
        "paired bootstrap n/a: no seed finished ok for both")
    assert "different test sets (sizes [3, 4])" in paired_comparison(fim, [_correct_run("lora", 1, [1, 0, 1])], "t")


def test_verdicts_carry_the_bootstrap_under_each_task_line_and_judge_the_new_peers():
    runs = [_correct_run("fim", s, [1] * 8 + [0] * 2) for s in (1, 2)]
    runs += [_correct_run("pissa", s, [1] * 8 + [0] * 2) for s in (1, 2)]
    runs += [_correct_run("gora", s, [0] * 10) for s in (1, 2)]
    runs += [{**run, "metrics": {"t": {"accuracy": 0.8, "n": 10}}} for run in
             [_fake_run("rslora", s, {}) for s in (1, 2)]]
    runs += [_correct_run("fim_pissa", s, [1] * 10) for s in (1, 2)]
    text = verdicts(runs)
    assert ("- t, r = 2: FIM-LoRA 80.00 ± 0.00: tie vs rsLoRA (+0.00); tie vs PiSSA (+0.00); "
            "win vs GoRA (+80.00)") in text
    assert ("  - vs PiSSA: paired bootstrap, 2 seed(s) x 10 examples: +0.00 accuracy points, "
            "95% CI [+0.00, +0.00], p = 1.0000") in text
    assert "  - vs rsLoRA: paired bootstrap n/a: results lack per-example correctness" in text
    assert "  - vs GoRA: paired bootstrap, 2 seed(s) x 10 examples: +80.00 accuracy points" in text
    assert ("- t, r = 2: FIM ranks + PiSSA init 100.00 ± 0.00: win vs FIM-LoRA (+20.00); win vs PiSSA (+20.00) "
            "→ beats both") in text


def _size_run(method, seed, r, acc, params, variant=None):
    """A run at rank ``r`` with ``params`` trainable parameters; a variant is an explicit fim_variants entry."""
    run = {**_full_run(method, seed, acc, variant), "r": r, "trainable_params": params,
           "run_id": f"t__{method}__r{r}__s{seed}" + "".join(f"__{k}{v}" for k, v in (variant or {}).items())}
    if variant:
        run["config"] = {"fim_variants": [{}, variant]}
    return run


def test_frontier_table_has_a_row_per_method_and_size_and_the_plot_is_written(tmp_path):
    runs = [_size_run("lora", s, r, acc + 0.01 * s, 100 * r) for r, acc in ((1, 0.50), (4, 0.60)) for s in (1, 2)]
    runs += [_size_run("fim", s, r, acc, 100 * r + s) for r, acc in ((1, 0.55), (4, 0.65)) for s in (1, 2)]
    runs += [_size_run("fim", s, 4, 0.58, 200, {"budget_fraction": 0.5, "r_min": 0}) for s in (1, 2)]
    results = tmp_path / "results"
    results.mkdir()
    _write_runs(results, runs)
    md, _ = build_report(results, figures_dir=tmp_path / "figs")
    frontier = md[md.index("### Accuracy-size frontier"):md.index("### Rank maps")]
    assert "| Method | r | trainable params (mean) | t |" in frontier
    assert "| LoRA | 1 | 100 | 51.50 ± 0.71 |" in frontier
    assert "| LoRA | 4 | 400 | 61.50 ± 0.71 |" in frontier
    assert "| FIM-LoRA | 1 | 102 | 55.00 ± 0.00 |" in frontier  # seeds of 101 and 102 parameters: their mean, rounded
    assert "| FIM-LoRA (budget_fraction=0.5,r_min=0) | 4 | 200 | 58.00 ± 0.00 |" in frontier
    assert "![accuracy-size frontier e](figs/frontier_e.png)" in frontier
    assert (tmp_path / "figs" / "frontier_e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_frontier_without_matplotlib_keeps_the_table_and_says_so(tmp_path, monkeypatch):
    import fimlora.bench.figures as figures
    import fimlora.bench.report as report

    def no_matplotlib(module, extra, purpose):
        raise MissingExtraError(f"{purpose} needs the 'matplotlib' package")

    monkeypatch.setattr(figures, "require", no_matplotlib)  # every report figure opens pyplot there
    monkeypatch.setattr(report, "rank_map_stats", lambda runs, figures_dir: [])
    _write_runs(tmp_path, [_size_run("lora", 1, r, 0.5, 100 * r) for r in (1, 2)])
    with pytest.warns(UserWarning, match="report: frontier figure left out: .*matplotlib"):
        md, _ = build_report(tmp_path, figures_dir=tmp_path / "figs")
    assert "| LoRA | 2 | 200 | 50.00 ± 0.00 |" in md and "![accuracy-size frontier" not in md


def test_paired_scoreboard_counts_significant_cells_and_the_fdr_column_drops_a_borderline_one():
    right, wrong = [1] * 100, [0] * 100
    five_more = [1] * 95 + [0] * 5  # fim right on 5 examples the other gets wrong, the same elsewhere
    runs = [_correct_run("fim", s, right, r=r) for s in (1, 2) for r in (2, 4)]
    runs += [_correct_run("lora", s, wrong, r=2) for s in (1, 2)] + [_correct_run("lora", s, right, r=4)
                                                                        for s in (1, 2)]
    runs += [_correct_run("gora", s, five_more, r=2) for s in (1, 2)] + [_correct_run("gora", s, right, r=4)
                                                                            for s in (1, 2)]
    runs += [_correct_run("fim", s, wrong, r=8) for s in (1, 2)] + [_correct_run("pissa", s, right, r=8)
                                                                     for s in (1, 2)]
    borderline = paired_comparison(select_runs(runs, method="fim", r=2), select_runs(runs, method="gora", r=2), "t")
    assert 0.01 < borderline["p_value"] < 0.05  # the premise: significant alone, not among six comparisons
    board = {row["baseline"]: row for row in paired_scoreboard(runs)}
    assert list(board) == ["lora", "pissa", "gora"]  # BASELINES order; random, EVA, ... have no cell
    assert board["lora"] == {"subject": "fim", "baseline": "lora", "cells": 2, "better": 1, "worse": 0,
                             "better_fdr": 1, "worse_fdr": 0, "mean_difference": pytest.approx(50.0)}
    assert board["gora"] == {"subject": "fim", "baseline": "gora", "cells": 2, "better": 1, "worse": 0,
                             "better_fdr": 0, "worse_fdr": 0, "mean_difference": pytest.approx(2.5)}
    assert board["pissa"] == {"subject": "fim", "baseline": "pissa", "cells": 1, "better": 0, "worse": 1,
                              "better_fdr": 0, "worse_fdr": 1, "mean_difference": pytest.approx(-100.0)}
    assert "| FIM-LoRA vs GoRA | 2 | 1 | 0 | 0 / 0 | +2.50 |" in scoreboard_table(list(board.values()))
    # a composite against its parents, its own FDR family: alone, the borderline cell stays significant
    runs += [_correct_run("fim_gora", s, five_more, r=2) for s in (1, 2)]
    (row,) = paired_scoreboard(runs, [("fim_gora", "fim")])
    assert (row["subject"], row["cells"], row["worse"], row["worse_fdr"]) == ("fim_gora", 1, 1, 1)


def test_rank_map_figures_of_two_experiments_with_the_same_task_and_rank_do_not_overwrite_each_other(tmp_path):
    """One report over several results folders (docs/results.md): each experiment's rank map is its own file."""
    pytest.importorskip("matplotlib")
    for name in ("first", "second"):
        folder = tmp_path / name
        folder.mkdir()
        _write_runs(folder, [{**_full_run("fim", 1, 0.7), "experiment": name}])
    md, _ = build_report([tmp_path / "first", tmp_path / "second"], figures_dir=tmp_path / "figs")
    assert "(figs/rank_map_first_t_r2.png)" in md and "(figs/rank_map_second_t_r2.png)" in md
    assert (tmp_path / "figs" / "rank_map_first_t_r2.png").is_file()
    assert (tmp_path / "figs" / "rank_map_second_t_r2.png").is_file()
