"""The axolotl plugin's pure parts, without axolotl: settings -> FimConfig errors, the resume decision, axolotl's
pattern rules (positive integers; a rank-0 module left out of the targets), the fused-kernel guard."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from fimlora import FimConfig, apply_allocation, lora_modules
from fimlora.api import allocation_from_scores
from fimlora.integrations.axolotl_rules import (
    RANK_MAP,
    axolotl_lora_settings,
    check_no_lora_kernels,
    default_kernels_off,
    fim_settings,
    fragment_yaml,
    plan_run,
)
from tests.references import lora_llama, tiny_llama

BAD = [{"r_min": -1}, {"budget_unit": "flops"}, {"n_batches": 0}, {"budget": 10, "budget_fraction": 0.5},
       {"progress": "no"}, {"aggregation": "max", "bootstrap": 10}, {"lr_rule": "grid"}]


@pytest.mark.parametrize("settings", BAD, ids=lambda s: ",".join(s))
def test_settings_fail_with_fimconfigs_own_error_prefixed_with_the_block(settings):
    with pytest.raises(ValueError) as own:
        FimConfig(**settings)
    with pytest.raises(ValueError) as ours:
        fim_settings(settings)
    assert str(ours.value) == f"fimlora.{own.value}"


def test_settings_as_given_unknown_key_and_wrong_type():
    assert fim_settings(None) == {}
    given = {"n_batches": 8, "r_min": 1, "budget_unit": "params"}
    assert fim_settings(given) == given
    with pytest.raises(ValueError, match=r"fimlora.nbatches: unknown setting; known settings are \['n_batches'"):
        fim_settings({"nbatches": 8})
    with pytest.raises(ValueError, match="fimlora: must be a mapping of FimConfig settings, got list"):
        fim_settings([8])
    # The plugin's own key, checked like the rest and kept out of FimConfig.
    assert fim_settings({"use_learning_rate": True, "lr_rule": "range"}) == {"use_learning_rate": True,
                                                                              "lr_rule": "range"}
    with pytest.raises(ValueError, match="fimlora.use_learning_rate: must be true or false, got 'yes'"):
        fim_settings({"use_learning_rate": "yes"})


def test_fragment_writes_learning_rate_only_when_asked_and_fitted():
    import dataclasses

    _, alloc = dropping_allocation()
    rec = {"learning_rate": None, "rule": "hessian", "statistic": 12.5, "constant": None,
           "passes": {"forward": 2, "backward": 12}, "seconds": 0.5, "fitted_on": None, "details": {}}
    alloc = dataclasses.replace(alloc, lr=rec)
    for use in (False, True):  # not fitted: never written, the statistic is a comment
        s = axolotl_lora_settings(alloc, use)
        text = fragment_yaml(s, "rank_map.json", alloc)
        assert "learning_rate" not in s and "# learning rate: not fitted (rule 'hessian': lambda_max = 12.5" in text
    fitted = dataclasses.replace(alloc, lr={**rec, "learning_rate": 4e-4, "constant": 5e-3})
    assert "learning_rate" not in axolotl_lora_settings(fitted)
    s = axolotl_lora_settings(fitted, use_learning_rate=True)
    text = fragment_yaml(s, "rank_map.json", fitted)
    assert s["learning_rate"] == 4e-4 and "\nlearning_rate: 0.0004\n" in text and "# learning rate" not in text


@pytest.mark.skipif(importlib.util.find_spec("pydantic") is None, reason="pydantic (axolotl's schema) not installed")
def test_schema_model_reports_fimconfig_error_through_pydantic():
    from pydantic import ValidationError

    from fimlora.integrations.axolotl_args import FimLoraArgs

    assert FimLoraArgs().fimlora is None
    assert FimLoraArgs(fimlora={"n_batches": "auto"}).fimlora == {"n_batches": "auto"}
    with pytest.raises(ValidationError, match="fimlora.r_min: must be >= 0, got -1"):
        FimLoraArgs(fimlora={"r_min": -1})


@pytest.mark.skipif(importlib.util.find_spec("axolotl") is not None, reason="axolotl is installed")
def test_plugin_without_axolotl_names_the_extra_to_install():
    """Issue 28 (14e): it was a bare ModuleNotFoundError for axolotl.integrations."""
    import importlib
    import sys

    from fimlora.extras import MissingExtraError

    sys.modules.pop("fimlora.integrations.axolotl", None)
    with pytest.raises(MissingExtraError, match=r"fimlora.integrations.axolotl \(the plugin\) needs the 'axolotl' "
                                                r"package, which is not installed; install it with: "
                                                r"pip install 'fimlora\[axolotl\]'"):
        importlib.import_module("fimlora.integrations.axolotl")


def test_plan_calibrates_a_fresh_run_and_keeps_an_adapter_loaded_from_disk(tmp_path):
    assert plan_run(tmp_path).action == "calibrate"
    (tmp_path / "checkpoint-3").mkdir()  # a checkpoint without auto-resume: axolotl starts afresh
    assert plan_run(tmp_path, auto_resume=False).action == "calibrate"
    (tmp_path / RANK_MAP).write_text("{}")
    assert plan_run(tmp_path, lora_model_dir=tmp_path / "adapter").action == "keep"


def test_plan_reuses_the_rank_map_of_output_dir(tmp_path):
    (tmp_path / RANK_MAP).write_text("{}")
    plan = plan_run(tmp_path)
    assert (plan.action, plan.rank_map) == ("load", tmp_path / RANK_MAP)


def test_plan_on_resume_prefers_the_checkpoints_rank_map_then_output_dirs(tmp_path):
    for n in (2, 10):  # numeric order, as axolotl's: checkpoint-10 is the last
        (tmp_path / f"checkpoint-{n}").mkdir()
    (tmp_path / RANK_MAP).write_text("{}")
    assert plan_run(tmp_path, auto_resume=True).rank_map == tmp_path / RANK_MAP
    (tmp_path / "checkpoint-10" / RANK_MAP).write_text("{}")
    assert plan_run(tmp_path, auto_resume=True).rank_map == tmp_path / "checkpoint-10" / RANK_MAP
    explicit = plan_run(tmp_path, resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert (explicit.action, explicit.rank_map) == ("load", tmp_path / RANK_MAP)


def checkpoints_with_their_own_maps(out):
    for n in (10, 20):
        (out / f"checkpoint-{n}").mkdir()
        (out / f"checkpoint-{n}" / RANK_MAP).write_text(f'{{"checkpoint": {n}}}')


def test_plan_resume_true_is_the_newest_checkpoint(tmp_path):
    """Issue 28 (14c): HF Trainer's and axolotl's resume_from_checkpoint=True ("the newest checkpoint-N in
    output_dir") raised TypeError."""
    with pytest.raises(ValueError, match=r"resume_from_checkpoint: True means the newest checkpoint-N in "
                                         r"output_dir=.*, but it has none"):
        plan_run(tmp_path, resume_from_checkpoint=True)
    checkpoints_with_their_own_maps(tmp_path)
    plan = plan_run(tmp_path, resume_from_checkpoint=True)
    assert (plan.action, plan.rank_map) == ("load", tmp_path / "checkpoint-20" / RANK_MAP)
    assert plan_run(tmp_path, resume_from_checkpoint=False).rank_map is None  # False: no resume, as None


def test_plan_explicit_checkpoint_wins_over_auto_resume(tmp_path):
    """Issue 28 (14d): with a named checkpoint and auto_resume both set, the newest checkpoint's rank map must not
    replace the named one's."""
    checkpoints_with_their_own_maps(tmp_path)
    plan = plan_run(tmp_path, resume_from_checkpoint=str(tmp_path / "checkpoint-10"), auto_resume=True)
    assert (plan.action, plan.rank_map) == ("load", tmp_path / "checkpoint-10" / RANK_MAP)
    assert plan.rank_map.read_text() == '{"checkpoint": 10}'


def test_plan_refuses_to_resume_without_a_rank_map(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(ValueError, match=r"resume_from_checkpoint: resuming from .*checkpoint-2 needs the rank map"):
        plan_run(tmp_path, auto_resume=True)


def dropping_allocation():
    model = lora_llama()
    scores = {i.name: 1e-9 if ".layers.0.mlp." in i.name else 1.0 + len(i.name) for i in lora_modules(model)}
    return model, allocation_from_scores(model, scores, budget_unit="params", budget_fraction=0.5, r_min=0)


def test_axolotl_settings_leave_rank_zero_modules_out_and_build_the_same_adapter():
    model, alloc = dropping_allocation()
    dropped = [n for n, r in alloc.ranks.items() if r == 0]
    assert dropped and all(".layers.0.mlp." in n for n in dropped)
    s = axolotl_lora_settings(alloc)
    # axolotl's schema: positive integers only, so the dropped modules appear nowhere.
    for field in ("lora_rank_pattern", "lora_alpha_pattern"):
        assert all(type(v) is int and v > 0 for v in s[field].values()), field
        assert not any(d in key for key in s[field] for d in dropped)
    assert s["lora_target_linear"] is False
    assert not any(d in s["lora_target_modules"] for d in dropped)
    # What axolotl builds from these keys (it forwards them to LoraConfig as they are) is the resized adapter.
    torch.manual_seed(0)
    built = get_peft_model(tiny_llama(), LoraConfig(
        r=s["lora_r"], lora_alpha=s["lora_alpha"], target_modules=s["lora_target_modules"],
        rank_pattern=s["lora_rank_pattern"], alpha_pattern=s["lora_alpha_pattern"], task_type="CAUSAL_LM"))
    apply_allocation(model, alloc)
    want = {i.name: (i.r, i.alpha) for i in lora_modules(model)}
    assert {i.name: (i.r, i.alpha) for i in lora_modules(built)} == want
    assert sum(isinstance(m, LoraLayer) for m in built.modules()) == len(alloc.ranks) - len(dropped)
    assert "lora_rank_pattern:" in fragment_yaml(s, "rank_map.json")


def test_axolotl_settings_keep_users_targets_when_nothing_is_dropped():
    model = lora_llama()
    scores = {i.name: 1.0 + len(i.name) for i in lora_modules(model)}
    s = axolotl_lora_settings(allocation_from_scores(model, scores))
    assert "lora_target_modules" not in s and "lora_target_linear" not in s
    assert (s["lora_r"], s["lora_alpha"]) == (4, 8)


def test_axolotl_settings_refuse_an_alpha_axolotl_cannot_write():
    model = lora_llama(r=4, lora_alpha=6)  # preserve: alpha_m = 1.5 r_m, not whole for odd r_m
    scores = {i.name: float(k + 1) for k, i in enumerate(lora_modules(model))}
    alloc = allocation_from_scores(model, scores)
    assert any(float(a) != int(a) for a in alloc.alphas.values())
    with pytest.raises(ValueError, match=r"lora_alpha_pattern: axolotl takes positive integers only; module "):
        axolotl_lora_settings(alloc)


def test_fused_kernels_default_off_and_explicit_true_is_refused():
    cfg = {"lora_qkv_kernel": True, "lora_mlp_kernel": None}
    assert default_kernels_off(cfg) == ["lora_mlp_kernel", "lora_o_kernel", "lora_embedding_kernel"]
    assert cfg["lora_mlp_kernel"] is False and cfg["lora_qkv_kernel"] is True
    with pytest.raises(ValueError, match="lora_qkv_kernel: must be false to calibrate with fimlora"):
        check_no_lora_kernels(cfg)
    cfg["lora_qkv_kernel"] = False
    check_no_lora_kernels(cfg)


def test_docs_axolotl_config_names_the_plugin_and_valid_settings():
    import re
    from pathlib import Path

    import yaml

    from fimlora.integrations.axolotl_rules import PLUGIN

    page = (Path(__file__).resolve().parents[2] / "docs" / "axolotl.md").read_text(encoding="utf-8")
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", page, flags=re.S) if "plugins:" in b]
    assert blocks and all(b["plugins"] == [PLUGIN] for b in blocks)
    for block in blocks:
        fim_settings(block["fimlora"])
