"""Multiple-choice evaluation: the log-likelihood of each choice given its context, and the choice it predicts."""

from __future__ import annotations

import torch

from .collators import _encode_pair, right_pad

__all__ = ["choice_logliks", "score_choices", "context_groups", "head_split"]

@torch.no_grad()
def score_choices(model, tokenizer, examples: list[dict], batch_size: int = 16, max_length: int = 128,
                  progress: bool = False) -> list[int]:
    """Predicted choice per example: argmax over choices of sum log p(continuation | context)."""
    scores = choice_logliks(model, tokenizer, examples, batch_size, max_length, progress)
    return [max(range(len(e["choices"])), key=lambda c: scores[(ei, c)]) for ei, e in enumerate(examples)]


@torch.no_grad()
def choice_logliks(model, tokenizer, examples: list[dict], batch_size: int = 16, max_length: int = 128,
                   progress: bool = False, shared_context: bool | None = None,
                   head_only_where_scored: bool | None = None) -> dict[tuple[int, int], float]:
    """{(example, choice): sum_t log p(cont_t | context, cont_<t)}, a sum over continuation tokens.

    ``shared_context`` (default: for any model with a transformers config, whose forward takes a KV cache): each
    example's context runs once, left-padded, and its KV cache is copied to every choice, whose tokens run after
    it at the positions they would have had; the vocabulary head runs only where a continuation token is
    predicted. A choice whose context was cut otherwise (``max_length``) gets its own group, so the scores are
    those of one forward per choice (:func:`_flat_logliks`, the reference) to float rounding, at about
    (context + choices) instead of choices x (context + choice) positions.

    ``head_only_where_scored`` (default: wherever :func:`head_split` separates the model's transformer body from
    its vocabulary head): the body runs on every position, the head (d -> V, 49k rows for SmolLM2) and the
    log-softmax only on the positions that predict a continuation token, instead of on every (non-padded or padded)
    position of the forward; the scores are the same to float rounding.
    """
    from tqdm.auto import tqdm

    flat = []
    for ei, e in enumerate(examples):
        for ci, c in enumerate(e["choices"]):
            flat.append((ei, ci, *_encode_pair(tokenizer, e["context"], c, max_length)))
    if shared_context is None:
        shared_context = getattr(model, "config", None) is not None
    split = None
    if head_only_where_scored is not False and flat:
        split = head_split(model, torch.tensor([flat[0][2][:_PROBE_TOKENS]], dtype=torch.long))
        if head_only_where_scored and split is None:
            raise ValueError("head_only_where_scored: True needs a model whose vocabulary head can be run apart from "
                             "its body (head_split found none); got a model where it cannot, pass None or False")
    bar = tqdm(total=len(flat), desc="scoring choices", disable=not progress)
    try:
        if shared_context:
            return _shared_context_logliks(model, split, flat, tokenizer.pad_token_id, batch_size, bar)
        return _flat_logliks(model, split, flat, tokenizer.pad_token_id, batch_size, bar)
    finally:
        bar.close()


def _flat_logliks(model, split, flat: list, pad_id: int, batch_size: int, bar) -> dict[tuple[int, int], float]:
    """Every (example, choice) as one right-padded sequence; ``flat`` holds (example, choice, ids, start).
    Row i's continuation tokens ids[start:] are predicted at positions start - 1 .. len(ids) - 2."""
    # Length-sorted chunks: padding costs a full 49k-vocab row per padded position when the head runs everywhere.
    flat = sorted(flat, key=lambda x: len(x[2]))
    scores: dict[tuple[int, int], float] = {}
    device = next(model.parameters()).device
    for s in range(0, len(flat), batch_size):
        chunk = flat[s : s + batch_size]
        ids, mask = right_pad([seq for _, _, seq, _ in chunk], pad_id)
        spans = [(start - 1, len(seq) - 1) for _, _, seq, start in chunk]
        rows = torch.tensor([i for i, (a, b) in enumerate(spans) for _ in range(a, b)], dtype=torch.long)
        cols = torch.tensor([t for a, b in spans for t in range(a, b)], dtype=torch.long)
        logp, _ = _log_probs(model, split, (rows, cols), input_ids=ids.to(device), attention_mask=mask.to(device))
        tok_lp = _gather(logp, ids[rows, cols + 1])
        sums = torch.zeros(len(chunk), dtype=tok_lp.dtype, device=tok_lp.device).index_add_(0, rows.to(device), tok_lp)
        for i, (ei, ci, _, _) in enumerate(chunk):
            scores[(ei, ci)] = float(sums[i])
        bar.update(len(chunk))
    return scores


# Tokens of the probe that checks a body/head split against the whole model (head_split): enough to be a real
# sequence, few enough to cost nothing next to the scoring.
_PROBE_TOKENS = 8


