"""`fimlora check` on good and broken adapters."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import fimlora
from fimlora.check import check_adapter, vllm_max_lora_rank
from tests.references import lm_batches, lora_llama


def test_vllm_rank():
    assert [vllm_max_lora_rank(r) for r in (1, 2, 8, 9, 16, 17, 300, 513)] == [1, 8, 8, 16, 16, 32, 320, None]


@pytest.fixture
def saved_adapter(tmp_path):
    model = lora_llama(layers=12)
    fimlora.apply_fim_ranks(model, lm_batches(), n_batches=2, progress=False)
    model.save_pretrained(tmp_path / "a")
    return tmp_path / "a", model


def test_check_passes_on_fimlora_adapter(saved_adapter):
    path, model = saved_adapter
    names = [n for n, _ in model.base_model.model.named_modules()]
    report = check_adapter(path, names)
    assert report.ok, report.format()
    assert report.vllm_max_lora_rank == vllm_max_lora_rank(max(report.ranks.values()))
    assert len(report.ranks) == 84


def rewrite_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    for k, fn in changes.items():
        cfg[k] = fn(cfg[k])
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def test_check_catches_prefixed_keys(saved_adapter):
    path, _ = saved_adapter
    rewrite_config(path, rank_pattern=lambda p: {f"base_model.model.{k}": v for k, v in p.items()})
    report = check_adapter(path)
    assert not report.ok
    assert any("wrapper prefix" in p for p in report.problems)
    assert any("size mismatch" in p for p in report.problems)


def test_check_catches_shadowing_key(saved_adapter):
    path, _ = saved_adapter
    rewrite_config(path, rank_pattern=lambda p: {**p, "q_proj": 3})
    report = check_adapter(path)
    assert any("is matched by 2 keys" in p for p in report.problems)


def test_check_catches_rank_tensor_mismatch(saved_adapter):
    path, _ = saved_adapter
    rewrite_config(path, rank_pattern=lambda p: {k: v + 1 if i == 0 else v for i, (k, v) in enumerate(p.items())})
    report = check_adapter(path)
    assert any("config gives rank" in p for p in report.problems)


def test_check_catches_empty_tensors(saved_adapter):
    path, _ = saved_adapter
    sd = load_file(path / "adapter_model.safetensors")
    key = next(k for k in sd if "lora_A" in k)
    sd[key] = torch.zeros(0)
    save_file(sd, path / "adapter_model.safetensors")
    report = check_adapter(path)
    assert any("empty LoRA tensor" in p for p in report.problems)
