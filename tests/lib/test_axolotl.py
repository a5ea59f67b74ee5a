"""The axolotl plugin with real axolotl (0.19, its own venv: scripts/test_axolotl.sh), on the CPU.

Each run is ``python -m axolotl.cli.train CONFIG`` (axolotl's own entry point; one test runs ``axolotl train``)
on a tiny seeded LLaMA with a word-level tokenizer and a JSONL completion data set written here. Skipped when
axolotl is not importable.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("axolotl", reason="axolotl is not installed: run scripts/test_axolotl.sh (own venv from "
                                      "requirements-axolotl.txt)")

from peft import PeftModel, get_peft_model, get_peft_model_state_dict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import fimlora  # noqa: E402
from fimlora.integrations.axolotl_rules import FRAGMENT  # noqa: E402
from tests.references import save_tiny_llama  # noqa: E402

pytestmark = pytest.mark.axolotl
ROOT = Path(__file__).resolve().parents[2]
WORDS = "the a cat dog sat ran on under mat log red blue big small and then saw it was".split()
SETTINGS = {"n_batches": 2, "r_min": 1, "budget_unit": "params"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny LLaMA (vocab 64) with a word-level tokenizer over WORDS, and 32 lines of text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("axolotl")
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<pad>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    save_tiny_llama(root / "model")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(root / "model")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) for _ in range(32)]
    (root / "data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return root


def write_config(assets, out, name, probe=False, **over):
    cfg = {
        "base_model": str(assets / "model"), "model_type": "LlamaForCausalLM",
        "tokenizer_type": "PreTrainedTokenizerFast",
        "datasets": [{"path": str(assets / "data.jsonl"), "ds_type": "json", "type": "completion"}],
        "dataset_prepared_path": str(assets / "prepared"), "val_set_size": 0, "output_dir": str(out),
        "adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
        "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "sequence_len": 32, "sample_packing": False, "micro_batch_size": 2, "gradient_accumulation_steps": 1,
        "max_steps": 4, "num_epochs": 1, "learning_rate": 1e-3, "optimizer": "adamw_torch",
        "lr_scheduler": "constant", "bf16": False, "fp16": False, "tf32": False, "seed": 0, "save_steps": 2,
        "logging_steps": 1,
        "plugins": (["tests.lib.axolotl_probe.ProbePlugin"] if probe else [])
        + ["fimlora.integrations.axolotl.FimLoraPlugin"],
        "fimlora": dict(SETTINGS),
    }
    cfg.update(over)
    path = assets / f"{name}.json"  # YAML is a superset of JSON: axolotl's yaml.safe_load reads it
    path.write_text(json.dumps(cfg, indent=1))
    return path


def axolotl(*args, probe_batches=0):
    # LOG_LEVEL=INFO: axolotl shows other packages' log records (fimlora's) at WARNING and above only by default.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1",
           "LOG_LEVEL": "INFO", "OMP_NUM_THREADS": "1", "FIMLORA_PROBE_BATCHES": str(probe_batches),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def base(assets):
    return AutoModelForCausalLM.from_pretrained(assets / "model").eval()


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "sample_packing"])
def test_axolotl_run_equals_apply_fim_ranks_on_its_batches_and_reloads_with_stock_peft(assets, packing):
    out = assets / f"out_exact_{packing}"
    # learning_rate 0: the saved adapter is the resized one as training started (AdamW moves nothing).
    cfg = write_config(assets, out, f"exact_{packing}", probe=True, learning_rate=0.0, sample_packing=packing,
                       pad_to_sequence_len=packing)
    log = axolotl("axolotl.cli.train", cfg, probe_batches=SETTINGS["n_batches"])
    assert "fimlora calibration" in log and "fimlora: calibrate (no checkpoint and no rank map" in log
    for name in ("rank_map.json", "rank_map.png", FRAGMENT, "adapter_config.json", "adapter_model.safetensors"):
        assert (out / name).is_file(), name
    probe = torch.load(out / "probe.pt", weights_only=False)
    ref, batches = get_peft_model(base(assets), probe["config"]), probe["batches"]
    # Packed rows carry position_ids that restart at each example: the batches are axolotl's, not ours.
    assert ("position_ids" in batches[0]) == packing
    ref.load_state_dict(probe["state"])  # strict: the same modules, and axolotl's initial A
    ref_alloc = fimlora.apply_fim_ranks(ref, batches, config=fimlora.FimConfig(**SETTINGS, progress=False))
    saved = fimlora.RankAllocation.from_json(out / "rank_map.json")
    assert saved.ranks == ref_alloc.ranks and saved.alphas == ref_alloc.alphas
    assert saved.ranks != saved.old_ranks  # the allocation moved rank, so the check below means something
    for name, score in ref_alloc.scores.items():
        assert saved.scores[name] == pytest.approx(score, rel=1e-5), name
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    ref_config = ref.peft_config["default"]
    assert adapter_config["rank_pattern"] == ref_config.rank_pattern
    assert adapter_config["alpha_pattern"] == ref_config.alpha_pattern
    want = get_peft_model_state_dict(ref)
    got = load_file(out / "adapter_model.safetensors")
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    reloaded = PeftModel.from_pretrained(base(assets), out)
    assert {i.name: i.r for i in fimlora.lora_modules(reloaded)} == saved.ranks


def test_training_resume_and_merge_keep_the_calibrated_ranks(assets):
    # scale "preserve" (the default): alpha_m = alpha * r_m / r, so a merge that took the global lora_alpha with
    # each module's rank (ignoring alpha_pattern) would scale every resized module wrongly.
    settings = dict(SETTINGS)
    out = assets / "out_train"
    axolotl("axolotl.cli.train", write_config(assets, out, "train", fimlora=settings))
    rank_map = (out / "rank_map.json").read_bytes()
    alloc = fimlora.RankAllocation.from_json(out / "rank_map.json")
    done = load_file(out / "adapter_model.safetensors")
    # The optimizer was built after the resize: every resized LoRA-B has been trained.
    assert all(v.abs().sum() > 0 for k, v in done.items() if "lora_B" in k)
    assert {k: v.shape[0] for k, v in done.items() if "lora_A" in k} == {
        f"base_model.model.{n}.lora_A.weight": r for n, r in alloc.ranks.items()}

    resumed = axolotl("axolotl.cli.train", write_config(assets, out, "resume", fimlora=settings,
                                                        resume_from_checkpoint=str(out / "checkpoint-2")))
    assert "fimlora calibration" not in resumed  # loaded the saved ranks instead
    assert f"fimlora: load (resuming from {out / 'checkpoint-2'})" in resumed
    assert (out / "rank_map.json").read_bytes() == rank_map
    again = load_file(out / "adapter_model.safetensors")
    assert sorted(again) == sorted(done)
    for key in done:
        torch.testing.assert_close(again[key], done[key], msg=key)

    axolotl("axolotl.cli.merge_lora", assets / "train.json", f"--lora_model_dir={out}")
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    peft_merged = PeftModel.from_pretrained(base(assets), out).merge_and_unload().eval()
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_merged(ids).logits)


def test_a_bad_setting_fails_config_validation_with_fimconfigs_error(assets):
    cfg = write_config(assets, assets / "out_bad", "bad", fimlora={"r_min": -1})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "axolotl.cli.train", str(cfg)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)
    assert proc.returncode != 0
    assert "fimlora.r_min: must be >= 0, got -1" in proc.stdout + proc.stderr
    assert not (assets / "out_bad" / "rank_map.json").exists()


def test_qlora_run_calibrates_and_saves_the_allocated_adapter(assets):
    out = assets / "out_qlora"
    axolotl("axolotl.cli.train", write_config(assets, out, "qlora", adapter="qlora", load_in_4bit=True))
    alloc = fimlora.RankAllocation.from_json(out / "rank_map.json")
    tensors = load_file(out / "adapter_model.safetensors")
    assert {k: v.shape[0] for k, v in tensors.items() if "lora_A" in k} == {
        f"base_model.model.{n}.lora_A.weight": r for n, r in alloc.ranks.items()}
    assert json.loads((out / "adapter_config.json").read_text())["rank_pattern"] == alloc.ranks


def test_axolotl_train_command_runs_with_the_venvs_bin_on_path(assets):
    """`axolotl train CONFIG` as docs/axolotl.md shows it: the launcher it starts (`accelerate`) is found only with
    the venv's bin/ on PATH; with it the run calibrates and saves the allocated adapter."""
    bin_dir = Path(sys.executable).parent
    cfg = write_config(assets, assets / "out_cli", "cli", max_steps=2, save_steps=2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1",
           "LOG_LEVEL": "INFO", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "PATH": os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")])}
    proc = subprocess.run([str(bin_dir / "axolotl"), "train", str(cfg)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    alloc = fimlora.RankAllocation.from_json(assets / "out_cli" / "rank_map.json")
    config = json.loads((assets / "out_cli" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == alloc.ranks
