"""Each task's own evaluation metrics, computed by scikit-learn and SciPy.

GLUE reports a metric of its own for each task (Wang et al., 2019), and AdaLoRA's protocol, which the
paper follows, keeps them: Matthews correlation for CoLA, Pearson and Spearman correlation for STS-B,
accuracy and F1 (of the positive class) for MRPC and QQP, matched and mismatched accuracy for MNLI,
accuracy for the rest. A result records every metric of its task; :data:`PAPER_METRIC` names the one
the paper's Table 1 shows in each column.

Every metric is a fraction (a correlation in [-1, 1]); the report shows them times 100, as the paper does.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from ..extras import require

__all__ = [
    "METRICS",
    "METRIC_LABELS",
    "GLUE_METRICS",
    "GLUE_COLUMNS",
    "PAPER_METRIC",
    "MISMATCHED",
    "glue_task",
    "default_metrics",
    "compute_metrics",
    "check_references",
]

# Every metric a task may ask for, and how a table header names it.
METRIC_LABELS = {"accuracy": "Acc", "f1": "F1", "matthews": "Mcc", "pearson": "Pearson", "spearman": "Spearman"}
METRICS = tuple(METRIC_LABELS)

# MNLI's second test set (validation_mismatched): its metrics are recorded with this suffix
# ("accuracy_mismatched"), beside the matched ones under the plain names.
MISMATCHED = "mismatched"

# GLUE task -> the metrics GLUE reports for it (MNLI's mismatched accuracy comes from its second split).
GLUE_METRICS = {
    "mnli": ("accuracy",),
    "sst2": ("accuracy",),
    "cola": ("matthews", "accuracy"),
    "mrpc": ("accuracy", "f1"),
    "qqp": ("accuracy", "f1"),
    "qnli": ("accuracy",),
    "stsb": ("pearson", "spearman"),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
}
# The paper's Table 1: column order and the metric each column shows. The paper does not name them;
# CoLA and STS-B follow GLUE and AdaLoRA. MRPC (92.22) and QQP (88.99) are F1: DeBERTa-v3-base's
# accuracy on them is about 90 and 92 (AdaLoRA's Table 1: LoRA MRPC acc 89.95, QQP acc/F1 91.99/89.38),
# and the paper's Avg (88.67 for LoRA) is the plain mean of the eight numbers shown.
GLUE_COLUMNS = ("mnli", "sst2", "cola", "mrpc", "qqp", "qnli", "stsb", "rte")
PAPER_METRIC = {"mnli": "accuracy", "sst2": "accuracy", "cola": "matthews", "mrpc": "f1", "qqp": "f1",
                "qnli": "accuracy", "stsb": "pearson", "rte": "accuracy"}
GLUE_DISPLAY = {"mnli": "MNLI", "sst2": "SST-2", "cola": "CoLA", "mrpc": "MRPC", "qqp": "QQP", "qnli": "QNLI",
                "stsb": "STS-B", "rte": "RTE", "wnli": "WNLI"}

# A GLUE task reached through the hub: "hf:glue:cola" (run ids spell it "hf-glue-cola", results name it
# "glue:cola"), also under an owner ("hf:nyu-mll/glue:cola").
_GLUE_NAME = re.compile(r"^(?:hf[:-])?(?:[A-Za-z0-9_.-]+[/-])?glue[:-]([a-z0-9_]+)$")


def glue_task(name: str) -> str | None:
    """The GLUE task (``"cola"``) a task name or run task label stands for, or None.

    Only GLUE's own data through ``hf:`` counts: the bundled ``sst2``/``mrpc`` are small-suite tasks
    (VADER training, a half validation split) whose reports stay in accuracy.
    """
    match = _GLUE_NAME.match(name)
    if match is None or match.group(1) not in GLUE_METRICS:
        return None
    return match.group(1)


def default_metrics(kind: str, num_labels: int = 0) -> tuple[str, ...]:
    """The metrics of a task that names none: correlations for regression, none for generation (scored by its
    loss), else accuracy (and F1 when binary)."""
    if kind == "generation":
        return ()
    if kind == "regression":
        return ("pearson", "spearman")
    if kind == "classification" and num_labels == 2:
        return ("accuracy", "f1")
    return ("accuracy",)


def _pearson(predictions, references) -> float:
    return float(require("scipy.stats", "metrics", "Pearson correlation").pearsonr(predictions, references)[0])


def _spearman(predictions, references) -> float:
    return float(require("scipy.stats", "metrics", "Spearman correlation").spearmanr(predictions, references)[0])


def _sklearn(name: str):
    return getattr(require("sklearn.metrics", "metrics", f"the {name} metric"), name)


_COMPUTE = {
    "accuracy": lambda p, r: float(_sklearn("accuracy_score")(r, p)),
    # GLUE's F1 is the positive class's (label 1: paraphrase, duplicate).
    "f1": lambda p, r: float(_sklearn("f1_score")(r, p, average="binary", pos_label=1, zero_division=0.0)),
    "matthews": lambda p, r: float(_sklearn("matthews_corrcoef")(r, p)),
    "pearson": _pearson,
    "spearman": _spearman,
}


CORRELATIONS = ("pearson", "spearman")


def compute_metrics(names: Sequence[str], predictions: Sequence, references: Sequence) -> dict[str, float]:
    """{metric: value} for each of ``names`` on predicted classes (or scores) against the references.

    A correlation is undefined when either side is constant, and the two cases differ. Constant predictions
    (a model that predicts one score) are the model's failure: reported as 0.0, as GLUE's scorer does for
    Matthews, instead of NaN. Constant references are the test set's: no model could be told apart by it,
    so it is an error (:func:`check_references`), which data loading raises before any training.
    """
    unknown = [n for n in names if n not in _COMPUTE]
    if unknown:
        raise ValueError(f"metrics: unknown metric(s) {unknown}; known: {list(METRICS)}")
    if len(predictions) != len(references) or not len(references):
        raise ValueError(f"metrics: need as many predictions as references, at least one; got "
                         f"{len(predictions)} predictions and {len(references)} references")
    check_references(names, references)
    out = {}
    for name in names:
        if name in CORRELATIONS and _constant(predictions):
            out[name] = 0.0
            continue
        value = _COMPUTE[name](list(predictions), list(references))
        out[name] = value if math.isfinite(value) else 0.0
    return out


def check_references(names: Sequence[str], references: Sequence, where: str = "metrics") -> None:
    """The references must give every metric in ``names`` a value: a correlation needs at least two distinct
    references. ``where`` names the test set in the error."""
    for name in names:
        if name in CORRELATIONS and len(references) and _constant(references):
            raise ValueError(f"{where}: {name}: every reference label is {references[0]!r}; a correlation with a "
                             "constant reference is undefined (no model can be told apart by it), so the test set "
                             "needs at least two distinct labels")


def _constant(values: Sequence) -> bool:
    return len(set(values)) < 2
