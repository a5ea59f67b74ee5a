"""The method registry: one record per method, read by config validation, the settings hash, the sweep and the
report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from fimlora.bench import registry
from fimlora.bench.config import ExperimentConfig
from fimlora.bench.registry import (
    MethodInfo,
    Setting,
    SettingsBlock,
    check_block,
    method_info,
    method_names,
    register_method,
    settings_block,
    settings_blocks,
)

ROOT = Path(__file__).resolve().parents[2]


def test_the_report_tables_read_off_the_registry_are_the_ones_the_report_always_had():
    from fimlora.bench import report, tables

    assert tables.METHOD_ORDER == ["lora", "rslora", "adalora", "eva", "pissa", "lora_ga", "gora", "random", "fim",
                                   "fim_eva", "fim_rslora", "fim_pissa", "fim_lora_ga", "fim_gora"]
    assert report.COMPOSITE_PARENTS == {"fim_eva": ("fim", "eva"), "fim_rslora": ("fim", "rslora"),
                                        "fim_pissa": ("fim", "pissa"), "fim_lora_ga": ("fim", "lora_ga"),
                                        "fim_gora": ("fim", "gora")}
    assert tables.BASELINES == ("lora", "random", "eva", "adalora", "rslora", "pissa", "lora_ga", "gora")
    assert tables.METHOD_LABEL["fim_eva"] == "FIM ranks + EVA directions" and tables.METHOD_LABEL["random"] == (
        "Random-rank")


def test_every_method_prepares_with_a_function_of_the_harness():
    from fimlora.bench.methods import METHODS

    assert METHODS == method_names()
    for name in method_names():
        assert callable(method_info(name).prepare_function()), name


def test_every_settings_block_is_a_config_field_whose_default_is_the_blocks():
    config_fields = {f.name: f for f in fields(ExperimentConfig)}
    for block in settings_blocks():
        assert block.name in config_fields
        assert config_fields[block.name].default_factory() == dict(block.config_default)
        for key, setting in block.settings.items():
            if setting.default is not None:  # each declared default passes its own validator
                setting.check(f"{block.name}.{key}", setting.default)


def test_defaults_are_written_once():
    from fimlora.bench import gora, methods
    from fimlora.config import FimConfig

    assert registry.CALIBRATION_BATCHES == FimConfig().n_batches == gora.DEFAULT_N_BATCHES == methods.LORA_GA_BATCHES
    assert (gora.DEFAULT_MIN_RANK_RATIO, gora.DEFAULT_MAX_RANK_RATIO, gora.DEFAULT_LR, gora.DEFAULT_SIGN) == tuple(
        settings_block("gora").settings[k].default for k in ("min_rank_ratio", "max_rank_ratio", "lr", "sign"))
    assert methods.MethodSpec.__dataclass_fields__["eva_rho"].default == settings_block("eva").settings["rho"].default


def test_a_method_or_block_is_registered_once_and_its_blocks_and_parents_must_exist():
    with pytest.raises(ValueError, match="method: 'lora' is registered already"):
        register_method(MethodInfo("lora", "LoRA", "methods:_prepare_lora"))
    with pytest.raises(ValueError, match=r"x.blocks: must be 'fim' or registered blocks .*, got \['nope'\]"):
        register_method(MethodInfo("x", "X", "methods:_prepare_lora", ("nope",)))
    with pytest.raises(ValueError, match=r"x.parents: must be registered methods, got \['nope'\]"):
        register_method(MethodInfo("x", "X", "methods:_prepare_lora", parents=("fim", "nope")))
    with pytest.raises(ValueError, match=r"method: must be one of \['lora', .*\], got 'x'"):
        method_info("x")
    assert "x" not in method_names()


def test_one_validator_checks_every_block_and_its_cross_rule():
    block = SettingsBlock("demo", {"k": Setting(registry.fraction, 0.5)})
    with pytest.raises(ValueError, match=r"demo: unknown setting\(s\) \['kk'\]; known: \['k'\]"):
        block.validate({"kk": 1})
    with pytest.raises(ValueError, match=r"demo.k: must be < 1, got 1"):
        block.validate({"k": 1})
    with pytest.raises(ValueError, match=r"demo: must be a mapping of settings, got 3"):
        check_block("demo", 3, block.settings)
    assert block.value({}, "k") == 0.5 and block.value({"k": 0.25}, "k") == 0.25


def test_validating_a_config_loads_no_method_code():
    code = ("import json, sys\nfrom fimlora.bench.config import load_config\n"
            "load_config('configs/frontier_encoder.yaml')\n"
            "print(json.dumps([m for m in sys.modules if m in ('fimlora.bench.methods', "
            "'fimlora.bench.gora', 'fimlora.app.builders')]))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
