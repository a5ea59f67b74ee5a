"""Bad files reach the user as one clear line (exit 2) or a PROBLEM list (exit 1), never a traceback."""

from __future__ import annotations

import json

import pytest

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


def test_a_config_whose_task_file_is_missing_stops_before_any_run(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: c\nmodel: minilm\nmethods: [lora]\nseeds: [1]\nranks: [2]\n"
                   f"tasks: ['{tmp_path}/nope.jsonl']\n")
    code, text = run(capsys, "run", str(cfg), "--results", str(tmp_path / "r"))
    assert code == 2 and f"tasks[0]: {tmp_path}/nope.jsonl does not exist" in text
    assert not (tmp_path / "r").exists()


def test_list_shows_failed_runs(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: c\nmodel: minilm\nmethods: [lora]\nseeds: [1, 2]\nranks: [2]\ntasks: [sst2]\n")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "sst2__lora__r2__s1.error.json").write_text('{"status": "failed"}')
    code, text = run(capsys, "run", str(cfg), "--results", str(tmp_path / "r"), "--list")
    assert code == 0 and "failed sst2__lora__r2__s1" in text and "todo   sst2__lora__r2__s2" in text


def test_plot_of_a_missing_file_names_the_argument(tmp_path, capsys):
    code, text = run(capsys, "plot", str(tmp_path / "nope.json"))
    assert code == 2 and f"rank_map: {tmp_path / 'nope.json'} does not exist" in text


def test_r_min_above_the_default_r_max_blames_r_min():
    import pytest

    import fimlora

    needle = r"r_min: must be <= r_max, and r_max defaults to 2r = 8 \(r = 4\); got r_min=9"
    with pytest.raises(ValueError, match=needle):
        fimlora.compute_allocation(lora_llama(), lm_batches(), fimlora.FimConfig(r_min=9, progress=False))


def test_target_modules_that_match_nothing_are_named_with_the_real_names():
    import pytest

    from fimlora.app.builders import build_lora_config, build_peft_model
    from tests.references import tiny_bert

    with pytest.raises(ValueError, match=r"target_modules: \['q_proj'\] match no module of "
                                         r"BertForSequenceClassification \(every name must match one\); its linear "
                                         r"layers are named \['query'"):
        build_peft_model(tiny_bert(), build_lora_config("classification", 2, target_modules=["q_proj"]))


def test_one_misspelt_target_module_among_good_ones_is_refused_and_the_base_left_alone():
    """PEFT adapts whatever part of a list matches; a typo must not silently drop that projection."""
    import pytest

    from fimlora.app.builders import build_lora_config, build_peft_model, unmatched_target_modules
    from tests.references import tiny_bert

    base = tiny_bert()
    before = [name for name, _ in base.named_modules()]
    with pytest.raises(ValueError, match=r"target_modules: \['qeury'\] match no module of "):
        build_peft_model(base, build_lora_config("classification", 2, target_modules=["qeury", "value"]))
    assert [name for name, _ in base.named_modules()] == before
    # PEFT's list rule: the whole name or a dotted suffix of it, never a bare substring
    def unmatched(targets, **kw):
        return unmatched_target_modules(base, build_lora_config("classification", 2, target_modules=targets, **kw))

    assert unmatched(["value", "attention.output.dense", "output.dense"]) == []
    assert unmatched(["alue", "ttention.output.dense"]) == ["alue", "ttention.output.dense"]
    assert unmatched("q.*") == [] and unmatched(None) == []
    # a name whose every match is excluded selects nothing, as PEFT applies exclude_modules
    from peft import LoraConfig

    assert unmatched_target_modules(base, LoraConfig(target_modules=["query", "key"], exclude_modules=["key"])) == [
        "key"]
    # a regex is PEFT's to match; when it selects nothing the same error names it
    with pytest.raises(ValueError, match=r"target_modules: '.\*nothing' match no module of "
                                         r"BertForSequenceClassification \(PEFT targets none\); its linear layers"):
        build_peft_model(base, LoraConfig(target_modules=".*nothing", task_type="SEQ_CLS"))


TASK_HEAD = (r"target_modules: 'classifier' selects classifier, trained whole as modules_to_save \['classifier', "
             r"'score'\] \(the task head of BertForSequenceClassification\), and cannot take LoRA; its linear layers "
             r"are named \['query', 'key', 'value', 'dense'\]$")


@pytest.mark.parametrize("settings, message", [
    ({"target_modules": ["classifier"]}, TASK_HEAD),
    ({"target_modules": ["query", "classifier"]}, TASK_HEAD),
    ({"target_modules": ["query", "key"], "exclude_modules": ["key"]},
     r"target_modules: 'key' matches 2 module\(s\) of BertForSequenceClassification \(e.g. "
     r"bert.encoder.layer.0.attention.self.key\), but exclude_modules=\{'key'\} removed every one; its linear "
     r"layers are named \['query', 'key', 'value', 'dense'\]$"),
    ({"target_modules": ["query"], "layers_to_transform": [5]},
     r"target_modules: 'query' matches 2 module\(s\) .* but layers_to_transform=\[5\] removed every one; "),
    ({"target_modules": ["query"], "exclude_modules": "bert.*", "layers_to_transform": [5]},
     r" but exclude_modules='bert.\*' and layers_to_transform=\[5\] removed every one; "),
    ({"target_modules": r".*\.query", "exclude_modules": ["query"]},
     r"target_modules: '.\*\\\\.query' matches 2 module\(s\) .* but exclude_modules=\{'query'\} removed every one"),
    ({"target_modules": ["query", "LayerNorm"]},
     r"target_modules: 'LayerNorm' selects bert.embeddings.LayerNorm, a non-linear module of type LayerNorm that LoRA "
     r"cannot adapt; its linear layers are named \['query', 'key', 'value', 'dense'\]$"),
    ({"target_modules": ["embeddings"]}, r"target_modules: 'embeddings' selects bert.embeddings, a non-linear module "
                                         r"of type BertEmbeddings that LoRA cannot adapt; "),
], ids=["head", "head-among-good", "excluded", "layers", "both", "regex-excluded", "norm", "block"])
def test_target_modules_that_select_nothing_lora_can_adapt_say_why_before_peft(settings, message):
    from fimlora.app.builders import build_lora_config, build_peft_model
    from tests.references import tiny_bert

    base = tiny_bert()
    before = [name for name, _ in base.named_modules()]
    with pytest.raises(ValueError, match=message) as info:
        build_peft_model(base, build_lora_config("classification", 2, **settings))
    assert "\n" not in str(info.value)
    assert [name for name, _ in base.named_modules()] == before


def test_target_modules_that_lora_can_adapt_pass():
    from fimlora.app.builders import build_lora_config, build_peft_model
    from tests.references import tiny_bert, tiny_llama

    model = build_peft_model(tiny_bert(), build_lora_config("classification", 2, target_modules=["word_embeddings"]))
    assert "default" in model.base_model.model.bert.embeddings.word_embeddings.lora_embedding_A
    model = build_peft_model(tiny_llama(), build_lora_config("lm", 2, target_modules=["q_proj", "lm_head"]))
    assert "default" in model.base_model.model.lm_head.lora_A


def test_a_regex_whose_matches_filters_remove_only_in_part_passes():
    """A regex target some of whose matches exclude_modules removes still selects the rest: refused only when the
    filters remove every match (PEFT takes no layers_to_transform with a regex)."""
    from fimlora.app.builders import build_lora_config, build_peft_model
    from tests.references import tiny_bert

    for settings in ({"exclude_modules": r".*layer\.1\..*"},
                     {"exclude_modules": ["bert.encoder.layer.1.attention.self.query"]}):
        model = build_peft_model(tiny_bert(), build_lora_config("classification", 2, target_modules=r".*\.query",
                                                                **settings))
        adapted = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and n.endswith("query")]
        assert adapted == ["base_model.model.bert.encoder.layer.0.attention.self.query"], settings


