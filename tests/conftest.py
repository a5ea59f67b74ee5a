"""Tiny seeded models and batches shared by the tests."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)


def tiny_bert(seed: int = 0, num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=num_labels, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    )
    return BertForSequenceClassification(cfg).eval()


def tiny_llama(seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def lora_bert(seed: int = 0, r: int = 4, **kw):
    from peft import LoraConfig, get_peft_model

    cfg = dict(r=r, lora_alpha=2 * r, target_modules=["query", "key", "value", "dense"], lora_dropout=0.1,
               task_type="SEQ_CLS")
    cfg.update(kw)
    torch.manual_seed(seed + 100)
    return get_peft_model(tiny_bert(seed), LoraConfig(**cfg))


def lora_llama(seed: int = 0, r: int = 4, layers: int = 2, **kw):
    from peft import LoraConfig, get_peft_model

    cfg = dict(r=r, lora_alpha=2 * r,
               target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
               lora_dropout=0.0, task_type="CAUSAL_LM")
    cfg.update(kw)
    torch.manual_seed(seed + 100)
    return get_peft_model(tiny_llama(seed, layers), LoraConfig(**cfg))


def cls_batches(n_batches: int = 3, batch_size: int = 4, seq: int = 8, seed: int = 1, num_labels: int = 3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1, 64, (batch_size, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "labels": torch.randint(0, num_labels, (batch_size,), generator=g)})
    return out


def lm_batches(n_batches: int = 3, batch_size: int = 4, seq: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1, 64, (batch_size, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def make_b_nonzero(model, batches, steps: int = 3, lr: float = 0.05):
    """A few optimizer steps so LoRA-B is non-zero (save/load tests need real adapters)."""
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for i in range(steps):
        loss = model(**batches[i % len(batches)]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.fixture
def bert():
    return lora_bert()


@pytest.fixture
def llama():
    return lora_llama()