def head_split(model, probe_ids: torch.Tensor):
    """(body, head) such that ``head(body(**inputs).last_hidden_state)`` is ``model(**inputs).logits``, or None.

    The body is the transformers model's ``get_decoder()`` (the transformer without the head), the head its
    ``get_output_embeddings()`` (the module itself, so a LoRA-adapted or ``modules_to_save`` head keeps its
    adapter); a PEFT model is split through ``get_base_model()``. Some models change the head's output before
    returning it (Gemma 2's logit soft-capping, Cohere's ``logit_scale``, Granite's ``logits_scaling``) and
    nothing common announces it, so the split is accepted only if it gives the model's own logits
    (``logits_to_keep=1``: the head on the same one row) at the last position of ``probe_ids`` (1, L), within
    4 units of rounding of the model's dtype (the two run the same operations: they agree to the bit on LLaMA
    and SmolLM2 in float32 and bfloat16); None otherwise, and for a model without the two accessors or whose
    body is the model itself.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not (callable(getattr(base, "get_decoder", None)) and callable(getattr(base, "get_output_embeddings", None))):
        return None
    body, head = base.get_decoder(), base.get_output_embeddings()
    if body is None or head is None or body is base:
        return None
    device = next(model.parameters()).device
    ids = probe_ids.to(device)
    try:
        whole = model(input_ids=ids, logits_to_keep=1).logits[:, -1].float()
        parts = head(body(input_ids=ids).last_hidden_state[:, -1]).float()
    except (TypeError, ValueError, AttributeError):  # a body that does not take the model's inputs alone
        return None
    eps = torch.finfo(next(model.parameters()).dtype).eps
    if parts.shape != whole.shape or not torch.allclose(parts, whole, rtol=4 * eps,
                                                        atol=4 * eps * float(whole.abs().max())):
        return None
    return body, head


def _log_probs(model, split, positions: tuple[torch.Tensor, torch.Tensor], **inputs):
    """log softmax over the vocabulary at ``positions`` (rows (N,), columns (N,); a column may be -1, the last)
    of one forward: (logp (N, V) float32, the forward's output for its cache).

    With ``split`` (:func:`head_split`) the body runs on ``inputs`` and the head only on the N hidden states;
    without, the whole model runs and its logits are indexed (a ``logits_to_keep=1`` forward keeps column -1)."""
    rows, cols = positions
    if split is None:
        out = model(**inputs)
        logits = out.logits[rows.to(out.logits.device), cols.to(out.logits.device)]
    else:
        body, head = split
        inputs.pop("logits_to_keep", None)  # the body has no head to keep logits of
        out = body(**inputs)
        hidden = out.last_hidden_state
        logits = head(hidden[rows.to(hidden.device), cols.to(hidden.device)])
    return torch.log_softmax(logits.float(), dim=-1), out


def _gather(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logp[n, targets[n]] for every n: (N, V), (N,) -> (N,)."""
    return logp.gather(-1, targets.to(logp.device).unsqueeze(-1)).squeeze(-1)


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


def _shared_context_logliks(model, split, flat: list, pad_id: int, batch_size: int,
                            bar) -> dict[tuple[int, int], float]:
    """:func:`choice_logliks` with one forward per context: contexts (B, Lc) left-padded, so that position Lc - 1
    of every row is its last token, whose logits give each choice's first token; the cache of context b is
    copied to its n_b choices (R = sum_b n_b rows), which run (R, Lt) right-padded at positions c_b + t (c_b the
    context's real length). ``batch_size`` bounds the choices per step; the head runs at each context's last
    position and at the choices' real (unpadded) tokens but their last."""
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
        last = (torch.arange(len(chunk)), torch.full((len(chunk),), -1, dtype=torch.long))
        first, out = _log_probs(model, split, last, input_ids=ctx_ids.to(device), attention_mask=ctx_mask.to(device),
                                position_ids=positions.to(device), use_cache=True, logits_to_keep=1)
        # first (B, V): each choice's first token
        owner = torch.tensor([b for b, (_, conts) in enumerate(chunk) for _ in conts], dtype=torch.long)
        conts = [cont for _, cs in chunk for _, cont in cs]
        keys = [key for _, cs in chunk for key, _ in cs]
        cache = getattr(out, "cache", None) or out.past_key_values
        cache.reorder_cache(owner.to(device))
        cont_ids, cont_mask = right_pad(conts, pad_id)
        lengths = torch.tensor([len(c) for c in contexts], dtype=torch.long)[owner]
        more = cont_ids.shape[1] > 1
        if more:  # tokens 2.. of each choice, after its first: position t predicts token t + 1
            at, t = cont_mask[:, 1:].nonzero(as_tuple=True)
            logp, _ = _log_probs(model, split, (at, t), input_ids=cont_ids[:, :-1].to(device),
                                 attention_mask=torch.cat([ctx_mask[owner], cont_mask[:, :-1]], dim=1).to(device),
                                 position_ids=(lengths[:, None] + torch.arange(cont_ids.shape[1] - 1)).to(device),
                                 use_cache=False, **{cache_name: cache})
            tok_lp = torch.zeros(cont_mask[:, 1:].shape, dtype=logp.dtype, device=logp.device)
            tok_lp[at.to(logp.device), t.to(logp.device)] = _gather(logp, cont_ids[at, t + 1])
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
