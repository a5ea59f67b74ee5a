"""``fimlora export``: each engine's documented scale rule, applied to the exported tensors, gives PEFT's logits.

No engine runs here (tests/lib/test_serving_llamacpp.py runs llama.cpp itself). The engine is emulated the only
way that does not reuse the code under test: the exported folder is loaded in PEFT and every LoRA layer's scaling
is overwritten with the engine's rule, computed here from the exported config and the tensors' own ranks
(vLLM <= 0.31: lora_alpha / r, / sqrt(r) with rsLoRA; llama.cpp: lora_alpha / r_m, rsLoRA ignored). Then the
logits are compared with the original adapter's in PEFT. The same emulation on the unexported adapter must
differ, or the test could not fail.
"""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch
from peft import PeftModel

import fimlora
from fimlora.check import check_adapter
from fimlora.export import EXPORT_RECORD, compute_export
from fimlora.modules import lora_modules
from tests.references import cls_batches, lm_batches, lora_bert, lora_llama, make_b_nonzero, tiny_bert, tiny_llama

TOL = 1e-5  # float32 logits of a 2-layer model; B' is computed in float64 and rounded once


def trained_adapter(tmp_path, name="a", r=4, **settings):
    """A fimlora adapter with mixed ranks and a non-zero B, saved, and its model (the PEFT reference)."""
    model = lora_llama(r=r, use_rslora=settings.pop("use_rslora", False))
    fimlora.apply_fim_ranks(model, lm_batches(), n_batches=2, progress=False, **settings)
    make_b_nonzero(model, lm_batches())
    model.save_pretrained(tmp_path / name)
    return tmp_path / name, model


