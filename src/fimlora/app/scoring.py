"""Multiple-choice evaluation: the log-likelihood of each choice given its context, and the choice it predicts."""

from __future__ import annotations

import torch

from .collators import _encode_pair, right_pad

__all__ = ["choice_logliks", "score_choices", "context_groups"]

@torch.no_grad()
def score_choices(model, tokenizer, examples: list[dict], batch_size: int = 16, max_length: int = 128,
                  progress: bool = False) -> list[int]:
    """Predicted choice per example: argmax over choices of sum log p(continuation | context)."""
    scores = choice_logliks(model, tokenizer, examples, batch_size, max_length, progress)
    return [max(range(len(e["choices"])), key=lambda c: scores[(ei, c)]) for ei, e in enumerate(examples)]


@torch.no_grad()
def choice_logliks(model, tokenizer, examples: list[dict], batch_size: int = 16, max_length: int = 128,
                   progress: bool = False, shared_context: bool | None = None) -> dict[tuple[int, int], float]:
    """{(example, choice): sum_t log p(cont_t | context, cont_<t)}, a sum over continuation tokens.

    ``shared_context`` (default: for any model with a transformers config, whose forward takes a KV cache): each
    example's context runs once, left-padded, and its KV cache is copied to every choice, whose tokens run after
    it at the positions they would have had; the vocabulary head runs only where a continuation token is
    predicted. A choice whose context was cut otherwise (``max_length``) gets its own group, so the scores are
    those of one forward per choice (:func:`_flat_logliks`, the reference) to float rounding, at about
    (context + choices) instead of choices x (context + choice) positions.
    """
    from tqdm.auto import tqdm

    flat = []
    for ei, e in enumerate(examples):
        for ci, c in enumerate(e["choices"]):
            flat.append((ei, ci, *_encode_pair(tokenizer, e["context"], c, max_length)))
    if shared_context is None:
        shared_context = getattr(model, "config", None) is not None
    bar = tqdm(total=len(flat), desc="scoring choices", disable=not progress)
    try:
        if shared_context:
            return _shared_context_logliks(model, flat, tokenizer.pad_token_id, batch_size, bar)
        return _flat_logliks(model, flat, tokenizer.pad_token_id, batch_size, bar)
    finally:
        bar.close()


def _flat_logliks(model, flat: list, pad_id: int, batch_size: int, bar) -> dict[tuple[int, int], float]:
    """Every (example, choice) as one right-padded sequence; ``flat`` holds (example, choice, ids, start)."""
    # Length-sorted chunks: padding costs a full 49k-vocab row per padded position on decoders.
    flat = sorted(flat, key=lambda x: len(x[2]))
    scores: dict[tuple[int, int], float] = {}
    device = next(model.parameters()).device
    for s in range(0, len(flat), batch_size):
        chunk = flat[s : s + batch_size]
        ids, mask = right_pad([seq for _, _, seq, _ in chunk], pad_id)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = ids[:, 1:].to(device)
        tok_lp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        for i, (ei, ci, seq, start) in enumerate(chunk):
            scores[(ei, ci)] = float(tok_lp[i, start - 1 : len(seq) - 1].sum())
        bar.update(len(chunk))
    return scores


def context_groups(flat: list) -> list[tuple[list[int], list[tuple[tuple[int, int], list[int]]]]]:
    """[(context ids, [((example, choice), continuation ids), ...])]: the choices of ``flat`` (example, choice,
    ids, start) that share their context ids exactly, in first-seen order."""
    groups: dict[tuple, list] = {}
    for ei, ci, ids, start in flat:
        groups.setdefault((ei, tuple(ids[:start])), []).append(((ei, ci), ids[start:]))
    return [(list(ctx), conts) for (_, ctx), conts in groups.items()]


def _cache_argument(model) -> str:
    """What the model's forward calls its KV cache: ``cache`` (transformers >= 5.2x), else ``past_key_values``."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _shared_context_logliks(model, flat: list, pad_id: int, batch_size: int, bar) -> dict[tuple[int, int], float]:
    """:func:`choice_logliks` with one forward per context: contexts (B, Lc) left-padded, so that position Lc - 1
    of every row is its last token, whose logits give each choice's first token; the cache of context b is
    copied to its n_b choices (R = sum_b n_b rows), which run (R, Lt) right-padded at positions c_b + t (c_b the
    context's real length). ``batch_size`` bounds the choices per step."""
    groups = sorted(context_groups(flat), key=lambda g: len(g[0]))
    scores: dict[tuple[int, int], float] = {}
    device = next(model.parameters()).device
    cache_name = _cache_argument(model)  # once: inspecting the forward's signature is not free
    start = 0
    while start < len(groups):
        end, rows = start, 0
        while end < len(groups) and (end == start or rows + len(groups[end][1]) <= batch_size):
            rows += len(groups[end][1])
            end += 1
        chunk = groups[start:end]
        start = end
        contexts = [ctx for ctx, _ in chunk]
        width = max(map(len, contexts))
        ctx_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        ctx_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for b, ctx in enumerate(contexts):
            ctx_ids[b, width - len(ctx):] = torch.tensor(ctx, dtype=torch.long)
            ctx_mask[b, width - len(ctx):] = 1
        positions = (ctx_mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ctx_ids.to(device), attention_mask=ctx_mask.to(device),
                    position_ids=positions.to(device), use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (B, V): each choice's first token
        owner = torch.tensor([b for b, (_, conts) in enumerate(chunk) for _ in conts], dtype=torch.long)
        conts = [cont for _, cs in chunk for _, cont in cs]
        keys = [key for _, cs in chunk for key, _ in cs]
        cache = getattr(out, "cache", None) or out.past_key_values
        cache.reorder_cache(owner.to(device))
        cont_ids, cont_mask = right_pad(conts, pad_id)
        lengths = torch.tensor([len(c) for c in contexts], dtype=torch.long)[owner]
        more = cont_ids.shape[1] > 1
        if more:  # tokens 2.. of each choice, after its first
            rest = model(input_ids=cont_ids[:, :-1].to(device),
                         attention_mask=torch.cat([ctx_mask[owner], cont_mask[:, :-1]], dim=1).to(device),
                         position_ids=(lengths[:, None] + torch.arange(cont_ids.shape[1] - 1)).to(device),
                         use_cache=False, **{cache_name: cache})
            tok_lp = torch.log_softmax(rest.logits.float(), dim=-1).gather(
                -1, cont_ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
        for r, (key, cont) in enumerate(zip(keys, conts)):
            if not cont:  # nothing to predict: the empty sum
                scores[key] = 0.0
                continue
            total = first[owner[r], cont[0]]
            if len(cont) > 1:
                total = total + tok_lp[r, : len(cont) - 1].sum()
            scores[key] = float(total)
        bar.update(len(keys))
    return scores
