"""``fimlora calibrate --budget N | 0.5x``, ``--budget-params N`` and ``--max-lora-rank K``."""

from __future__ import annotations

import json

import pytest

from fimlora.app.jobs import CalibrateJob, parse_budget
from fimlora.cli import _job, build_parser, main

CALIBRATE = ("calibrate", "--model", "minilm", "--n-layers", "1", "--data", "trec6", "--max-train", "16")


def fim_config(tmp_path, *extra):
    args = build_parser().parse_args([*CALIBRATE, "--out", str(tmp_path / "o"), *extra])
    return _job(CalibrateJob, args).fim_config()


def test_defaults_unchanged(tmp_path):
    cfg = fim_config(tmp_path)
    assert (cfg.budget, cfg.budget_unit, cfg.budget_fraction, cfg.max_lora_rank) == (None, "rank", None, None)


def test_budget_forms(tmp_path):
    cfg = fim_config(tmp_path, "--budget", "12")
    assert (cfg.budget, cfg.budget_unit, cfg.budget_fraction) == (12, "rank", None)
    cfg = fim_config(tmp_path, "--budget", "0.5x")
    assert (cfg.budget, cfg.budget_unit, cfg.budget_fraction) == (None, "params", 0.5)
    cfg = fim_config(tmp_path, "--budget-params", "5000", "--max-lora-rank", "16")
    assert (cfg.budget, cfg.budget_unit, cfg.max_lora_rank) == (5000, "params", 16)


@pytest.mark.parametrize("value, needle", [
    ("half", "budget: must be a whole number of ranks (e.g. 56) or a fraction"),
    ("1.5x", "budget: must be in (0, 1], got 1.5"),
    ("0x", "budget: must be > 0, got 0.0"),
])
def test_bad_budgets(value, needle):
    with pytest.raises(ValueError) as e:
        parse_budget(value)
    assert needle in str(e.value)


def test_budget_and_budget_params_exclusive(capsys, tmp_path):
    code = main([*CALIBRATE, "--out", str(tmp_path / "o"), "--budget", "8", "--budget-params", "100"])
    err = capsys.readouterr().err
    assert code == 2 and "budget, budget_params: give at most one" in err
    assert not (tmp_path / "o").exists()


def test_max_lora_rank_must_be_a_vllm_value(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main([*CALIBRATE, "--out", str(tmp_path / "o"), "--max-lora-rank", "12"])
    assert "invalid choice: 12" in capsys.readouterr().err
    code = main([*CALIBRATE, "--out", str(tmp_path / "o"), "--max-lora-rank", "8", "--r-max", "9"])
    assert code == 2 and "r_max: must be <= max_lora_rank" in capsys.readouterr().err


def test_calibrate_half_the_parameters_capped_at_max_lora_rank(capsys, tmp_path):
    out = tmp_path / "o"
    code = main([*CALIBRATE, "--r", "4", "--n-batches", "1", "--batch-size", "4", "--max-length", "16",
                 "--no-progress", "--budget", "0.5x", "--max-lora-rank", "8", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0
    rank_map = json.loads((out / "rank_map.json").read_text())
    uniform = sum(4 * c for c in rank_map["costs"].values())
    assert rank_map["budget_unit"] == "params" and rank_map["budget"] == uniform // 2
    assert rank_map["params_spent"] <= uniform // 2 and rank_map["r_max"] == 8
    assert f"budget {rank_map['budget']:,} params" in stdout and f"spent {rank_map['params_spent']:,}" in stdout


def test_calibrate_r_min_zero_drops_modules_and_check_accepts(capsys, tmp_path):
    out = tmp_path / "o"
    code = main([*CALIBRATE, "--r", "4", "--n-batches", "1", "--batch-size", "4", "--max-length", "16",
                 "--no-progress", "--target-modules", "all-linear", "--budget", "0.5x", "--r-min", "0",
                 "--out", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0
    rank_map = json.loads((out / "rank_map.json").read_text())
    dropped = sorted(n for n, r in rank_map["ranks"].items() if r == 0)
    assert dropped, "test needs a half-size allocation that drops a module"
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(n for n, r in rank_map["ranks"].items() if r > 0)
    assert "dropped" in stdout
    assert main(["check", str(out / "adapter"), "--base-model", "minilm"]) == 0
    report = capsys.readouterr().out
    assert "OK" in report and f"modules: {len(rank_map['ranks']) - len(dropped)}" in report


def test_calibrate_n_batches_auto_reports_why_it_stopped(capsys, tmp_path):
    out = tmp_path / "o"
    code = main([*CALIBRATE, "--r", "4", "--n-batches", "auto", "--batch-size", "4", "--max-length", "16",
                 "--no-progress", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0
    rank_map = json.loads((out / "rank_map.json").read_text())
    used, reason = rank_map["settings"]["n_batches_used"], rank_map["settings"]["stop_reason"]
    assert 2 <= used <= 4 and f"n_batches auto: stopped after {used} batches; {reason}" in stdout
    assert rank_map["settings"]["n_batches"] == "auto" and rank_map["confidence"]["n_units"] == used
    assert "stable: " in stdout and "bootstrap resamples of the" in stdout
    assert rank_map["settings"]["auto_rule"] == "within_one" and "close to their rank" in reason


def test_calibrate_auto_rule_is_passed_on_and_checked(capsys, tmp_path):
    out = tmp_path / "o"
    code = main([*CALIBRATE, "--r", "4", "--n-batches", "auto", "--auto-rule", "exact", "--batch-size", "4",
                 "--max-length", "16", "--no-progress", "--out", str(out)])
    capsys.readouterr()
    assert code == 0
    settings = json.loads((out / "rank_map.json").read_text())["settings"]
    assert settings["auto_rule"] == "exact"
    assert "close to their rank" not in settings["stop_reason"]  # the exact rule decided, not the default
    with pytest.raises(SystemExit) as e:
        main([*CALIBRATE, "--n-batches", "auto", "--auto-rule", "roughly", "--out", str(tmp_path / "p")])
    assert e.value.code == 2 and "--auto-rule: invalid choice: 'roughly'" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_auto_rule_without_auto_is_one_line_error(capsys, tmp_path):
    """Issue 28 (14b): --auto-rule without --n-batches auto was silently ignored."""
    code = main([*CALIBRATE, "--out", str(tmp_path / "o"), "--auto-rule", "exact"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "auto_rule: only n_batches='auto' uses it, got auto_rule='exact' with n_batches=8" in err
    assert not (tmp_path / "o").exists()


def test_n_batches_must_be_a_number_or_auto(capsys, tmp_path):
    code = main([*CALIBRATE, "--out", str(tmp_path / "o"), "--n-batches", "lots"])
    assert code == 2 and "n_batches: must be a positive integer or 'auto', got 'lots'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