@pytest.mark.parametrize("targets, message", [
    (["classifier"], "target_modules: 'classifier' selects classifier, trained whole as modules_to_save"),
    (["query", "classifier"], "target_modules: 'classifier' selects classifier, trained whole as modules_to_save"),
    (["LayerNorm"], "target_modules: 'LayerNorm' selects bert.embeddings.LayerNorm, a non-linear module of type "
                    "LayerNorm that LoRA cannot adapt; its linear layers are named ['query', 'key', 'value', "
                    "'dense']"),
], ids=["head", "head-among-good", "norm"])
def test_calibrate_refuses_target_modules_in_one_line_before_calibrating(tmp_path, capsys, monkeypatch, targets,
                                                                          message):
    import fimlora.app.jobs as jobs

    def never(*args, **kwargs):
        raise AssertionError("calibration started before target_modules were checked")

    monkeypatch.setattr(jobs, "build_calibration_loader", never)
    code, text = run(capsys, "calibrate", "--model", "minilm", "--n-layers", "1", "--data", "trec6", "--max-train",
                     "16", "--target-modules", *targets, "--out", str(tmp_path / "out"))
    assert code == 2 and message in text, text
    assert len([line for line in text.splitlines() if "target_modules" in line]) == 1 and "Traceback" not in text
    assert not (tmp_path / "out").exists()


