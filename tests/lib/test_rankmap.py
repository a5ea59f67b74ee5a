"""Rank-map statistics, tables and plots."""

from __future__ import annotations

import json
import re
import sys

import pytest

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


@pytest.mark.parametrize("n, groups", [(1, {"first": [0, 0]}), (2, {"first": [0, 0], "last": [1, 1]}),
                                       (3, {"first": [0, 0], "middle": [1, 1], "last": [2, 2]}),
                                       (4, {"first": [0, 0], "middle": [1, 2], "last": [3, 3]}),
                                       (6, {"first": [0, 1], "middle": [2, 3], "last": [4, 5]}),
                                       (30, {"first": [0, 9], "middle": [10, 19], "last": [20, 29]})])
def test_layer_groups_have_equal_first_and_last_and_a_middle_only_between(n, groups):
    """Two layers are "first" and "last", not "first" and "middle" (a new user's 2-layer run)."""
    g = group_stats(fake_alloc([[1, 1]] * n))["mean_rank_by_layer_group"]
    assert {k: v["layers"] for k, v in g.items()} == groups


def test_plot_writes_png(tmp_path):
    alloc = fake_alloc([[1, 8], [2, 6]])
    path = plot_rank_map(alloc, tmp_path / "m.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def png_size(path):
    """(width, height) from the PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_png_grows_with_layers_and_module_types(tmp_path):
    small = png_size(plot_rank_map(fake_alloc([[1, 8], [2, 6]]), tmp_path / "small.png"))
    tall = png_size(plot_rank_map(fake_alloc([[1, 8], [2, 6]] * 6), tmp_path / "tall.png"))
    assert tall[0] == small[0] and tall[1] > small[1] + 100
    ranks_only = png_size(plot_rank_map(fake_alloc([[1, 8], [2, 6]]), tmp_path / "ranks.png", scores=False))
    assert ranks_only[0] < small[0] and ranks_only[1] == small[1]


def test_svg_holds_every_rank_as_text(tmp_path):
    alloc = fake_alloc([[1, 8], [2, 6], [3, 5]])
    svg = plot_rank_map(alloc, tmp_path / "m.svg", title="my rank map").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    cells = re.findall(r"<text[^>]*>([^<]*)</text>", svg)
    assert "my rank map" in cells
    for r in alloc.ranks.values():
        assert str(r) in cells, r
    assert "9" not in cells


def test_plot_without_numbered_layers_is_a_value_error(tmp_path):
    alloc = fimlora.RankAllocation(
        scores={"pooler.dense": 1.0, "classifier": 2.0}, ranks={"pooler.dense": 3, "classifier": 5},
        alphas={"pooler.dense": 6.0, "classifier": 10.0}, old_ranks={"pooler.dense": 4, "classifier": 4},
        old_alphas={"pooler.dense": 8.0, "classifier": 8.0}, shapes={"pooler.dense": [8, 8], "classifier": [8, 2]},
        budget=8, r_min=1, r_max=8, base_r=4, base_alpha=8.0)
    with pytest.raises(ValueError, match=r"rank map: no module name has a layer index .*got \['pooler.dense', "
                                         r"'classifier'\]"):
        plot_rank_map(alloc, tmp_path / "m.png")
    assert not (tmp_path / "m.png").exists()


def test_plot_without_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    needle = r"plot_rank_map: drawing the rank map needs the 'matplotlib' package.*pip install 'fimlora\[plot\]'"
    with pytest.raises(ImportError, match=needle):
        plot_rank_map(fake_alloc([[1, 8]]), tmp_path / "m.png")


# ----------------------------------------------------------------------------- reading rank maps


def write_map(tmp_path, change):
    d = fake_alloc([[1, 8], [2, 6]]).to_dict()
    change(d)
    path = tmp_path / "rank_map.json"
    path.write_text(json.dumps(d))
    return path


def test_rank_map_roundtrip(tmp_path):
    alloc = fake_alloc([[1, 8], [2, 6]])
    text = alloc.to_json(tmp_path / "m.json")
    assert fimlora.RankAllocation.from_json(tmp_path / "m.json") == alloc == fimlora.RankAllocation.from_json(text)


BAD_MAPS = [
    (lambda d: d.update(extra=1, colour="red"), r"rank map: unknown key\(s\) \['colour', 'extra'\]"),
    (lambda d: d.update(ranks=[1, 2]), r"ranks: must be an object mapping module name -> value, got list"),
    (lambda d: d.update(shapes="8x8"), r"shapes: must be an object mapping module name -> value, got str"),
    (lambda d: d.update(module_order=["model.layers.0.self_attn.q_proj"]),
     r"module_order: keys must be exactly the keys of ranks; missing \['model.layers.0.self_attn.v_proj'"),
    (lambda d: d.pop("alphas"), r"alphas: missing from the rank map"),
    (lambda d: d.update(budget=3), r"ranks: must sum to budget=3, got 17"),
]


@pytest.mark.parametrize("change, pattern", BAD_MAPS, ids=["unknown", "ranks-list", "shapes-str", "order", "missing",
                                                           "budget"])
def test_bad_rank_map_names_key_and_file(tmp_path, change, pattern):
    path = write_map(tmp_path, change)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": " + pattern):
        fimlora.RankAllocation.from_json(path)


def test_rank_map_not_an_object_or_not_json(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": rank map: must be a JSON object, got list"):
        fimlora.RankAllocation.from_json(path)
    path.write_text('{"ranks": ')
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": not valid JSON"):
        fimlora.RankAllocation.from_json(path)
    with pytest.raises(ValueError, match=r"rank map: unknown key\(s\) \['x'\]"):
        fimlora.RankAllocation.from_dict({**fake_alloc([[1, 8]]).to_dict(), "x": 0})


def test_cli_plot_reports_bad_rank_map_without_traceback(tmp_path, capsys):
    from fimlora.cli import main

    path = write_map(tmp_path, lambda d: d.update(extra=1))
    assert main(["plot", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"fimlora plot: error: {path}: rank map: unknown key(s) ['extra']" in err
    assert "Traceback" not in err


def with_confidence(alloc, unstable):
    """A bootstrap summary where ``unstable`` modules keep their rank in 50% of resamples, the rest in all."""
    names = list(alloc.ranks)
    alloc.confidence = {
        "n_resamples": 200, "seed": 0, "level": 0.9, "threshold": 0.9, "unit": "batch", "n_units": 8,
        "score_low": {n: 0.0 for n in names}, "score_high": {n: 1.0 for n in names},
        "rank_low": dict(alloc.ranks), "rank_high": dict(alloc.ranks),
        "agreement": {n: 0.5 if n in unstable else 1.0 for n in names},
        "stable_share": 1 - len(unstable) / len(names)}
    return alloc


def test_unstable_ranks_are_marked_in_table_and_picture_and_kept_in_json(tmp_path):
    alloc = with_confidence(fake_alloc([[1, 8], [2, 6], [3, 5]]), {"model.layers.1.self_attn.v_proj"})
    table = format_rank_table(alloc)
    assert re.search(r"^\s+1\s+2\s+6\?$", table, re.MULTILINE), table
    assert re.search(r"^\s+0\s+1\s+8$", table, re.MULTILINE), table
    assert ("stable: 83% of modules keep their rank in >= 90% of 200 bootstrap resamples of the 8 calibration "
            "batches; ? marks the 1 that do not") in table
    svg = plot_rank_map(alloc, tmp_path / "m.svg").read_text()
    cells = re.findall(r"<text[^>]*>([^<]*)</text>", svg)
    assert "6?" in cells and "8" in cells and "8?" not in cells
    alloc.to_json(tmp_path / "map.json")
    back = fimlora.RankAllocation.from_json(tmp_path / "map.json")
    assert back.confidence == alloc.confidence and back.unstable_modules() == ["model.layers.1.self_attn.v_proj"]
    assert "?" not in format_rank_table(fake_alloc([[1, 8], [2, 6], [3, 5]])).split("LoRA params")[0]
    all_stable = format_rank_table(with_confidence(fake_alloc([[1, 8], [2, 6], [3, 5]]), set()))
    assert "batches; none is marked ?" in all_stable and "marks the 0" not in all_stable


def test_rank_stats_and_the_plot_take_a_plain_rank_map(tmp_path):
    """A run's recorded {module: rank} needs no allocation (the report built one with made-up shapes before)."""
    from fimlora.rankmap import rank_stats

    alloc = fake_alloc([[1, 8], [2, 6], [3, 5]])
    assert rank_stats(dict(alloc.ranks)) == {k: v for k, v in group_stats(alloc).items() if k not in ("base_r",
                                                                                                    "budget")}
    pytest.importorskip("matplotlib")
    svg = plot_rank_map(dict(alloc.ranks), tmp_path / "plain.svg", scores=dict(alloc.scores)).read_text()
    assert "log10 score" in svg and "rank map" in svg and "budget" not in svg
    assert "log10 score" not in plot_rank_map(dict(alloc.ranks), tmp_path / "ranks.svg", scores=False).read_text()


def test_an_allocation_refuses_a_module_of_cost_0_in_rank_units_too():
    alloc = fake_alloc([[1, 8]])
    d = {**alloc.__dict__, "shapes": {n: [0, 0] for n in alloc.ranks}, "costs": None, "params_spent": None}
    with pytest.raises(ValueError, match=r"costs\['model.layers.0.self_attn.q_proj'\]: must be >= 1, got 0"):
        fimlora.RankAllocation(**d)