def engine_logits(folder, engine, ids):
    """Logits of the adapter in ``folder`` as ``engine`` computes them: PEFT's forward with the engine's scales."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    model = PeftModel.from_pretrained(tiny_llama(), str(folder)).eval()
    for info in lora_modules(model):
        rank = info.layer.lora_A["default"].weight.shape[0]
        if engine == "vllm":
            root = math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"]
            scale = cfg["lora_alpha"] / root
        elif engine == "llama.cpp":
            scale = cfg["lora_alpha"] / rank
        else:
            continue  # PEFT: its own scaling
        info.layer.scaling["default"] = scale
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def ids():
    return lm_batches()[0]["input_ids"][:2]


def reference_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def adapter_effect(model, ids):
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids).logits
    return (reference_logits(model, ids) - base).abs().max().item()


@pytest.mark.parametrize("engine, settings", [
    ("llama.cpp", {}),                                       # default scale: llama.cpp is off by r / r_m
    ("llama.cpp", {"use_rslora": True}),                     # rsLoRA, which the converter ignores
    ("vllm", {"scale": "fixed_alpha"}),                      # per-module alpha, which vLLM <= 0.31 ignores
    ("vllm", {"scale": "fixed_alpha", "use_rslora": True}),
], ids=["llamacpp-default", "llamacpp-rslora", "vllm-fixed-alpha", "vllm-fixed-alpha-rslora"])
def test_export_makes_the_engine_rule_give_peft_logits(tmp_path, ids, engine, settings):
    src, model = trained_adapter(tmp_path, **settings)
    ref = reference_logits(model, ids)
    assert adapter_effect(model, ids) > 1e-3  # the adapter changes the logits, so a wrong scale shows
    before = (engine_logits(src, engine, ids) - ref).abs().max().item()
    assert before > 1e-3, "the unexported adapter is served right already: this case tests nothing"
    fimlora.export_adapter(src, engine, tmp_path / "out")
    after = (engine_logits(tmp_path / "out", engine, ids) - ref).abs().max().item()
    assert after < TOL, (before, after)
    # The export still reloads in plain PEFT with the original logits.
    assert (engine_logits(tmp_path / "out", "peft", ids) - ref).abs().max().item() < TOL
    report = check_adapter(tmp_path / "out", serve=engine)
    assert report.ok, report.format()


@pytest.mark.parametrize("engine", ["vllm", "llama.cpp"])
def test_export_reads_a_caret_pipe_key_as_peft_does(tmp_path, ids, engine):
    """``^a|b`` is (^a)|b under PEFT's regex: v_proj of every layer gets rank 8 and alpha 32, not only layer 0's.
    Read otherwise, the export served delta W four times too small there and check --serve said OK."""
    key = "^model.layers.0.self_attn.q_proj|v_proj"
    model = lora_llama(rank_pattern={key: 8}, alpha_pattern={key: 32})
    make_b_nonzero(model, lm_batches())
    model.save_pretrained(tmp_path / "a")
    ref = reference_logits(model, ids)
    fimlora.export_adapter(tmp_path / "a", engine, tmp_path / "out")
    assert (engine_logits(tmp_path / "out", engine, ids) - ref).abs().max().item() < TOL
    assert check_adapter(tmp_path / "out", serve=engine).ok


def test_vllm_export_of_a_default_adapter_copies_b_unchanged(tmp_path):
    src, _ = trained_adapter(tmp_path)
    plan = fimlora.export_adapter(src, "vllm", tmp_path / "out")
    assert set(plan.b_factors.values()) == {1.0}
    from safetensors.torch import load_file

    a, b = load_file(src / "adapter_model.safetensors"), load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_llamacpp_export_config_and_record(tmp_path):
    src, model = trained_adapter(tmp_path, use_rslora=True)
    plan = fimlora.export_adapter(src, "llama.cpp", tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    src_cfg = json.loads((src / "adapter_config.json").read_text())
    assert cfg["alpha_pattern"] == {} and cfg["use_rslora"] is False and cfg["lora_alpha"] == src_cfg["lora_alpha"]
    ranks = {i.name: i.r for i in lora_modules(model)}
    assert {n: r for n, r in ranks.items() if r != cfg["r"]} == cfg["rank_pattern"]
    # B'_m = B_m * (alpha_m / sqrt(r_m)) / (alpha / r_m), with alpha_m = alpha * sqrt(r_m / r) (rsLoRA preserve).
    alpha, r = src_cfg["lora_alpha"], src_cfg["r"]
    for name, r_m in ranks.items():
        expected = (alpha * math.sqrt(r_m / r) / math.sqrt(r_m)) / (alpha / r_m)
        assert plan.b_factors[name] == pytest.approx(expected, rel=1e-12)
    record = json.loads((tmp_path / "out" / EXPORT_RECORD).read_text())
    assert record["engine"] == "llama.cpp" and record["source"] == str(src.resolve())
    assert record["ranks"] == ranks and "peft" in record["versions"] and "convert_lora_to_gguf" in record["serve"]


def test_merged_export_gives_peft_logits(tmp_path, ids):
    src, model = trained_adapter(tmp_path)
    fimlora.export_adapter(src, "merged", tmp_path / "out", base_model=tiny_llama())
    from transformers import LlamaForCausalLM

    merged = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    assert (got - reference_logits(model, ids)).abs().max().item() < TOL
    assert json.loads((tmp_path / "out" / EXPORT_RECORD).read_text())["engine"] == "merged"


def test_merged_export_refuses_a_base_with_more_layers_than_the_adapter(tmp_path):
    """An adapter made on a 2-layer cut would merge onto 4 layers with layers 2-3 un-adapted: refused."""
    src, _ = trained_adapter(tmp_path)
    with pytest.raises(ValueError, match=r"fails `fimlora check` against base_model .*28 base module\(s\) match "
                                         r"target_modules but have no LoRA tensors .*give the same --n-layers N "
                                         r"with the base"):
        fimlora.export_adapter(src, "merged", tmp_path / "out", base_model=tiny_llama(layers=6))
    assert not (tmp_path / "out").exists()


def test_merged_export_with_n_layers_merges_onto_the_cut_base_by_name(tmp_path, ids):
    """The same adapter onto a saved 6-layer base named by folder, with n_layers=2: merged onto the base cut as the
    adapter was made, it computes what PEFT computes on that cut base; n_layers where nothing is loaded by name is
    refused before anything is written."""
    from transformers import LlamaForCausalLM

    from fimlora.modules import cut_layers

    src, _ = trained_adapter(tmp_path)
    tiny_llama(layers=6).save_pretrained(tmp_path / "base6")
    fimlora.export_adapter(src, "merged", tmp_path / "out", base_model=str(tmp_path / "base6"), n_layers=2)
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert merged.config.num_hidden_layers == 2 and len(merged.model.layers) == 2
    cut = cut_layers(LlamaForCausalLM.from_pretrained(tmp_path / "base6"), 2)
    peft = PeftModel.from_pretrained(cut, str(src)).eval()
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - peft(input_ids=ids).logits).abs().max().item() < TOL
    for engine, base in (("vllm", None), ("merged", tiny_llama(layers=6))):
        with pytest.raises(ValueError, match=rf"n_layers: cuts the base model that --for merged loads by folder or "
                                             rf"hub name; got n_layers=2 with engine '{engine}'"):
            fimlora.export_adapter(src, engine, tmp_path / engine, base_model=base, n_layers=2)
        assert not (tmp_path / engine).exists()


def test_merged_export_onto_a_base_that_cannot_be_loaded_names_base_model(tmp_path):
    src, _ = trained_adapter(tmp_path)
    with pytest.raises(ValueError, match=r"^base_model: 'no-such-org/no-such-base' could not be loaded as a model "
                                         r"folder or hub name \(.+\)$"):
        fimlora.export_adapter(src, "merged", tmp_path / "out", base_model="no-such-org/no-such-base")
    assert not (tmp_path / "out").exists()


def test_merged_export_onto_another_model_names_base_model(tmp_path):
    src, _ = trained_adapter(tmp_path)
    with pytest.raises(ValueError, match=r"base_model: .* has none of the adapter's target modules \(target_modules="
                                         r".*q_proj.*; give the model the adapter was made for"):
        fimlora.export_adapter(src, "merged", tmp_path / "out", base_model=tiny_bert())
    assert not (tmp_path / "out").exists()


def test_export_after_dropping_modules(tmp_path, ids):
    src, model = trained_adapter(tmp_path, r_min=0, budget_unit="params", budget_fraction=0.5)
    kept = {i.name for i in lora_modules(model)}
    assert len(kept) < 14  # some modules were dropped: absent from target_modules and the tensors
    fimlora.export_adapter(src, "llama.cpp", tmp_path / "out")
    assert set(compute_export(tmp_path / "out", "peft").ranks) == kept
    fimlora.export_adapter(src, "merged", tmp_path / "merged", base_model=tiny_llama())  # dropped: not "missing"
    assert (engine_logits(tmp_path / "out", "llama.cpp", ids) - reference_logits(model, ids)).abs().max() < TOL


# ----------------------------------------------------------------------------- refusals and bad input


def test_export_refuses_dora_for_engines_that_cannot_serve_it(tmp_path):
    model = lora_llama(use_dora=True)
    model.save_pretrained(tmp_path / "a")
    for engine in ("vllm", "llama.cpp"):
        with pytest.raises(ValueError, match=rf"engine: {engine} cannot serve .*use_dora=True \(DoRA\)"):
            fimlora.export_adapter(tmp_path / "a", engine, tmp_path / engine)
        assert not (tmp_path / engine).exists()
    fimlora.export_adapter(tmp_path / "a", "peft", tmp_path / "peft")  # PEFT serves DoRA itself


def test_vllm_takes_classifier_heads_but_refuses_other_modules_to_save(tmp_path):
    from safetensors.torch import load_file

    model = lora_bert()  # a classifier: PEFT saves the head through modules_to_save ['classifier', 'score']
    model.save_pretrained(tmp_path / "a")
    report = check_adapter(tmp_path / "a")
    assert report.ok and report.serving["vllm"].refusals == [], report.format()
    assert not any("served wrongly by vLLM" in n for n in report.notes), report.format()
    assert any("classification heads: vLLM >= 0.31 loads them, for a classification model only; vLLM <= 0.30 "
               "refuses any modules_to_save" in n for n in report.notes), report.format()
    assert check_adapter(tmp_path / "a", serve="vllm").ok
    fimlora.export_adapter(tmp_path / "a", "vllm", tmp_path / "out")
    src, out = load_file(tmp_path / "a" / "adapter_model.safetensors"), load_file(tmp_path / "out" /
                                                                                  "adapter_model.safetensors")
    heads = [k for k in src if "classifier" in k]
    assert heads and all(torch.equal(src[k], out[k]) for k in heads)  # the head copied as it is
    with pytest.raises(ValueError, match=r"llama.cpp cannot serve .*modules_to_save=\['classifier'"):
        fimlora.export_adapter(tmp_path / "a", "llama.cpp", tmp_path / "gguf")
    lora_bert(modules_to_save=["pooler"]).save_pretrained(tmp_path / "b")
    assert any("modules_to_save" in r for r in check_adapter(tmp_path / "b").serving["vllm"].refusals)
    with pytest.raises(ValueError, match=r"vllm cannot serve .*modules_to_save=\[.*'pooler'.*export --for merged"):
        fimlora.export_adapter(tmp_path / "b", "vllm", tmp_path / "out-b")


def test_export_output_rules(tmp_path):
    src, _ = trained_adapter(tmp_path)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep")
    with pytest.raises(ValueError, match=r"out: .*busy is not empty \(it holds x\); choose a new or empty folder"):
        fimlora.export_adapter(src, "vllm", tmp_path / "busy")
    with pytest.raises(ValueError, match=r"out: .*busy was not written by fimlora"):
        fimlora.export_adapter(src, "vllm", tmp_path / "busy", overwrite=True)
    assert (tmp_path / "busy" / "x").read_text() == "keep"
    fimlora.export_adapter(src, "vllm", tmp_path / "v")
    fimlora.export_adapter(src, "llama.cpp", tmp_path / "v", overwrite=True)  # an earlier export is replaced
    assert json.loads((tmp_path / "v" / EXPORT_RECORD).read_text())["engine"] == "llama.cpp"
    with pytest.raises(ValueError, match=r"engine: must be one of \['peft', 'vllm', 'llama.cpp', 'merged'\], "
                                         r"got 'ollama'"):
        compute_export(src, "ollama")
    with pytest.raises(ValueError, match="base_model: export --for merged needs the base model"):
        fimlora.export_adapter(src, "merged", tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_export_refuses_out_that_is_or_contains_the_source(tmp_path):
    src, _ = trained_adapter(tmp_path)
    before = (src / "adapter_model.safetensors").read_bytes()
    for out in (src, tmp_path, src / ".." / src.name):
        where = re.escape(os.path.abspath(out))
        with pytest.raises(ValueError, match=rf"out: {where} holds the input {src.resolve()}; writing there could "
                                             "delete it"):
            fimlora.export_adapter(src, "vllm", out, overwrite=True)
    assert (src / "adapter_model.safetensors").read_bytes() == before
    fimlora.export_adapter(src, "peft", src / "copy")  # a folder inside the source does not replace it


def test_export_overwrite_into_the_working_directory_deletes_nothing(tmp_path, monkeypatch, capsys):
    """Reported: `fimlora export A --for peft --out "$PWD" --overwrite` wiped the working directory."""
    from fimlora.cli import main

    src, _ = trained_adapter(tmp_path / "adapters")
    work = tmp_path / "work"
    (work / "project").mkdir(parents=True)
    (work / "project" / "train.py").write_text("print('mine')")
    (work / "notes.md").write_text("mine")
    monkeypatch.chdir(work)
    for out in (str(work), "."):
        assert main(["export", str(src), "--for", "peft", "--out", out, "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert f"out: {work} was not written by fimlora" in err and "notes.md, project" in err, err
    assert (work / "project" / "train.py").read_text() == "print('mine')" and (work / "notes.md").exists()
    assert sorted(p.name for p in work.iterdir()) == ["notes.md", "project"]


def test_merged_export_never_replaces_the_base_model_it_reads(tmp_path):
    """--out at or above the --base-model folder: the base is among the protected inputs even where the folder is an
    earlier fimlora output that --overwrite may otherwise replace."""
    from fimlora.io import atomic_directory

    src, _ = trained_adapter(tmp_path)
    earlier = tmp_path / "earlier"
    with atomic_directory(earlier) as tmp:  # an earlier output that holds a model (a merged export, say)
        tiny_llama().save_pretrained(tmp / "base")
    base = earlier / "base"
    before = sorted(p.name for p in base.iterdir())
    for out in (base, earlier):
        with pytest.raises(ValueError, match=rf"out: {re.escape(str(out))} holds the input {base.resolve()}"):
            fimlora.export_adapter(src, "merged", out, base_model=str(base), overwrite=True)
        assert sorted(p.name for p in base.iterdir()) == before
    fimlora.export_adapter(src, "merged", tmp_path / "merged", base_model=str(base))  # the base itself is fine


def test_missing_adapter_folder_is_named(tmp_path):
    from fimlora.cli import main

    missing = tmp_path / "doesnotexist"
    report = check_adapter(missing)
    assert report.problems == [f"{missing}: does not exist"]
    with pytest.raises(ValueError, match=f"adapter: {missing}: does not exist"):
        fimlora.export_adapter(missing, "vllm", tmp_path / "out")
    assert main(["check", str(missing)]) == 1


def test_export_refuses_an_adapter_that_fails_check(tmp_path):
    src, _ = trained_adapter(tmp_path)
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {k: v + 1 for k, v in cfg["rank_pattern"].items()}
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="fails `fimlora check`.*config gives rank"):
        compute_export(src, "vllm")


# ----------------------------------------------------------------------------- the command line


def test_cli_export_and_check_serve(tmp_path, capsys):
    from fimlora.cli import main

    src, _ = trained_adapter(tmp_path)
    assert main(["check", str(src), "--serve", "llama.cpp"]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM: llama.cpp (Ollama, LM Studio): scales" in out
    assert f"run `fimlora export {src} --for llama.cpp --out DIR`" in out
    assert main(["export", str(src), "--for", "llama.cpp", "--out", str(tmp_path / "gguf-ready")]) == 0
    assert "lora_B rescaled in" in capsys.readouterr().out
    assert main(["check", str(tmp_path / "gguf-ready"), "--serve", "llama.cpp"]) == 0
    assert "llama.cpp (Ollama, LM Studio): serves it as PEFT computes it" in capsys.readouterr().out
    assert main(["export", str(src), "--for", "vllm", "--out", str(tmp_path / "gguf-ready")]) == 2
    assert "is not empty (it holds" in capsys.readouterr().err
    assert main(["export", str(src), "--for", "vllm", "--out", str(tmp_path / "v"), "--base-model", "x"]) == 2
    assert "base-model: only --for merged uses a base model, got --for vllm" in capsys.readouterr().err


def test_cli_merged_classifier(tmp_path):
    """A SEQ_CLS adapter merges onto a base loaded with as many labels as its saved head."""
    from fimlora.cli import main

    tiny_bert().save_pretrained(tmp_path / "base")
    model = lora_bert()
    make_b_nonzero(model, cls_batches())
    model.save_pretrained(tmp_path / "a")
    assert main(["export", str(tmp_path / "a"), "--for", "merged", "--out", str(tmp_path / "m"),
                 "--base-model", str(tmp_path / "base")]) == 0
    from transformers import BertForSequenceClassification

    merged = BertForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    batch = {k: v for k, v in cls_batches()[0].items() if k != "labels"}
    with torch.no_grad():
        assert (merged(**batch).logits - model(**batch).logits).abs().max().item() < TOL


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "tokenizer.model")


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_merged_export_of_a_base_without_tokenizer_files_saves_none_and_says_so(tmp_path, caplog, arch):
    """transformers builds BERT a 5-token and GPT-2 a 1-token tokenizer from a folder without tokenizer files;
    saving that beside the merged model would turn every word into one token."""
    from tests.references import lora_gpt2, tiny_gpt2

    if arch == "bert":
        tiny_bert().save_pretrained(tmp_path / "base")
        model = lora_bert(modules_to_save=["classifier"])
        make_b_nonzero(model, cls_batches())
    else:
        tiny_gpt2().save_pretrained(tmp_path / "base")
        model = lora_gpt2()
        make_b_nonzero(model, lm_batches())
    model.save_pretrained(tmp_path / "a")
    with caplog.at_level("WARNING", logger="fimlora"):
        fimlora.export_adapter(tmp_path / "a", "merged", tmp_path / "m", base_model=str(tmp_path / "base"))
    assert not [f for f in TOKENIZER_FILES if (tmp_path / "m" / f).exists()]
    assert f"{tmp_path / 'base'} has no tokenizer" in caplog.text and "saved without one" in caplog.text


def test_merged_export_keeps_a_real_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from fimlora.app.models import resolve_model

    minilm = resolve_model("minilm")
    lora_bert(modules_to_save=["classifier"]).save_pretrained(tmp_path / "a")
    _, tokenizer = fimlora.export.load_base_model(minilm, tmp_path / "a")
    assert tokenizer is not None and len(tokenizer) == len(AutoTokenizer.from_pretrained(minilm)) > 1000


# ----------------------------------------------------------------------------- issue 28: crashes and small items


@pytest.mark.parametrize("engine", ["vllm", "llama.cpp"])
def test_export_of_a_name_inside_another_keeps_one_key_per_module(tmp_path, engine):
    """fimlora's own adapter for ``fc`` and ``inner.fc`` (keys ^fc$ / inner.fc): the export's patterns must give each
    module its own rank and the engine's scale; plain names made ``fc`` match ``inner.fc`` too (a RuntimeError)."""
    from fimlora import allocation_from_scores, apply_allocation
    from tests.lib.test_drop_modules import Nested, nested_lora

    model = nested_lora()
    apply_allocation(model, allocation_from_scores(model, {"fc": 1.0, "inner.fc": 0.2}, r_min=1, scale="fixed_alpha"))
    with torch.no_grad():
        for i in lora_modules(model):
            i.layer.lora_B["default"].weight.normal_()
    model.save_pretrained(tmp_path / "a")
    plan = fimlora.export_adapter(tmp_path / "a", engine, tmp_path / "out")
    assert len(set(plan.ranks.values())) == 2
    assert check_adapter(tmp_path / "out", serve=engine).ok
    reloaded = PeftModel.from_pretrained(Nested(), str(tmp_path / "out"))
    assert {i.name: i.r for i in lora_modules(reloaded)} == plan.ranks
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (reloaded(x) - model(x)).abs().max().item() < TOL


