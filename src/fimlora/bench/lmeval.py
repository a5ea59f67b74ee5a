"""lm-evaluation-harness as the decoder evaluator of the paper-scale configs (the paper's own choice).

The paper scores Llama-3-8B zero-shot on seven tasks with lm-evaluation-harness and reports accuracy.
:func:`lm_eval_scores` runs a (reloaded) adapter model through ``lm_eval.simple_evaluate`` and returns
``acc`` and ``acc_norm`` per task:

* with the network, on lm-eval's own tasks (:data:`LM_EVAL_TASKS`: their prompts, their test splits);
* offline, on tasks defined here over the bundled test questions (:func:`write_local_tasks`), written so
  that lm-eval sees exactly the strings our own scorer (:func:`~.data.choice_logliks`) sees: the
  context, then each choice with the separator our scorer puts between them.

On those local tasks lm-eval's ``acc`` and our accuracy answer the same question (the choice of
highest summed log-likelihood); ``tests/bench/test_lmeval.py`` checks that they agree and the
docs/experiments.md says where they can differ (lm-eval tokenises context and continuation together).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..extras import require

__all__ = ["LM_EVAL_TASKS", "LOCAL_PREFIX", "write_local_tasks", "lm_eval_scores"]

logger = logging.getLogger(__name__)

# Our bundled task -> lm-evaluation-harness's task of the same data (the paper's seven: ARC-c, ARC-e,
# BoolQ, HellaSwag, OBQA, PIQA, WinoGrande).
LM_EVAL_TASKS = {"arc_challenge": "arc_challenge", "arc_easy": "arc_easy", "boolq_mc": "boolq",
                 "hellaswag": "hellaswag", "obqa": "openbookqa", "piqa": "piqa", "winogrande": "winogrande"}
# Local task names are ours prefixed, so they never shadow lm-eval's own.
LOCAL_PREFIX = "fimlora_"


def _separator(context: str) -> str:
    """What our scorer puts between a context and a choice (see ``data._encode_pair``)."""
    return " " if context and not context.endswith((" ", "\n")) else ""


def write_local_tasks(tasks, folder: str | Path) -> dict[str, str]:
    """lm-eval task YAMLs (and their JSONL data) for multiple-choice tasks' test questions; {our name: task name}.

    Each choice is stored with our separator in front and lm-eval's ``target_delimiter`` is empty, so the
    context and continuation strings are ours exactly.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = {}
    for task in tasks:
        if task.kind != "multiple_choice":
            raise ValueError(f"lm_eval: task {task.name!r} is {task.kind}; lm-eval scores multiple-choice tasks only")
        name = LOCAL_PREFIX + task.name
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps({"context": e["context"],
                                            "choices": [_separator(e["context"]) + c for c in e["choices"]],
                                            "answer": e["answer"]}) + "\n" for e in task.test), encoding="utf-8")
        (folder / f"{name}.yaml").write_text("\n".join([
            f"task: {name}",
            "dataset_path: json",
            "dataset_kwargs:",
            "  data_files:",
            f"    test: {json.dumps(str(data.resolve()))}",
            "test_split: test",
            "output_type: multiple_choice",
            'doc_to_text: "{{context}}"',
            'doc_to_choice: "{{choices}}"',
            'doc_to_target: "{{answer}}"',
            'target_delimiter: ""',
            "metric_list:",
            "  - metric: acc",
            "  - metric: acc_norm",
            "",
        ]), encoding="utf-8")
        names[task.name] = name
    return names


def lm_eval_scores(model, tokenizer, task_names: dict[str, str], batch_size: int = 16,
                   include_path: str | Path | None = None) -> dict[str, dict]:
    """{our task: {"accuracy": acc, "acc_norm", "n", "primary": "accuracy", "evaluator"}} from lm-eval.

    ``task_names`` maps our task names to lm-eval's (:data:`LM_EVAL_TASKS` or :func:`write_local_tasks`);
    ``include_path`` is the folder of local task YAMLs, if any. Zero-shot, as in the paper.
    """
    lm_eval = require("lm_eval", "lmeval", "evaluating with lm-evaluation-harness")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(task_names.values()), task_manager=manager, num_fewshot=0,
                                  log_samples=False)
    version = getattr(lm_eval, "__version__", "?")
    scores = {}
    for ours, theirs in task_names.items():
        result = out["results"][theirs]
        scores[ours] = {"accuracy": float(result["acc,none"]), "acc_norm": float(result["acc_norm,none"]),
                        "n": int(out["n-samples"][theirs]["effective"]), "primary": "accuracy",
                        "evaluator": f"lm-eval {version}: {theirs}"}
    return scores
