"""calibrate_trainer on TRL's SFTTrainer, for real: no mocks, a tiny seeded LLaMA and a word tokenizer built here.

What is checked, for plain text, packing (TRL's default "bfd", padding-free, and "wrapped"), completion-only loss
(prompt/completion data) and assistant-only loss (conversations with a chat template):

- both ways of handing SFTTrainer a LoRA model (a PeftModel, or a base model with peft_config) give the trainer a
  PeftModel that calibrate_trainer resizes;
- the calibration batches are the trainer's first training batches, labels (the masks) included;
- the scores are the Fisher of the loss SFTTrainer trains on: a reference that computes dL/dB from
  ``trainer.compute_loss`` on the same batches, and one from a cross-entropy over the unmasked tokens only, both
  equal fimlora's;
- changing the mask changes the scores.
"""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch

from fimlora.integrations import calibrate_trainer, preserved_rng
from fimlora.modules import lora_modules
from tests.references import b_weights, lora_llama, tiny_llama

pytestmark = pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("trl", "datasets")),
                                reason="TRL and datasets not installed (pip install 'fimlora[trl]')")

# Tests marked NEEDS_KBIT_DORA calibrate a bitsandbytes or DoRA adapter: they pass once apply_fim_ranks accepts those
# layers (issue 12, library part); until then it refuses them with "layer type ... is not supported".
NEEDS_KBIT_DORA = pytest.mark.xfail(reason="needs apply_fim_ranks support for bitsandbytes/DoRA LoRA layers",
                                    raises=ValueError, strict=False)

# ----------------------------------------------------------------------------- a word tokenizer for tiny_llama

SPECIAL = ["<pad>", "<unk>", "<eos>", "<user>", "<assistant>"]
WORDS = [f"w{i}" for i in range(64 - len(SPECIAL))]  # tiny_llama has 64 token ids
# {% generation %} marks the assistant's tokens for TRL's assistant-only loss; <eos> is inside it so the model learns
# to stop (TRL warns otherwise).
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<user> {{ m['content'] }} "
    "{% else %}<assistant> {% generation %}{{ m['content'] }} <eos>{% endgeneration %} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def word_tokenizer():
    """A fast tokenizer with one id per word and a chat template; no hub needed."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
                                   additional_special_tokens=["<user>", "<assistant>"], chat_template=CHAT_TEMPLATE)


# ----------------------------------------------------------------------------- data in TRL's three formats


def _words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def text_data(n: int = 48, seed: int = 0):
    from datasets import Dataset

    rng = random.Random(seed)
    return Dataset.from_list([{"text": _words(rng, 4, 12)} for _ in range(n)])


def prompt_completion_data(n: int = 48, seed: int = 0):
    """The completion starts with a space, so prompt + completion tokenizes as the two parts."""
    from datasets import Dataset

    rng = random.Random(seed)
    return Dataset.from_list([{"prompt": _words(rng, 3, 8), "completion": " " + _words(rng, 2, 5)} for _ in range(n)])


def conversation_data(n: int = 48, seed: int = 0):
    from datasets import Dataset

    rng = random.Random(seed)
    return Dataset.from_list([{"messages": [{"role": "user", "content": _words(rng, 3, 8)},
                                            {"role": "assistant", "content": _words(rng, 2, 5)}]} for _ in range(n)])


# case -> (data, SFTConfig settings, whether some real tokens are left out of the loss)
CASES = {
    "text": (text_data, {}, False),
    "packing_bfd": (text_data, {"packing": True, "max_length": 24}, False),
    "packing_wrapped": (text_data, {"packing": True, "packing_strategy": "wrapped", "max_length": 16}, False),
    "completion_only": (prompt_completion_data, {"completion_only_loss": True}, True),
    "assistant_only": (conversation_data, {"assistant_only_loss": True}, True),
}


SEED = 7


def sft_trainer(tmp_path, case: str, model=None, peft_config=None, **settings):
    """An SFTTrainer on the tiny LLaMA (lora_llama unless ``model``/``peft_config`` say otherwise)."""
    from trl import SFTConfig, SFTTrainer

    data, case_settings, _ = CASES[case]
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-2, max_steps=2,
                     report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, use_cpu=True, seed=SEED,
                     **{**case_settings, **settings})
    model = lora_llama() if model is None and peft_config is None else model
    return SFTTrainer(model=model, args=args, train_dataset=data(), processing_class=word_tokenizer(),
                      peft_config=peft_config)


class RecordingCollator:
    """Wraps the trainer's own collator and keeps a copy of every batch it builds."""

    def __init__(self, collator):
        self.collator, self.batches = collator, []

    def __call__(self, examples):
        batch = self.collator(examples)
        self.batches.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        return batch


