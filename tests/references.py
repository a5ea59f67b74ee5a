"""Slow, obvious references and tiny seeded models, shared by the tests and the benchmark.

Everything numerical in fimlora is checked against one of these: Fisher diagonals against plain
autograd (one backward per batch, or one per example), the allocator against bisection on tau.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from fimlora.modules import lora_modules

# ----------------------------------------------------------------------------- tiny seeded models and batches


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


def tiny_gpt2(seed: int = 0, layers: int = 2):
    """GPT-2: its projections are transformers Conv1D (weight (d_in, d_out)), so LoRA uses fan_in_fan_out."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_embd=16, n_layer=layers, n_head=2, n_positions=32, bos_token_id=0,
                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def lora_gpt2(seed: int = 0, r: int = 4, layers: int = 2, **kw):
    from peft import LoraConfig, get_peft_model

    cfg = dict(r=r, lora_alpha=2 * r, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, lora_dropout=0.0,
               task_type="CAUSAL_LM")
    cfg.update(kw)
    torch.manual_seed(seed + 100)
    return get_peft_model(tiny_gpt2(seed, layers), LoraConfig(**cfg))


def save_tiny_llama(path, seed: int = 0, layers: int = 2):
    """Save a seeded tiny LLaMA to ``path``, to be loaded quantised (bitsandbytes quantises while loading).

    Every projection has d_in a multiple of 64 and d_out of 32: bitsandbytes' CPU 4-bit inference path (eval mode,
    input without grad) repacks weights in blocks of 32 output rows and 64-wide quantisation blocks, and fails on
    anything else.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    return path


def quantised_llama(path, bits: int):
    """The model saved at ``path`` loaded on the CPU with real bitsandbytes: 4 (nf4, fp32 compute) or 8 bits.

    An eval forward whose input needs no grad makes bitsandbytes repack a 4-bit weight for CPU inference (another
    kernel, with no backward). The autograd references above are exact on a prepare_model_for_kbit_training model,
    whose input grads keep every layer on the training kernel; on an unprepared one, layer 0 would be repacked.
    """
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    if bits == 4:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    elif bits == 8:
        q = BitsAndBytesConfig(load_in_8bit=True)
    else:
        raise ValueError(f"bits: must be 4 or 8, got {bits!r}")
    return LlamaForCausalLM.from_pretrained(path, quantization_config=q, device_map="cpu").eval()


def qlora_llama(path, bits: int, seed: int = 0, r: int = 4, reentrant: bool = True, **kw):
    """QLoRA as usually set up: prepare_model_for_kbit_training (gradient checkpointing, reentrant by default as
    there, and input grads), then LoRA on all linear layers (every projection of every block, not lm_head)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(quantised_llama(path, bits),
                                            gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    cfg = dict(r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    cfg.update(kw)
    torch.manual_seed(seed + 100)
    return get_peft_model(model, LoraConfig(**cfg))


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


def llama_base(layers: int, hidden: int, seed: int = 0, vocab: int = 1024):
    """A LLaMA-shaped model of a given size (intermediate = 8/3 hidden, 64-dim heads), seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    heads = max(1, hidden // 64)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=max(8, hidden * 8 // 3 // 8 * 8),
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


# ----------------------------------------------------------------------------- Fisher references


def b_weights(model, adapter="default"):
    return {i.name: i.layer.lora_B[adapter].weight for i in lora_modules(model, adapter)}


def reference_batch_fisher(model, batches):
    """(1/N) sum_b (dL_b/dB)^2 from plain autograd, eval mode."""
    model.eval()
    ws = b_weights(model)
    acc = {n: torch.zeros_like(w, dtype=torch.float64) for n, w in ws.items()}
    for batch in batches:
        loss = model(**batch).loss
        grads = torch.autograd.grad(loss, list(ws.values()), allow_unused=True)
        for (n, _), g in zip(ws.items(), grads):
            if g is not None:
                acc[n] += g.double() ** 2
    return {n: a / len(batches) for n, a in acc.items()}


def reference_per_example_fisher(model, batches):
    """(1/N_ex) sum_n (dl_n/dB)^2 from a loop of single-example backward passes."""
    model.eval()
    ws = b_weights(model)
    acc = {n: torch.zeros_like(w, dtype=torch.float64) for n, w in ws.items()}
    count = 0
    for batch in batches:
        bs = batch["input_ids"].shape[0]
        for i in range(bs):
            single = {k: v[i : i + 1] for k, v in batch.items()}
            loss = model(**single).loss
            grads = torch.autograd.grad(loss, list(ws.values()), allow_unused=True)
            for (n, _), g in zip(ws.items(), grads):
                if g is not None:
                    acc[n] += g.double() ** 2
            count += 1
    return {n: a / count for n, a in acc.items()}


def assert_fisher_close(got, ref, rtol=1e-4):
    assert list(got) == list(ref)
    for n in ref:
        scale = ref[n].abs().max().item() + 1e-30
        torch.testing.assert_close(got[n].double(), ref[n], rtol=rtol, atol=rtol * scale, msg=n)


# ----------------------------------------------------------------------------- allocator reference


def reference_allocate(scores, budget, r_min, r_max):
    """Bisection on tau (slow, obvious), then the same documented rounding rule."""
    n = len(scores)
    pos = [s for s in scores if s > 0]
    f = lambda t: sum(min(r_max, max(r_min, t * s)) for s in scores)  # noqa: E731
    if pos and f(r_max / min(pos)) >= budget:
        lo, hi = 0.0, r_max / min(pos)
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) < budget else (lo, mid)
        x = [min(r_max, max(r_min, hi * s)) for s in scores]
    else:  # positive modules saturated: zero-score modules share the rest
        n_zero = sum(1 for s in scores if s == 0)
        share = (budget - r_max * len(pos)) / n_zero
        x = [r_max if s > 0 else share for s in scores]
    ranks = [math.floor(v + 1e-9) for v in x]
    fracs = [round(v - r, 9) if v - r > 1e-9 else 0.0 for v, r in zip(x, ranks)]
    left = budget - sum(ranks)
    order = sorted(range(n), key=lambda i: (-fracs[i], -scores[i], i))
    for i in order[:left]:
        ranks[i] += 1
    return ranks


def reference_allocate_costs(scores, costs, budget, r_min, r_max):
    """With costs (a parameter budget): bisection on tau for sum_m c_m clip(tau*s_m) = budget, then the greedy.

    Slow and obvious: reduce by the gcd of the costs; bisect for tau, then solve the linear piece it lands on
    in exact rational arithmetic (so fractional parts that tie, e.g. 16.5 and 5.5, tie exactly); floor; then
    rounds over the modules in phase-2 order (largest fractional part, higher score, module order), one unit
    to each module below r_max whose cost fits what is left, until a round gives nothing.
    """
    n = len(scores)
    g = math.gcd(*costs)
    c = [ci // g for ci in costs]
    budget = budget // g
    if r_max * sum(c) <= budget:
        return [r_max] * n
    pos = [s for s in scores if s > 0]
    f = lambda t: sum(ci * min(r_max, max(r_min, t * s)) for ci, s in zip(c, scores))  # noqa: E731
    if r_min * sum(c) == budget:
        x = [Fraction(r_min)] * n
    elif not pos:
        x = [Fraction(budget, sum(c))] * n
    elif f(r_max / min(pos)) >= budget:
        lo, hi = 0.0, r_max / min(pos)
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) < budget else (lo, mid)
        linear = [s > 0 and r_min < hi * s < r_max for s in scores]
        capped = [hi * s >= r_max for s in scores]
        slope = sum(ci * Fraction(s) for ci, s, lin in zip(c, scores, linear) if lin)
        offset = sum(ci * (r_max if cap else r_min) for ci, lin, cap in zip(c, linear, capped) if not lin)
        # no module strictly inside its bounds at hi: f is flat there and already equals the budget
        tau = (budget - offset) / slope if slope else Fraction(hi)
        x = [min(Fraction(r_max), max(Fraction(r_min), tau * Fraction(s))) for s in scores]
    else:  # positive modules saturated: zero-score modules share the rest at one rank
        rest = budget - r_max * sum(ci for ci, s in zip(c, scores) if s > 0)
        share = Fraction(rest, sum(ci for ci, s in zip(c, scores) if s == 0))
        x = [Fraction(r_max) if s > 0 else min(Fraction(r_max), max(Fraction(r_min), share)) for s in scores]
    eps = Fraction(1, 10**9)
    ranks = [math.floor(v + eps) for v in x]
    fracs = [round(v - r, 9) if v - r > eps else 0 for v, r in zip(x, ranks)]  # compared to 9 decimals
    left = budget - sum(ci * r for ci, r in zip(c, ranks))
    assert left >= 0
    order = sorted(range(n), key=lambda i: (-fracs[i], -scores[i], i))
    given = True
    while given:
        given = False
        for i in order:
            if ranks[i] < r_max and c[i] <= left:
                ranks[i] += 1
                left -= c[i]
                given = True
    return ranks


def load_benchmark(name: str):
    """A script of benchmarks/ as a module (they are scripts, not a package; their folder goes on sys.path so
    they import each other as they do when run)."""
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_adapter_readable_as_its_config(adapter_dir):
    """The weights file has the mode its JSON config has (what the umask gives; safetensors alone writes 0600)."""
    import stat
    from pathlib import Path

    adapter_dir = Path(adapter_dir)
    mode = {f: stat.S_IMODE((adapter_dir / f).stat().st_mode)
            for f in ("adapter_model.safetensors", "adapter_config.json")}
    assert mode["adapter_model.safetensors"] == mode["adapter_config.json"], mode
