"""The builders every entry point shares: tokenizer checks, configs, loaders."""

from __future__ import annotations

import warnings

import pytest

from fimlora.app.builders import (
    FIM_DEFAULTS,
    build_fim_config,
    build_lora_config,
    check_tokenizer_coverage,
    task_type_for,
)
from fimlora.app.tasks import TaskData


class WordTokenizer:
    """Known words map to ids >= 1; everything else is the unknown token 0."""

    unk_token_id, unk_token = 0, "[UNK]"

    def __init__(self, vocab):
        self.vocab = {w: i + 1 for i, w in enumerate(vocab)}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.vocab.get(w, 0) for w in text.split()]}


def task(texts):
    return TaskData("t", "classification", [{"text": t, "label": i % 2} for i, t in enumerate(texts)], [], ["a", "b"])


def test_mostly_unknown_calibration_tokens_warn():
    tok = WordTokenizer(["good", "bad", "film"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_tokenizer_coverage(tok, task(["good film", "bad film"])) == 0.0
    with pytest.warns(UserWarning, match=r"tokenizer: 83% of the calibration tokens of 't' are unknown"):
        share = check_tokenizer_coverage(tok, task(["sehr gute film", "ganz schlecht gemacht"]))
    assert share == pytest.approx(5 / 6)


def test_fim_config_from_settings_names_unknown_keys():
    assert build_fim_config({"r_min": 2}, seed=3).r_min == 2
    assert FIM_DEFAULTS["n_batches"] == 8 and FIM_DEFAULTS["r_max"] is None
    with pytest.raises(ValueError, match=r"fim: unknown setting\(s\) \['rmin'\]"):
        build_fim_config({"rmin": 2})


def test_lora_config_for_each_kind():
    assert task_type_for("classification") == "SEQ_CLS" and task_type_for("multiple_choice") == "CAUSAL_LM"
    cfg = build_lora_config("classification", r=4)
    assert (cfg.r, cfg.lora_alpha, cfg.task_type) == (4, 8, "SEQ_CLS")


def test_all_linear_in_a_config_list_reaches_peft_as_the_shortcut():
    from fimlora.bench.methods import MethodSpec

    spec = MethodSpec(method="lora", r=2, lora_alpha=4, target_modules=["all-linear"], task_type="CAUSAL_LM")
    assert spec.target_modules == "all-linear"
    with pytest.raises(ValueError, match="cannot be combined"):
        MethodSpec(method="lora", r=2, lora_alpha=4, target_modules=["all-linear", "q_proj"], task_type="CAUSAL_LM")


def test_reload_adapter_is_stock_and_quiet(tmp_path):
    import warnings

    import torch

    from fimlora.app.builders import reload_adapter
    from tests.references import lm_batches, lora_llama, make_b_nonzero, tiny_llama

    model = lora_llama()
    make_b_nonzero(model, lm_batches())
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        reloaded = reload_adapter(tiny_llama(), tmp_path)
    assert not reloaded.training
    batch = lm_batches()[0]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=1e-6)