@pytest.mark.parametrize("names", [["fc", "inner.fc"], ["a.fc", "b.a.fc"], ["inner.fc", "inner_fc"],
                                   ["model.layers.1.q", "model.layers.11.q", "x.model.layers.1.q"]])
def test_pattern_keys_match_one_module_each(names):
    """The keys an export writes: each matches its own module and no other of the adapter's, by PEFT's rule, whatever
    the names share (a whole dotted tail such as a.fc inside b.a.fc, not only the last part)."""
    from fimlora.modules import pattern_keys, pattern_matches

    keys = pattern_keys(names)
    for name in names:
        assert [n for n in names if pattern_matches(keys[name], n)] == [name], (name, keys[name])


def test_a_rank_above_vllm_s_limit_blocks_only_the_vllm_export(tmp_path):
    model = lora_llama(r=600, target_modules=["q_proj", "v_proj"])
    make_b_nonzero(model, lm_batches())
    model.save_pretrained(tmp_path / "a")
    report = check_adapter(tmp_path / "a")
    assert report.ok, report.format()
    assert any("vLLM <= 0.31: refuses it: rank 600 exceeds vLLM's largest --max-lora-rank 512" in n
               for n in report.notes), report.notes
    assert not check_adapter(tmp_path / "a", serve="vllm").ok
    assert check_adapter(tmp_path / "a", serve="llama.cpp").ok
    with pytest.raises(ValueError, match="engine: vllm cannot serve .*rank 600 exceeds vLLM's largest "
                                         "--max-lora-rank 512; export --for merged"):
        fimlora.export_adapter(tmp_path / "a", "vllm", tmp_path / "v")
    for engine in ("peft", "llama.cpp"):
        fimlora.export_adapter(tmp_path / "a", engine, tmp_path / engine)
    fimlora.export_adapter(tmp_path / "a", "merged", tmp_path / "merged", base_model=tiny_llama())


