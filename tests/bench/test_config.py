"""Experiment configs: every block rejects unknown keys and wrong types before any run starts."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from fimlora.bench.config import ExperimentConfig, RunSpec, expand_runs, load_config, run_settings_hash, task_id

BASE = "name: x\nmodel: minilm\nmethods: [lora, fim, eva]\nseeds: [1]\nranks: [2]\ntasks: [sst2]\n"


def cfg(**kw):
    d = dict(name="t", model="minilm", tasks=["sst2"], methods=["lora", "fim", "eva", "adalora"], seeds=[1],
             ranks=[2])
    d.update(kw)
    return ExperimentConfig(**d)


@pytest.mark.parametrize("kw, needle", [
    (dict(eva={"roh": 9}), r"eva: unknown setting\(s\) \['roh'\]; known: \['rho'\]"),
    (dict(eva={"rho": "big"}), r"eva.rho: must be a finite number, got 'big'"),
    (dict(adalora={"deltaT": 0}), r"adalora.deltaT: must be >= 1, got 0"),
    (dict(adalora={"tinit": 3}), r"adalora: unknown setting\(s\) \['tinit'\]"),
    (dict(keep_adapters="no"), r"keep_adapters: must be true or false, got 'no'"),
    (dict(pissa={"n_iter": 4}), r"pissa: unknown setting\(s\) \['n_iter'\]; known: \['niter'\]"),
    (dict(pissa={"niter": 0}), r"pissa.niter: must be >= 1, got 0"),
    (dict(lora_ga={"direction": "BA"}),
     r"lora_ga.direction: must be one of \['ArBr', 'A2rBr', 'ArB2r', 'random'\], got 'BA'"),
    (dict(lora_ga={"gamma": 16}), r"lora_ga: unknown setting\(s\) \['gamma'\]"),
    (dict(gora={"max_rank": 32}),
     r"gora: unknown setting\(s\) \['max_rank'\]; known: \['lr', 'lr_search', 'max_rank_ratio', "),
    (dict(gora={"min_rank_ratio": 2}), r"gora.min_rank_ratio: must be <= 1 \(rank r must stay allowed\), got 2"),
    (dict(gora={"max_rank_ratio": 0.5}), r"gora.max_rank_ratio: must be >= 1 \(rank r must stay allowed\), got 0.5"),
    (dict(gora={"lr": -1}), r"gora.lr: must be > 0, got -1"),
    (dict(fim={"r_min": "2"}), r"fim: r_min: must be an integer, got '2'"),
    (dict(fim_grid={"n_batches": [1, 0]}), r"fim variant \{'n_batches': 0\}: n_batches: must be >= 1, got 0"),
    (dict(fim_variants=[{}, {"r_min": -1}]), r"fim variant \{'r_min': -1\}: r_min: must be >= 0, got -1"),
    (dict(fim_variants=[{"budget_frac": 0.5}]), r"fim_variants\[0\]: unknown setting\(s\) \['budget_frac'\]"),
    (dict(fim_variants={"r_min": 0}), r"fim_variants: must be a list of mappings"),
    (dict(fim={"seed": 3}), r"fim.seed: each run's FIM seed is the run's seed \(the config's seeds list\), got 3"),
    (dict(fim_variants=[{}], fim_grid={"r_min": [1]}), r"fim_grid, fim_variants: give at most one"),
    (dict(data={"max_trian": 5}), r"data: unknown setting\(s\) \['max_trian'\]"),
    (dict(data={"test_fraction": 1.5}), r"data.test_fraction: must be < 1, got 1.5"),
    (dict(train={"learning_rate": "fast"}), r"train.learning_rate: must be a finite number, got 'fast'"),
    (dict(train={"max_steps": 2.5}), r"train.max_steps: must be an integer, got 2.5"),
    (dict(train={"progress": "yes"}), r"train.progress: must be true or false, got 'yes'"),
    (dict(lora_dropout=1.0), r"lora_dropout: must be < 1, got 1.0"),
    (dict(n_layers=0), r"n_layers: must be >= 1, got 0"),
    (dict(seeds=[True]), r"seeds\[0\]: must be an integer, got True"),
    (dict(tasks=[{"train": "a.jsonl", "tst": "b.jsonl"}]), r"tasks\[0\]: unknown setting\(s\) \['tst'\]"),
])
def test_every_block_rejects_typos_and_wrong_types(kw, needle):
    with pytest.raises(ValueError, match=needle):
        cfg(**kw)


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_exponent_without_dot_is_a_number(tmp_path):
    # PyYAML reads 2e-3 as the string "2e-3" (YAML 1.1 wants 2.0e-3); configs mean the number.
    c = load_config(write(tmp_path, BASE + "train: {learning_rate: 2e-3, weight_decay: 1E-2}\n"))
    assert c.train == {"learning_rate": 0.002, "weight_decay": 0.01}
    assert isinstance(c.train["learning_rate"], float)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    p = write(tmp_path, BASE + "train: {learning_rate: 0.1\nfim: {}\n")
    with pytest.raises(ValueError, match=rf"config: {p}: line \d+, column \d+: not valid YAML"):
        load_config(p)


def test_typo_inside_train_names_block_and_key(tmp_path):
    p = write(tmp_path, BASE + "train: {learnig_rate: 0.1}\n")
    with pytest.raises(ValueError, match=rf"config: {p}: train: unknown setting\(s\) \['learnig_rate'\]"):
        load_config(p)


def test_missing_and_non_mapping_configs(tmp_path):
    with pytest.raises(ValueError, match=r"missing key\(s\) \['ranks'\]"):
        load_config(write(tmp_path, "model: minilm\nmethods: [lora]\nseeds: [1]\ntasks: [sst2]\n"))
    with pytest.raises(ValueError, match="must hold a YAML mapping, got list"):
        load_config(write(tmp_path, "- a\n- b\n", "l.yaml"))
    with pytest.raises(FileNotFoundError, match="does not exist or is not a file"):
        load_config(tmp_path)


def test_task_ids_are_safe_file_names(tmp_path):
    inside = tmp_path / "data" / "reviews.jsonl"
    other = tmp_path / "other" / "reviews.jsonl"
    assert task_id("sst2") == "sst2"
    assert task_id("hf:glue:sst2") == "hf-glue-sst2"
    a, b = task_id(str(inside)), task_id(str(other))
    assert a.startswith("reviews-") and b.startswith("reviews-") and a != b
    assert task_id(str(tmp_path / "x" / ".." / "data" / "reviews.jsonl")) == a  # resolved before hashing
    assert "/" not in task_id("../../etc/passwd.csv") and ".." not in task_id("../../etc/passwd.csv")
    assert task_id({"train": str(inside)}) == a  # a train file alone is that file
    pair = task_id({"train": str(inside), "test": str(other)})  # another task: hashed whole (issue 20, 1)
    assert pair.startswith("reviews-") and pair != a and "/" not in pair


def test_settings_hash_tracks_what_a_run_depends_on():
    base = cfg(train={"max_steps": 10})
    run = next(r for r in expand_runs(base) if r.method == "lora")
    eva_run = next(r for r in expand_runs(base) if r.method == "eva")
    h = run_settings_hash(asdict(base), run)
    assert run_settings_hash(asdict(cfg(train={"max_steps": 10}, notes="x", seeds=[1, 2])), run) == h
    assert run_settings_hash(asdict(cfg(train={"max_steps": 20})), run) != h
    # a block only some methods use changes only their runs
    changed_eva = asdict(cfg(train={"max_steps": 10}, eva={"rho": 1.0}))
    assert run_settings_hash(changed_eva, run) == h
    assert run_settings_hash(changed_eva, eva_run) != run_settings_hash(asdict(base), eva_run)
    # a result recorded before a field existed compares equal when the field has its default
    old = {k: v for k, v in asdict(base).items() if k != "fim_grid"}
    assert run_settings_hash(old, run) == h
    assert run_settings_hash(asdict(base), RunSpec("sst2", "lora", 2, 2)) != h


def test_gora_sign_is_written_into_the_config_and_a_result_without_it_is_the_old_ascent_init():
    """Before ``gora.sign`` existed every GoRA result was made with the code's +G; now the default is the paper's
    descent, written into the config, so those results are stale and explicit ``ascent`` ones match them."""
    new = cfg(methods=["gora", "lora"], gora={"n_batches": 2})
    assert new.gora == {"n_batches": 2, "sign": "descent"}
    assert cfg(methods=["lora"]).gora == {}  # no GoRA run, nothing written
    run = next(r for r in expand_runs(new) if r.method == "gora")
    recorded = {**asdict(new), "gora": {"n_batches": 2}}  # a result from before the setting
    ascent = asdict(cfg(methods=["gora", "lora"], gora={"n_batches": 2, "sign": "ascent"}))
    assert run_settings_hash(recorded, run) == run_settings_hash(ascent, run) != run_settings_hash(asdict(new), run)
    lora_run = next(r for r in expand_runs(new) if r.method == "lora")
    assert run_settings_hash(recorded, lora_run) == run_settings_hash(asdict(new), lora_run)
    with pytest.raises(ValueError, match=r"gora.sign: must be one of \['descent', 'ascent'\], got 'up'"):
        cfg(methods=["gora"], gora={"sign": "up"})


def write_rows(path, labels):
    path.write_text("".join(f'{{"text": "t{i}", "label": {y}}}\n' for i, y in enumerate(labels)))
    return str(path)


def test_task_entries_sharing_a_train_file_get_their_own_run_ids(tmp_path):
    """Issue 20, 1: entries that differ only in test file or task_type are distinct tasks, each with its runs."""
    train = write_rows(tmp_path / "train.jsonl", [0, 1] * 4)
    test_a, test_b = write_rows(tmp_path / "a.jsonl", [0, 1]), write_rows(tmp_path / "b.jsonl", [1, 0])
    entries = [{"train": train, "test": test_a}, {"train": train, "test": test_b},
               {"train": train, "task_type": "regression"}, train]
    c = cfg(tasks=entries, methods=["lora"])
    labels = c.task_labels
    assert len(set(labels)) == 4, labels
    assert [c.task_entry(label) for label in labels] == entries
    assert len({r.run_id for r in expand_runs(c)}) == 4
    # Ordinary entries keep the ids their results were recorded under: a file alone, or {train: FILE} alone.
    assert labels[3] == task_id(train) == task_id({"train": train})
    # The same task twice would run once and be reported once: refused, naming both entries.
    with pytest.raises(ValueError, match=r"tasks\[1\]: the same task as tasks\[0\]"):
        cfg(tasks=[train, {"train": train}])
    with pytest.raises(ValueError, match=r"tasks\[1\]: the same task as tasks\[0\]"):
        cfg(tasks=[{"train": train, "test": test_a}, {"train": str(tmp_path / "." / "train.jsonl"), "test": test_a}])


def test_display_settings_stay_out_of_the_hash():
    """Issue 20, 3: progress bars do not change what a run computes, so they never make its result stale."""
    base = cfg(train={"max_steps": 10})
    for method in ("fim", "lora", "random", "fim_eva"):
        run = next(r for r in expand_runs(cfg(methods=[method])))
        h = run_settings_hash(asdict(base), run)
        assert run_settings_hash(asdict(cfg(train={"max_steps": 10}, fim={"progress": False})), run) == h
        assert run_settings_hash(asdict(cfg(train={"max_steps": 10, "progress": False})), run) == h
    # A display setting is no variant: a grid over it would run identical runs under two ids.
    with pytest.raises(ValueError, match=r"fim_grid.progress: a display setting, not a FIM variant"):
        cfg(fim_grid={"progress": [True, False]})


# The frontier suites: (config, runs it expands to, the command its first line names).
# The decoder suite leaves the fim_* composites (which half of a composite helps) to the encoder one.
FRONTIER_SUITES = [("configs/frontier_encoder.yaml", 2 * 13 * 4 * 3), ("configs/frontier_decoder.yaml", 10 * 4 * 3)]
PEERS = {"lora", "fim", "gora", "eva", "random", "pissa", "lora_ga", "rslora"}
COMPOSITES = {"fim_rslora", "fim_pissa", "fim_gora"}


@pytest.mark.parametrize(("path", "n_runs"), FRONTIER_SUITES)
def test_frontier_configs_load_validate_and_list_every_size(path, n_runs, tmp_path, capsys):
    from pathlib import Path

    from fimlora.cli import main

    root = Path(__file__).resolve().parents[2]
    config = root / path
    cfg = load_config(config)
    assert cfg.ranks == [1, 2, 4, 8] and cfg.seeds == [42, 1337, 2024] and cfg.fim["budget_unit"] == "params"
    assert PEERS <= set(cfg.methods)
    assert COMPOSITES <= set(cfg.methods) or "decoder" in path
    assert [v.get("budget_fraction") for v in cfg.fim_variants] == [None, 0.25, 0.5]
    assert len(expand_runs(cfg)) == n_runs
    first_line = config.read_text(encoding="utf-8").splitlines()[0]
    assert first_line == f"# fimlora run {path} --results results/{cfg.name}"
    assert main(["run", str(config), "--results", str(tmp_path / "results"), "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == n_runs and all(line.startswith("todo ") for line in listed)