def record_batches(trainer) -> RecordingCollator:
    trainer.data_collator = RecordingCollator(trainer.data_collator)
    return trainer.data_collator


def first_batches(trainer, n: int) -> list[dict]:
    """The first ``n`` batches of the trainer's training dataloader, without disturbing any random state."""
    with preserved_rng():
        loader = iter(trainer.get_train_dataloader())
        return [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in next(loader).items()}
                for _ in range(n)]


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert sorted(a) == sorted(b)
        for k in a:
            assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k], k


# ----------------------------------------------------------------------------- references


class TrainerLoss:
    """The loss SFTTrainer trains on (TRL's fused LM head, its token count), as a ``loss_fn(model, batch)``."""

    def __init__(self, trainer):
        self.trainer = trainer

    def __call__(self, model, batch) -> torch.Tensor:
        return self.trainer.compute_loss(model, dict(batch))  # compute_loss adds keys to the batch it is given


def masked_token_loss(model, batch) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose label is not -100, written out by hand."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    return torch.nn.functional.cross_entropy(logits[keep], targets[keep])


def reference_scores(model, batches, loss_fn) -> dict[str, float]:
    """Mean over B's entries of (1/N) sum_b (dL_b/dB)^2, from plain autograd; the model is not changed."""
    model.eval()
    weights = b_weights(model)
    acc = {n: torch.zeros_like(w, dtype=torch.float64) for n, w in weights.items()}
    for batch in batches:
        grads = torch.autograd.grad(loss_fn(model, batch), list(weights.values()))
        for n, g in zip(weights, grads):
            acc[n] += g.double() ** 2
    return {n: float((a / len(batches)).mean()) for n, a in acc.items()}


def assert_scores_close(got: dict, want: dict, rtol: float = 1e-4) -> None:
    assert list(got) == list(want)
    scale = max(abs(v) for v in want.values())
    for n in want:
        assert got[n] == pytest.approx(want[n], rel=rtol, abs=rtol * scale), n


# ----------------------------------------------------------------------------- tests


def test_both_ways_of_giving_sft_trainer_lora_give_calibrate_trainer_a_peft_model(tmp_path):
    """A PeftModel is used as given; a base model with peft_config is wrapped by SFTTrainer itself."""
    from peft import LoraConfig, PeftModel, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    base = tiny_llama()
    torch.manual_seed(SEED)  # SFTTrainer calls set_seed(args.seed) right before its own get_peft_model
    given = get_peft_model(base, LoraConfig(**config.to_dict()))
    by_model = sft_trainer(tmp_path / "a", "text", model=given)
    assert by_model.model is given
    by_config = sft_trainer(tmp_path / "b", "text", model=tiny_llama(), peft_config=config)
    assert isinstance(by_config.model, PeftModel) and by_config.model is not given
    for a, b in zip(lora_modules(by_model.model), lora_modules(by_config.model)):
        assert a.name == b.name and torch.equal(a.layer.lora_A["default"].weight, b.layer.lora_A["default"].weight)
    allocations = [calibrate_trainer(t, n_batches=2, progress=False, save=False) for t in (by_model, by_config)]
    assert allocations[0].ranks == allocations[1].ranks  # same base, same A, same batches: same ranks
    assert len(set(allocations[0].ranks.values())) > 1
    for trainer, allocation in zip((by_model, by_config), allocations):
        assert {i.name: i.r for i in lora_modules(trainer.model)} == allocation.ranks
        trainer.train()  # the optimizer is built now, on the resized parameters


