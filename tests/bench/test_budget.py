"""The long budget's levelled-off step against hand-worked curves."""

from __future__ import annotations

import pytest

from fimlora.bench.budget import levelled_off_step, smoothed


def test_smoothed_is_a_centred_mean_cut_at_the_ends():
    assert smoothed([1.0, 2.0, 3.0, 4.0, 5.0], 3) == [1.5, 2.0, 3.0, 4.0, 4.5]
    assert smoothed([3.0, 1.0], 1) == [3.0, 1.0]
    with pytest.raises(ValueError, match="window: must be an odd integer >= 1, got 4"):
        smoothed([1.0], 4)


def test_levelled_off_step_is_where_the_smoothed_loss_made_the_share_of_its_drop():
    # Exponential-like decay 2 -> 0.5: drop 1.5, 95% of it is reached when the loss is <= 0.575.
    curve = [[0, 2.0], [100, 1.0], [200, 0.7], [300, 0.58], [400, 0.56], [500, 0.5], [600, 0.5]]
    assert levelled_off_step(curve, window=1) == 400
    assert levelled_off_step(curve, window=1, share=0.5) == 100  # target 1.25
    # Noise: one lucky low point early does not end the curve once it is smoothed.
    noisy = [[0, 2.0], [100, 1.0], [200, 0.4], [300, 1.0], [400, 0.6], [500, 0.55], [600, 0.5], [700, 0.5]]
    assert levelled_off_step(noisy, window=1) == 200
    assert levelled_off_step(noisy, window=3) > 200
    assert levelled_off_step([[0, 1.0], [10, 1.2]], window=1) == 0  # never drops


@pytest.mark.parametrize(("curve", "kw", "needle"), [
    ([[0, 1.0]], {}, "curve: needs at least 2 evaluations, got 1"),
    ([[10, 1.0], [0, 0.5]], {}, r"curve: steps must increase, got \[10, 0\]"),
    ([[0, 1.0], [1, 0.5]], {"share": 0.0}, r"share: must be in \(0, 1\], got 0.0"),
])
def test_levelled_off_step_errors_name_the_field(curve, kw, needle):
    with pytest.raises(ValueError, match=needle):
        levelled_off_step(curve, **kw)


def test_curve_section_tabulates_each_run_s_levelled_off_step_and_draws_the_curves(tmp_path):
    from fimlora.bench.budget import curve_section

    curve = [[0, 2.0], [100, 1.0], [200, 0.7], [300, 0.58], [400, 0.56], [500, 0.5], [600, 0.5]]
    runs = [{"run_id": "t__lora__r2__s1", "method": "lora", "r": 2, "seed": 1, "learning_rate": 3e-3,
             "train_steps": 600, "validation_loss_curve": curve},
            {"run_id": "t__fim__r2__s1", "method": "fim", "r": 2, "seed": 1, "learning_rate": 1e-3,
             "train_steps": 600}]
    lines = curve_section(runs, "exp", tmp_path / "figs")
    table = "\n".join(lines)
    assert "| LoRA | 2 | 1 | 0.003 | 600 | 2.000 | 0.500 | " + str(levelled_off_step(curve)) + " |" in table
    assert "FIM-LoRA" not in table  # no curve recorded: not in the section
    assert (tmp_path / "figs" / "curves_exp.png").stat().st_size > 0
    assert curve_section(runs[1:], "exp", None) == []
