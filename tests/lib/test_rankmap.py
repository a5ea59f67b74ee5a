"""Rank-map statistics, tables and plots."""

from __future__ import annotations

import fimlora
from fimlora.rankmap import format_rank_table, group_stats, plot_rank_map, split_name


def test_split_name():
    assert split_name("model.layers.12.self_attn.q_proj") == (12, "self_attn.q_proj")
    assert split_name("bert.encoder.layer.0.attention.output.dense") == (0, "attention.output.dense")
    assert split_name("bert.pooler.dense") == (None, "bert.pooler.dense")


def fake_alloc(ranks_by_layer):
    ranks = {}
    for l, row in enumerate(ranks_by_layer):
        for t, r in zip(("q_proj", "v_proj"), row):
            ranks[f"model.layers.{l}.self_attn.{t}"] = r
    return fimlora.RankAllocation(
        scores={k: float(v) for k, v in ranks.items()}, ranks=ranks, alphas={k: 2.0 * v for k, v in ranks.items()},
        old_ranks={k: 4 for k in ranks}, old_alphas={k: 8.0 for k in ranks}, shapes={k: [8, 8] for k in ranks},
        budget=sum(ranks.values()), r_min=1, r_max=8, base_r=4, base_alpha=8.0)


def test_group_stats_by_type_and_third():
    alloc = fake_alloc([[1, 8], [2, 6], [3, 5], [4, 4], [5, 3], [6, 2]])
    s = group_stats(alloc)
    assert s["mean_rank_by_type"] == {"self_attn.q_proj": 3.5, "self_attn.v_proj": 4.666666666666667}
    g = s["mean_rank_by_layer_group"]
    assert g["first"] == {"layers": [0, 1], "mean_rank": 17 / 4}
    assert g["last"] == {"layers": [4, 5], "mean_rank": 16 / 4}
    text = format_rank_table(alloc)
    assert "q_proj" in text and "mean rank by type" in text


def test_plot_writes_png(tmp_path):
    alloc = fake_alloc([[1, 8], [2, 6]])
    path = plot_rank_map(alloc, tmp_path / "m.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
