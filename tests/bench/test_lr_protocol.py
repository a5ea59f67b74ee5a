"""The fair learning-rate protocol: the choice rule, the grid, the validation split, and a real sweep."""

from __future__ import annotations

import pytest

from fimlora.app.tasks import load_task
from fimlora.bench.config import ExperimentConfig, RunSpec, expand_runs, run_settings_hash
from fimlora.bench.lr_protocol import at_chosen_lr, choose_learning_rate, validation_score
from fimlora.bench.report import build_report
from fimlora.bench.results import load_results
from fimlora.bench.sweep import plan_sweep, run_sweep

GRID = [1e-4, 1e-3, 1e-2]


def _run(lr, val, seed=1, status="ok", metric="accuracy"):
    return {"learning_rate": lr, "seed": seed, "status": status,
            "validation_metrics": {"t": {metric: val, "primary": metric}}}


def test_the_choice_is_the_best_validation_score_ties_to_the_smaller_rate_and_waits_for_the_whole_grid():
    runs = [_run(1e-4, 0.5), _run(1e-3, 0.7), _run(1e-2, 0.6)]
    assert choose_learning_rate(runs, GRID, seed=1).learning_rate == 1e-3
    tie = [_run(1e-4, 0.5), _run(1e-3, 0.7), _run(1e-2, 0.7)]
    assert choose_learning_rate(tie, GRID, seed=1).learning_rate == 1e-3
    # A diverged run scores nothing, even with a stale metric in its record.
    diverged = [_run(1e-4, 0.5), _run(1e-3, 0.9, status="diverged"), _run(1e-2, 0.6)]
    choice = choose_learning_rate(diverged, GRID, seed=1)
    assert choice.learning_rate == 1e-2 and choice.curve == {1e-4: 0.5, 1e-3: None, 1e-2: 0.6}
    assert choose_learning_rate(runs[:2], GRID, seed=1) is None  # a grid value still missing
    assert choose_learning_rate([_run(lr, 0.1, status="diverged") for lr in GRID], GRID, seed=1) is None
    # Runs of another seed never choose (they would have seen a different split of noise).
    other = [_run(1e-4, 0.5), _run(1e-3, 0.7), _run(1e-2, 0.6), _run(1e-2, 0.99, seed=2)]
    assert choose_learning_rate(other, GRID, seed=1).learning_rate == 1e-3
    # A loss is lower-is-better.
    losses = [_run(1e-4, 2.0, metric="loss"), _run(1e-3, 1.5, metric="loss"), _run(1e-2, 1.8, metric="loss")]
    assert choose_learning_rate(losses, GRID, seed=1).learning_rate == 1e-3


def test_validation_score_averages_tasks_and_refuses_a_missing_value():
    run = {"status": "ok", "validation_metrics": {"a": {"accuracy": 0.5, "primary": "accuracy"},
                                                  "b": {"accuracy": 0.7, "primary": "accuracy"}}}
    assert validation_score(run) == (pytest.approx(0.6), "accuracy")
    assert validation_score({"status": "ok", "validation_metrics": {"a": {"accuracy": float("nan"),
                                                                          "primary": "accuracy"}}}) is None
    assert validation_score({"status": "ok"}) is None


def _cfg(**kw):
    d = dict(name="lr", model="minilm", n_layers=1, tasks=["trec6"], methods=["lora", "pissa"], seeds=[1, 2, 3],
             ranks=[2], target_modules=["query", "value"], lr_grid=list(GRID),
             train={"max_steps": 6, "batch_size": 8, "max_length": 32, "logging_steps": 2},
             data={"max_train": 64, "max_test": 32, "max_validation": 32})
    d.update(kw)
    return ExperimentConfig(**d)


def test_the_grid_is_the_first_seed_at_every_rate_and_the_rate_is_in_the_run_id_and_its_hash():
    cfg = _cfg()
    runs = expand_runs(cfg)
    assert sorted((r.method, r.seed, r.lr) for r in runs) == sorted(
        (m, 1, lr) for m in ("lora", "pissa") for lr in GRID)
    assert "trec6__lora__r2__s1__lr0.001" in {r.run_id for r in runs}
    config = {"model": "minilm", "tasks": ["trec6"], "train": {"max_steps": 6}}
    a = RunSpec("trec6", "lora", 2, 1, (), 1e-3)
    b = RunSpec("trec6", "lora", 2, 1, (), 1e-2)
    assert run_settings_hash(config, a) != run_settings_hash(config, b)


