"""Training: the validation-loss curve is measured along the way without changing what is trained."""

from __future__ import annotations

import pytest
import torch

from fimlora.app.train import TrainSettings, finetune, validation_loss_curve


def _train(tmp_path, eval_steps: int, name: str):
    from fimlora.app.models import load_classifier, load_tokenizer
    from fimlora.app.tasks import load_task
    from fimlora.bench.methods import MethodSpec, prepare_method

    task = load_task("trec6", max_train=48, max_test=8, max_validation=12)
    tok = load_tokenizer("minilm")
    spec = MethodSpec(method="lora", r=2, lora_alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS",
                      seed=0)
    model, _, _ = prepare_method(spec, load_classifier("minilm", 6, 1, seed=0))
    settings = TrainSettings(learning_rate=1e-2, max_steps=5, batch_size=8, max_length=24, progress=False, seed=3,
                             eval_steps=eval_steps, eval_batch_size=5)
    out = finetune(model, task, tok, settings, str(tmp_path / name))
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, trained


def test_validation_curve_is_logged_before_and_every_eval_steps_and_changes_no_weight(tmp_path):
    plain, plain_weights = _train(tmp_path, 0, "plain")
    logged, logged_weights = _train(tmp_path, 2, "logged")
    assert "validation_loss_curve" not in plain
    steps = [s for s, _ in logged["validation_loss_curve"]]
    assert steps == [0, 2, 4, 5]  # before the first step, every eval_steps, and after the last
    assert all(loss > 0 for _, loss in logged["validation_loss_curve"])
    # Dropout is on (MiniLM's 0.1) while training: equal weights mean the evaluations drew no random numbers.
    assert plain_weights.keys() == logged_weights.keys()
    for name, value in plain_weights.items():
        torch.testing.assert_close(logged_weights[name], value, rtol=0, atol=0, msg=name)
    assert logged["train_loss"] == plain["train_loss"]


def test_validation_curve_reads_only_eval_entries():
    history = [{"loss": 1.0, "step": 1}, {"eval_loss": 0.5, "step": 0}, {"eval_loss": 0.25, "step": 2}]
    assert validation_loss_curve(history) == [[0, 0.5], [2, 0.25]]


def test_eval_steps_must_not_be_negative():
    with pytest.raises(ValueError, match="eval_steps"):
        TrainSettings(eval_steps=-1)
