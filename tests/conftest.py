"""Offline environment and shared fixtures; the models and references themselves live in tests/references.py."""

from __future__ import annotations

import os

import pytest
import torch

from tests.references import lora_bert, lora_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture
def bert():
    return lora_bert()


@pytest.fixture
def llama():
    return lora_llama()
