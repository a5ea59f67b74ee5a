"""The one place that turns settings into objects: tokenizer, base model, LoRA config, calibration
loader and FimConfig. The CLI, the demo and every experiment run build through these functions.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from dataclasses import fields

import torch

from ..config import FimConfig
from .data import TaskData, collator_for
from .models import load_causal_lm, load_classifier, load_tokenizer

__all__ = [
    "FIM_DEFAULTS",
    "task_type_for",
    "build_tokenizer",
    "build_base_model",
    "build_lora_config",
    "build_peft_model",
    "build_calibration_loader",
    "build_fim_config",
    "check_tokenizer_coverage",
]

logger = logging.getLogger(__name__)

# The CLI and the configs take their defaults from here, so there is one list of them.
FIM_DEFAULTS = {f.name: f.default for f in fields(FimConfig)}

# Fraction of unknown tokens above which calibration data is almost certainly mis-tokenised.
UNKNOWN_TOKEN_WARNING = 0.5


def task_type_for(kind: str) -> str:
    """PEFT task type for a task kind: a classification head or a causal LM."""
    return "SEQ_CLS" if kind == "classification" else "CAUSAL_LM"


def build_tokenizer(model: str):
    """The model's tokenizer (pad token set); refuses a folder without a usable tokenizer."""
    return load_tokenizer(model)


def build_base_model(model: str, task: TaskData, n_layers: int | None = None, seed: int = 0,
                     dtype: torch.dtype = torch.float32):
    """A classifier with a seeded head for classification tasks, else a causal LM."""
    if task.kind == "classification":
        return load_classifier(model, task.num_labels, n_layers, seed=seed)
    return load_causal_lm(model, n_layers, dtype=dtype)


def build_lora_config(kind: str, r: int, lora_alpha: float | None = None, target_modules=None,
                      lora_dropout: float = 0.0, **extra):
    """LoraConfig for a task kind; ``lora_alpha`` defaults to 2r."""
    from peft import LoraConfig

    alpha = 2 * r if lora_alpha is None else lora_alpha
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules, lora_dropout=lora_dropout,
                      task_type=task_type_for(kind), **extra)


def build_peft_model(base, lora_config, seed: int = 0):
    """``get_peft_model`` with A drawn from ``seed``."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        # PEFT reads transformers' deprecated is_gradient_checkpointing; nothing for a user to change.
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(base, lora_config)


def build_calibration_loader(task: TaskData, tokenizer, batch_size: int, max_length: int, seed: int = 0):
    """Shuffled (seeded) batches of the task's training split, collated with labels."""
    from torch.utils.data import DataLoader

    if not task.train:
        raise ValueError(f"data: task {task.name!r} has no training examples to calibrate on")
    check_tokenizer_coverage(tokenizer, task)
    g = torch.Generator().manual_seed(seed)
    return DataLoader(task.train, batch_size=batch_size, shuffle=True, generator=g,
                      collate_fn=collator_for(task, tokenizer, max_length))


def build_fim_config(settings: Mapping | None = None, **overrides) -> FimConfig:
    """FimConfig from a settings mapping (a config's ``fim:`` block) plus explicit overrides."""
    merged = {**(settings or {}), **overrides}
    unknown = sorted(set(merged) - set(FIM_DEFAULTS))
    if unknown:
        raise ValueError(f"fim: unknown setting(s) {unknown}; known: {sorted(FIM_DEFAULTS)}")
    return FimConfig(**merged)


def _sample_texts(task: TaskData, limit: int = 64) -> list[str]:
    texts = []
    for row in task.train[:limit]:
        if "text" in row:
            texts.append(row["text"])
        elif "context" in row:
            texts.append(f"{row['context']} {row['choices'][row['answer']]}")
    return texts


def check_tokenizer_coverage(tokenizer, task: TaskData) -> float:
    """Share of unknown tokens over the first training texts; warns above one half."""
    unk = getattr(tokenizer, "unk_token_id", None)
    texts = _sample_texts(task)
    if unk is None or not texts:
        return 0.0
    ids = [i for t in texts for i in tokenizer(t, add_special_tokens=False)["input_ids"]]
    share = sum(i == unk for i in ids) / max(1, len(ids))
    if share > UNKNOWN_TOKEN_WARNING:
        warnings.warn(
            f"tokenizer: {share:.0%} of the calibration tokens of {task.name!r} are unknown "
            f"({tokenizer.unk_token!r}); the tokenizer does not fit this data or this model",
            stacklevel=2,
        )
    return share
