"""Batches for training: a tokenised classification batch, or a causal-LM batch with the loss on the answer only."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .tasks import HEAD_KINDS, TaskData

__all__ = ["collator_for", "ClassificationCollator", "CausalLMCollator", "IGNORE_INDEX", "right_pad"]

def collator_for(task: TaskData, tokenizer, max_length: int):
    """The collator that turns a task's examples into model inputs with labels."""
    if task.kind in HEAD_KINDS:
        return ClassificationCollator(tokenizer, max_length, regression=task.kind == "regression")
    return CausalLMCollator(tokenizer, max_length)


class ClassificationCollator:
    """list of {"text", "text_pair"?, "label"} -> padded batch with ``labels``.

    Class indices become a long tensor; with ``regression`` the labels are float targets, which a
    one-output head with ``problem_type="regression"`` trains with MSE.
    """

    def __init__(self, tokenizer, max_length: int = 128, regression: bool = False):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.label_dtype = torch.float32 if regression else torch.long

    def __call__(self, examples: list[dict]) -> dict:
        texts = [e["text"] for e in examples]
        pairs = [e.get("text_pair") for e in examples]
        enc = self.tokenizer(texts, pairs if any(p is not None for p in pairs) else None, truncation=True,
                             max_length=self.max_length, padding=True, return_tensors="pt")
        enc = dict(enc)
        enc["labels"] = torch.tensor([e["label"] for e in examples], dtype=self.label_dtype)
        return enc


IGNORE_INDEX = -100  # label value the loss skips (torch.nn.CrossEntropyLoss's ignore_index)


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists padded on the right to the longest: (ids, attention mask), both ``[n, width]`` long.

    The mask is 1 on real tokens and 0 on padding. Padding after each sequence leaves a causal model's
    outputs on the real tokens as they are without padding. Pad labels with ``pad_id=IGNORE_INDEX``.
    """
    if pad_id is None:
        raise ValueError("right_pad: pad_id is None; give the tokenizer a pad token (e.g. its eos token)")
    if not sequences:
        raise ValueError("right_pad: no sequences to pad")
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids, mask


def _encode_pair(tokenizer, context: str, continuation: str, max_length: int) -> tuple[list[int], int]:
    """Token ids of context+continuation and the index where the continuation starts."""
    ctx_ids = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
    if not ctx_ids:  # the first continuation token needs something to be predicted from
        ctx_ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
    sep = " " if context and not context.endswith((" ", "\n")) else ""
    cont_ids = tokenizer(sep + continuation, add_special_tokens=False)["input_ids"]
    ids = ctx_ids + cont_ids
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        ids = [tokenizer.bos_token_id] + ids
    start = len(ids) - len(cont_ids)
    if len(ids) > max_length:  # keep the continuation, cut the context from the left
        cut = len(ids) - max_length
        ids, start = ids[cut:], max(1, start - cut)
    return ids, start


class CausalLMCollator:
    """Multiple-choice examples -> causal-LM batch; loss only on the correct answer's tokens (right padding)."""

    def __init__(self, tokenizer, max_length: int = 128):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, examples: list[dict]) -> dict:
        seqs = [_encode_pair(self.tokenizer, e["context"], e["choices"][e["answer"]], self.max_length)
                for e in examples]
        input_ids, attention = right_pad([ids for ids, _ in seqs], self.tokenizer.pad_token_id)
        labels, _ = right_pad([[IGNORE_INDEX] * start + ids[start:] for ids, start in seqs], IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