@pytest.mark.parametrize("kw, needle", [
    (dict(data={"max_train": 64}), "data.max_validation: lr_grid chooses"),
    (dict(train={"learning_rate": 1e-3}), r"train.learning_rate: each method chooses its own from lr_grid"),
    (dict(lr_grid=[1e-3, 1e-3]), "lr_grid: needs at least two distinct learning rates"),
    (dict(lr_grid=[1e-3]), "lr_grid: needs at least two distinct learning rates"),
    (dict(lr_grid=[1e-3, -1.0]), r"lr_grid\[1\]: must be > 0"),
    (dict(lr_grid="1e-3"), "lr_grid: must be a list of learning rates"),
])
def test_bad_grids_are_refused_by_name(kw, needle):
    with pytest.raises(ValueError, match=needle):
        _cfg(**kw)


def test_the_validation_split_comes_out_of_the_training_data_and_never_overlaps_it():
    task = load_task("trec6", seed=0, max_train=500, max_validation=100)
    assert len(task.validation) == 100 and len(task.train) == 500
    key = lambda row: row["text"]  # noqa: E731
    assert not {key(r) for r in task.validation} & {key(r) for r in task.train}
    assert not {key(r) for r in task.validation} & {key(r) for r in task.test}
    again = load_task("trec6", seed=0, max_train=500, max_validation=100)
    assert again.validation == task.validation and again.train == task.train
    assert load_task("trec6", seed=0, max_train=500).validation == []
    with pytest.raises(ValueError, match="max_validation=.* would take over half"):
        load_task("trec6", seed=0, max_validation=10**6)
    with pytest.raises(ValueError, match="max_validation: must be >= 1, got 0"):
        load_task("trec6", seed=0, max_validation=0)


@pytest.mark.slow
def test_a_real_sweep_chooses_on_validation_then_repeats_the_other_seeds_at_the_choice(tmp_path):
    cfg = _cfg(lr_grid=[1e-3, 1e-2], seeds=[1, 2])
    counts = run_sweep(cfg, tmp_path, progress=False)
    # 2 methods x 2 rates for the first seed, then 2 methods x 1 other seed at the chosen rate.
    assert counts["ok"] == 2 * 2 + 2 * 1 and counts["undecided"] == 0
    runs = load_results(tmp_path)
    kept, choices = at_chosen_lr(runs)
    assert len(kept) == 2 * 2
    for run in runs:
        assert run["validation_metrics"]["trec6"]["n"] == 32  # scored on the validation split, not the test set
        assert run["metrics"]["trec6"]["n"] == 32
    for cell, choice in choices.items():
        grid_runs = [r for r in runs if r["method"] == cell[2] and r["seed"] == 1]
        best = max(validation_score(r)[0] for r in grid_runs)
        assert choice.curve[choice.learning_rate] == best
        repeats = [r for r in runs if r["method"] == cell[2] and r["seed"] != 1]
        assert {r["learning_rate"] for r in repeats} == {choice.learning_rate}
        assert all(r["lr_choice"]["learning_rate"] == choice.learning_rate for r in repeats)
    # Served parameters: PiSSA is saved as plain LoRA of rank 2r (its LoRA part doubles), LoRA as trained.
    lora = next(r for r in runs if r["method"] == "lora")
    pissa = next(r for r in runs if r["method"] == "pissa")
    assert lora["served_params"] == lora["trainable_params"]
    assert pissa["served_params"] - pissa["trainable_params"] == lora["trainable_params"] - _head_params(lora)
    # Resuming finds nothing to do; the report shows the choices and the tables at the chosen rates.
    assert not plan_sweep(cfg, tmp_path).todo
    md, _ = build_report(tmp_path)
    assert "### Learning rates (each method's own, chosen on validation data)" in md
    assert "parameters as served" in md


