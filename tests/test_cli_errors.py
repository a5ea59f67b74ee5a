"""Bad files reach the user as one clear line (exit 2) or a PROBLEM list (exit 1), never a traceback."""

from __future__ import annotations

import json

from fimlora.cli import main
from tests.references import lm_batches, lora_llama


def run(capsys, *args) -> tuple[int, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def rank_map(tmp_path):
    import fimlora

    model = lora_llama()
    alloc = fimlora.compute_allocation(model, lm_batches(), fimlora.FimConfig(n_batches=2, progress=False))
    path = tmp_path / "rank_map.json"
    alloc.to_json(path)
    return model, alloc, path


def test_plot_of_a_rank_map_with_an_extra_key(tmp_path, capsys):
    _, _, path = rank_map(tmp_path)
    record = json.loads(path.read_text())
    record["colour"] = "blue"
    path.write_text(json.dumps(record))
    code, text = run(capsys, "plot", str(path))
    assert code == 2 and "colour" in text and str(path) in text and "Traceback" not in text


def test_run_with_a_yaml_syntax_error_names_the_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: c\nmodel: minilm\nmethods: [lora\nseeds: [1]\n")
    code, text = run(capsys, "run", str(cfg), "--results", str(tmp_path / "r"), "--list")
    assert code == 2 and f"config: {cfg}: line" in text and "not valid YAML" in text


def test_check_of_a_config_that_is_a_list(tmp_path, capsys):
    model, _, _ = rank_map(tmp_path)
    model.save_pretrained(tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_config.json").write_text("[1, 2]")
    code, text = run(capsys, "check", str(tmp_path / "adapter"))
    assert code == 1 and "PROBLEM" in text and "adapter_config.json" in text
