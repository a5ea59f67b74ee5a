"""Each task's own metrics against values worked out by hand on small arrays."""

from __future__ import annotations

import math

import pytest

from fimlora.app.metrics import GLUE_METRICS, compute_metrics, default_metrics, glue_task

pytest.importorskip("sklearn")
pytest.importorskip("scipy")

# TP = 2 (items 0, 3), TN = 2 (1, 5), FP = 1 (2), FN = 1 (4).
PRED = [1, 0, 1, 1, 0, 0]
GOLD = [1, 0, 0, 1, 1, 0]


def test_classification_metrics_by_hand():
    got = compute_metrics(["accuracy", "f1", "matthews"], PRED, GOLD)
    assert got["accuracy"] == pytest.approx(4 / 6)
    assert got["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # 2TP / (2TP + FP + FN)
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (4 - 1) / sqrt(81)
    assert got["matthews"] == pytest.approx(3 / 9)


def test_f1_is_the_positive_class_not_an_average():
    # Class 1 found once of twice, never wrongly: F1(1) = 2/3; F1(0) = 6/7; their mean would be 0.76.
    assert compute_metrics(["f1"], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0])["f1"] == pytest.approx(2 / 3)


def test_correlations_by_hand():
    pred, gold = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 5.0, 9.0]
    got = compute_metrics(["pearson", "spearman"], pred, gold)
    # deviations (-1.5, -.5, .5, 1.5) and (-3, -1, 0, 4): 11 / sqrt(5 * 26)
    assert got["pearson"] == pytest.approx(11 / math.sqrt(130))
    assert got["spearman"] == pytest.approx(1.0)  # the same order
    # ranks differ by (0, 1, -1, 0): 1 - 6 * 2 / (4 * (16 - 1))
    assert compute_metrics(["spearman"], [1, 2, 3, 4], [1, 3, 2, 4])["spearman"] == pytest.approx(0.8)


def test_a_constant_prediction_has_correlation_zero_not_nan():
    got = compute_metrics(["pearson", "spearman"], [0.5, 0.5, 0.5], [1.0, 2.0, 3.0])
    assert got == {"pearson": 0.0, "spearman": 0.0}
    assert compute_metrics(["matthews"], [1, 1, 1], [0, 1, 1]) == {"matthews": 0.0}  # one class predicted


def test_a_constant_reference_is_an_error_not_a_score():
    """Issue 20, 7: with every reference equal no model can be told apart; 0.0 would hide a broken test set."""
    for name in ("pearson", "spearman"):
        with pytest.raises(ValueError, match=rf"metrics: {name}: every reference label is 2.0; a correlation with a "
                                             r"constant reference is undefined"):
            compute_metrics([name], [1.0, 2.0, 3.0], [2.0, 2.0, 2.0])
    # Other metrics are defined there, and a constant prediction stays a score of 0.
    assert compute_metrics(["accuracy"], [1, 1], [1, 1]) == {"accuracy": 1.0}


@pytest.mark.parametrize("names, pred, gold, needle", [
    (["auc"], [1], [1], r"unknown metric\(s\) \['auc'\]"),
    (["accuracy"], [1, 0], [1], "need as many predictions as references"),
    (["accuracy"], [], [], "at least one"),
])
def test_bad_input_names_the_rule(names, pred, gold, needle):
    with pytest.raises(ValueError, match=needle):
        compute_metrics(names, pred, gold)


def test_glue_names_and_default_metrics():
    assert glue_task("hf:glue:cola") == "cola" and glue_task("hf-glue-stsb") == "stsb"
    assert glue_task("glue:mnli") == "mnli"  # a hub task's own name (the spec without hf:)
    assert glue_task("hf:nyu-mll/glue:qqp") == "qqp"
    assert glue_task("mrpc") is None and glue_task("hf:glue:nope") is None and glue_task("sst2") is None
    assert GLUE_METRICS["stsb"] == ("pearson", "spearman") and GLUE_METRICS["cola"][0] == "matthews"
    assert default_metrics("regression") == ("pearson", "spearman")
    assert default_metrics("classification", 2) == ("accuracy", "f1")
    assert default_metrics("classification", 6) == ("accuracy",)
    assert default_metrics("multiple_choice") == ("accuracy",)
    assert default_metrics("generation") == ()