def _head_params(run) -> int:
    """The classifier head's parameters (modules_to_save): the part of a LoRA run that is not LoRA A/B."""
    lora = sum(r * (din + dout) for r, din, dout in [(2, 384, 384)] * 2)  # query and value of one layer at r = 2
    return run["trainable_params"] - lora


def _rule_table(tmp_path, monkeypatch, constant):
    import json

    import fimlora.config as config

    path = tmp_path / "lr_rule.json"
    entry = {"constant": constant, "fitted_on": "test", "script": "test"}
    families = {"encoder": entry, "causal_lm": dict(entry)}
    path.write_text(json.dumps({"rules": {"hessian": families, "range": json.loads(json.dumps(families))},
                                "default_rule": "hessian"}))
    monkeypatch.setattr(config, "LR_RULE_FILE", path)
    # The table is cached for the process; the uncached reader sees this test's file (and the cache stays clean).
    monkeypatch.setattr(config, "lr_rule_table", getattr(config.lr_rule_table, "__wrapped__", config.lr_rule_table))


def test_lr_rule_needs_a_fitted_constant_and_excludes_a_grid_or_a_fixed_rate(tmp_path, monkeypatch):
    _rule_table(tmp_path, monkeypatch, None)
    with pytest.raises(ValueError, match="lr_rule: 'hessian' has no fitted constant"):
        _cfg(lr_grid=[], data={"max_train": 64}, lr_rule="hessian")
    _rule_table(tmp_path, monkeypatch, 0.01)
    # The constant of the config's model family is the one needed: a causal LM's missing one is refused by name.
    import json as _json

    import fimlora.config as fconfig

    table = _json.loads(fconfig.LR_RULE_FILE.read_text())
    table["rules"]["hessian"]["causal_lm"]["constant"] = None
    fconfig.LR_RULE_FILE.write_text(_json.dumps(table))
    _cfg(lr_grid=[], data={"max_train": 64}, lr_rule="hessian")  # minilm: the encoder constant is there
    with pytest.raises(ValueError, match="lr_rule: 'hessian' has no fitted constant for causal_lm models .* "
                                         "model 'smollm2'"):
        _cfg(model="smollm2", lr_grid=[], data={"max_train": 64}, lr_rule="hessian")
    _rule_table(tmp_path, monkeypatch, 0.01)
    with pytest.raises(ValueError, match="lr_rule: a run's learning rate comes from the rule 'hessian' or from"):
        _cfg(lr_rule="hessian")
    with pytest.raises(ValueError, match="train.learning_rate: each run trains at lr_rule 'hessian'"):
        _cfg(lr_grid=[], lr_rule="hessian", train={"learning_rate": 1e-3})
    with pytest.raises(ValueError, match="lr_rule: must be one of"):
        _cfg(lr_grid=[], lr_rule="magic")
    # The constant is part of what a run trained at the rule stands for: a refit makes its results stale.
    config = {"model": "minilm", "tasks": ["trec6"], "train": {"max_steps": 6}, "lr_rule": "hessian"}
    run = RunSpec("trec6", "lora", 2, 1)
    before = run_settings_hash(config, run)
    _rule_table(tmp_path, monkeypatch, 0.02)
    assert run_settings_hash(config, run) != before
    assert run_settings_hash({**config, "lr_rule": None}, run) == run_settings_hash(
        {k: v for k, v in config.items() if k != "lr_rule"}, run)
    # Only the constant of the model's own family: a causal-LM refit leaves MiniLM's runs current, not SmolLM2's.
    import json

    import fimlora.config as fconfig

    decoder = {**config, "model": "smollm2"}
    encoder_hash, decoder_hash = run_settings_hash(config, run), run_settings_hash(decoder, run)
    table = json.loads(fconfig.LR_RULE_FILE.read_text())
    table["rules"]["hessian"]["causal_lm"]["constant"] = 0.3
    fconfig.LR_RULE_FILE.write_text(json.dumps(table))
    assert run_settings_hash(config, run) == encoder_hash and run_settings_hash(decoder, run) != decoder_hash