def test_llamacpp_export_writes_the_lora_alpha_peft_used(tmp_path, ids):
    """A config without lora_alpha means PEFT's default 8; llama.cpp's converter reads lparams["lora_alpha"]."""
    src, model = trained_adapter(tmp_path, r=8)
    cfg = json.loads((src / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == 16
    del cfg["lora_alpha"]
    cfg["alpha_pattern"] = {}  # so that PEFT's default 8 applies everywhere
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    ref = engine_logits(src, "peft", ids)
    for engine in ("llama.cpp", "vllm"):
        fimlora.export_adapter(src, engine, tmp_path / engine)
        out = json.loads((tmp_path / engine / "adapter_config.json").read_text())
        assert out["lora_alpha"] == 8 and out["r"] == 8
        assert (engine_logits(tmp_path / engine, engine, ids) - ref).abs().max().item() < TOL


def test_export_leaves_a_checkpoint_s_training_state_behind(tmp_path):
    src, _ = trained_adapter(tmp_path)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"):
        (src / name).write_bytes(b"x" * 64)
    for name in ("README.md", "tokenizer.json", "tokenizer_config.json", "rank_map.json"):
        (src / name).write_text("{}")
    (src / "runs").mkdir()
    plan = fimlora.export_adapter(src, "vllm", tmp_path / "out")
    copied = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert copied == sorted([".fimlora-output.json", "README.md", "adapter_config.json", "adapter_model.safetensors",
                             EXPORT_RECORD, "rank_map.json", "tokenizer.json", "tokenizer_config.json"])
    assert plan.left_out == ["optimizer.pt", "rng_state.pth", "runs", "scheduler.pt", "trainer_state.json",
                             "training_args.bin"]
    assert json.loads((tmp_path / "out" / EXPORT_RECORD).read_text())["left_out"] == plan.left_out


def test_llamacpp_export_of_lora_alpha_zero_is_refused_by_name(tmp_path):
    """PEFT scales by 0/r = 0 and llama.cpp reads alpha 0 as scale 1: no factor folded into B makes them agree."""
    src, _ = trained_adapter(tmp_path)
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(lora_alpha=0, alpha_pattern={})
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"lora_alpha: must be > 0 to export for llama.cpp \(it reads alpha 0 as "
                                         r"scale 1 and PEFT as scale 0\), got 0"):
        fimlora.export_adapter(src, "llama.cpp", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_vllm_export_of_lora_alpha_zero_is_scale_zero_on_both_sides(tmp_path):
    """lora_alpha 0 is valid PEFT: vLLM's 0/r and PEFT's 0/r_m agree, so the export copies B; only a module PEFT
    scales otherwise (an alpha_pattern entry) cannot be fixed by a factor in B, and is refused by name."""
    src, _ = trained_adapter(tmp_path)
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(lora_alpha=0, alpha_pattern={})
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    plan = fimlora.export_adapter(src, "vllm", tmp_path / "out")
    assert set(plan.served_scales.values()) == set(plan.peft_scales.values()) == {0.0}
    assert set(plan.b_factors.values()) == {1.0}
    cfg.update(alpha_pattern={"q_proj": 8})
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"lora_alpha: vllm applies scale 0 \(lora_alpha 0\) where PEFT applies "
                                         r"[0-9.]+ \(module model\.layers\.\d\.self_attn\.q_proj\)"):
        fimlora.export_adapter(src, "vllm", tmp_path / "out2")