def test_version(capsys):
    import pytest

    import fimlora

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"fimlora {fimlora.__version__}"


def test_negative_seed_fails_before_calibration(tmp_path, capsys, monkeypatch):
    import fimlora.app.jobs as jobs

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the seed was checked")

    monkeypatch.setattr(jobs, "build_base_model", never)
    code, text = run(capsys, "calibrate", "--model", "minilm", "--data", "sst2", "--seed", "-1",
                     "--out", str(tmp_path / "out"))
    assert code == 2 and "seed: must be >= 0, got -1" in text and "Traceback" not in text
    assert not (tmp_path / "out").exists()


def test_a_misspelt_model_alias_is_named_with_the_aliases_and_the_close_one():
    """Offline (conftest), a name that is no folder and no alias fails as a hub name; the error says so, lists the
    aliases and suggests the near one, in every loader a command reaches first."""
    import pytest

    from fimlora.app.models import load_causal_lm, load_classifier, load_tokenizer

    aliases = r"model: 'minlm' is not a local folder or an offline alias \(minilm, smollm2\), and loading it as a hub"
    for load in (load_tokenizer, lambda n: load_classifier(n, 2), load_causal_lm):
        with pytest.raises(ValueError, match=aliases + r".*; did you mean the alias 'minilm'\?$"):
            load("minlm")
    with pytest.raises(ValueError, match=r"model: 'someorg/no-such-model' is not .*hub name failed \(.+\)$"):
        load_tokenizer("someorg/no-such-model")
    from fimlora.app.models import base_module_shapes

    with pytest.raises(ValueError, match=aliases + r".*; did you mean the alias 'minilm'\?$"):
        base_module_shapes("minlm")  # check --base-model


def test_log_lines_have_the_shape_of_warning_lines():
    import logging

    from fimlora.cli import _UserFormatter

    def line(name, level, msg):
        return _UserFormatter().format(logging.LogRecord(name, level, __file__, 1, msg, None, None))

    assert line("fimlora.app.jobs", logging.WARNING, "model: cut") == "fimlora: warning: model: cut"
    assert line("fimlora", logging.INFO, "fimlora: converting") == "fimlora: info: converting"
    assert line("transformers.modeling_utils", logging.ERROR, "x") == "transformers.modeling_utils: error: x"