@pytest.mark.parametrize("case", sorted(CASES))
def test_calibration_batches_are_the_first_training_batches_with_their_masks(tmp_path, case):
    trainer = sft_trainer(tmp_path, case)
    recorder = record_batches(trainer)
    calibrate_trainer(trainer, n_batches=2, progress=False, save=False)
    calibration = recorder.batches[:2]  # accelerate's DataLoaderShard builds one batch ahead
    recorder.batches.clear()
    trainer.train()
    assert_same_batches(recorder.batches[:2], calibration)
    labels = torch.cat([b["labels"].flatten() for b in calibration])
    real = torch.cat([b["attention_mask"].flatten() for b in calibration]) == 1 if "attention_mask" in calibration[0] \
        else torch.ones_like(labels, dtype=torch.bool)
    masked_real_tokens = int(((labels == -100) & real).sum())
    if CASES[case][2]:  # prompts / user turns are real tokens the loss leaves out
        assert masked_real_tokens > 0.2 * int(real.sum())
    if case == "packing_bfd":  # padding-free: one row per batch, documents told apart by position_ids
        assert calibration[0]["input_ids"].shape[0] == 1 and "position_ids" in calibration[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_scores_are_the_fisher_of_the_masked_training_loss(tmp_path, case):
    trainer = sft_trainer(tmp_path, case)
    batches = first_batches(trainer, 3)
    by_trainer = reference_scores(trainer.model, batches, TrainerLoss(trainer))
    by_hand = reference_scores(trainer.model, batches, masked_token_loss)
    assert_scores_close(by_hand, by_trainer)  # the hand-written masked loss is the loss SFTTrainer trains on
    recorder = record_batches(trainer)
    allocation = calibrate_trainer(trainer, n_batches=3, progress=False, save=False)
    assert_same_batches(recorder.batches[:3], batches)
    assert_scores_close(allocation.scores, by_trainer)


@pytest.mark.parametrize("case, unmasked", [("completion_only", {"completion_only_loss": False}),
                                            ("assistant_only", {"assistant_only_loss": False})])
def test_changing_the_mask_changes_the_scores(tmp_path, case, unmasked):
    masked = sft_trainer(tmp_path / "masked", case)
    full = sft_trainer(tmp_path / "full", case, **unmasked)
    masked_batches, full_batches = first_batches(masked, 2), first_batches(full, 2)
    for m, f in zip(masked_batches, full_batches):  # the same tokens; only the labels differ
        assert torch.equal(m["input_ids"], f["input_ids"]) and not torch.equal(m["labels"], f["labels"])
    scores = [calibrate_trainer(t, n_batches=2, progress=False, save=False).scores for t in (masked, full)]
    assert list(scores[0]) == list(scores[1])
    differ = [n for n in scores[0] if scores[0][n] != pytest.approx(scores[1][n], rel=0.05)]
    assert len(differ) > len(scores[0]) // 2, differ


@pytest.mark.parametrize("settings", [{"loss_type": "dft"}, {"label_smoothing_factor": 0.2}],
                         ids=["dft", "label_smoothing"])
def test_scores_follow_a_training_loss_other_than_nll(tmp_path, settings):
    trainer = sft_trainer(tmp_path, "completion_only", **settings)
    batches = first_batches(trainer, 2)
    by_trainer = reference_scores(trainer.model, batches, TrainerLoss(trainer))
    nll = reference_scores(trainer.model, batches, masked_token_loss)
    assert any(by_trainer[n] != pytest.approx(nll[n], rel=1e-3) for n in nll)  # this loss really is another one
    assert_scores_close(calibrate_trainer(trainer, n_batches=2, progress=False, save=False).scores, by_trainer)


def _save_tiny_llama(folder) -> str:
    model = tiny_llama()
    model.save_pretrained(folder)
    return str(folder)


def test_sft_trainer_qlora_4bit_base_all_linear(tmp_path):
    """The QLoRA recipe: NF4 base, prepare_model_for_kbit_training, peft_config with all-linear, then calibrate."""
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from fimlora.app.builders import build_quantization_config, quantized_device_map

    base = AutoModelForCausalLM.from_pretrained(_save_tiny_llama(tmp_path / "base"), dtype=torch.float32,
                                                quantization_config=build_quantization_config("4bit"),
                                                device_map=quantized_device_map())
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = sft_trainer(tmp_path / "out", "completion_only", model=base, peft_config=config)
    assert {type(i.layer).__name__ for i in lora_modules(trainer.model)} == {"Linear4bit"}
    lora_dtypes = {p.dtype for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert lora_dtypes == {torch.bfloat16}  # SFTTrainer casts LoRA weights on a quantised base to bf16 (QLoRA)
    allocation = calibrate_trainer(trainer, n_batches=2, progress=False)
    assert {p.dtype for n, p in trainer.model.named_parameters() if "lora_" in n} == lora_dtypes  # kept by resize
    assert len(allocation.ranks) == 14 and sum(allocation.ranks.values()) == 14 * 4
    assert {i.name: i.r for i in lora_modules(trainer.model)} == allocation.ranks
    trainer.train()
    assert (tmp_path / "out" / "rank_map.json").exists()


def test_sft_trainer_dora(tmp_path):
    trainer = sft_trainer(tmp_path, "assistant_only", model=lora_llama(use_dora=True))
    allocation = calibrate_trainer(trainer, n_batches=2, progress=False, save=False)
    assert {i.name: i.r for i in lora_modules(trainer.model)} == allocation.ranks
    trainer.train()
