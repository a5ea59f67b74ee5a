"""`fimlora check` on good and broken adapters."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import fimlora
from fimlora import check_pattern_keys
from fimlora.check import check_adapter, vllm_max_lora_rank
from tests.references import llama_base, lm_batches, lora_bert, lora_llama, make_b_nonzero, tiny_bert, tiny_llama


def test_vllm_rank():
    assert [vllm_max_lora_rank(r) for r in (1, 2, 8, 9, 16, 17, 300, 513)] == [1, 8, 8, 16, 16, 32, 320, None]


@pytest.fixture
def saved_adapter(tmp_path):
    model = lora_llama(layers=12)
    fimlora.apply_fim_ranks(model, lm_batches(), n_batches=2, progress=False)
    model.save_pretrained(tmp_path / "a")
    return tmp_path / "a", model


def test_check_passes_on_fimlora_adapter(saved_adapter):
    path, model = saved_adapter
    names = [n for n, _ in model.base_model.model.named_modules()]
    report = check_adapter(path, names)
    assert report.ok, report.format()
    assert report.vllm_max_lora_rank == vllm_max_lora_rank(max(report.ranks.values()))
    assert len(report.ranks) == 84


def rewrite_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    for k, fn in changes.items():
        cfg[k] = fn(cfg[k])
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def test_check_catches_prefixed_keys(saved_adapter):
    path, _ = saved_adapter
    rewrite_config(path, rank_pattern=lambda p: {f"base_model.model.{k}": v for k, v in p.items()})
    report = check_adapter(path)
    assert not report.ok
    assert any("wrapper prefix" in p for p in report.problems)
    assert any("size mismatch" in p for p in report.problems)


def test_check_catches_shadowing_key(saved_adapter):
    path, _ = saved_adapter
    rewrite_config(path, rank_pattern=lambda p: {**p, "q_proj": 3})
    report = check_adapter(path)
    assert any("is matched by 2 keys" in p for p in report.problems)


def test_check_catches_rank_tensor_mismatch(saved_adapter):
    path, _ = saved_adapter
    rewrite_config(path, rank_pattern=lambda p: {k: v + 1 if i == 0 else v for i, (k, v) in enumerate(p.items())})
    report = check_adapter(path)
    assert any("config gives rank" in p for p in report.problems)


def test_check_catches_empty_tensors(saved_adapter):
    path, _ = saved_adapter
    sd = load_file(path / "adapter_model.safetensors")
    key = next(k for k in sd if "lora_A" in k)
    sd[key] = torch.zeros(0)
    save_file(sd, path / "adapter_model.safetensors")
    report = check_adapter(path)
    assert any("empty LoRA tensor" in p for p in report.problems)


# ----------------------------------------------------------------------------- base model shapes


def shapes_of(model):
    """What ``base_module_shapes`` gives the CLI: name -> (d_in, d_out) for linears, None otherwise; names both
    bare (inside the AutoModel) and with the task model's prefix."""
    bare = {n: (m.in_features, m.out_features) if isinstance(m, torch.nn.Linear) else None
            for n, m in model.model.named_modules()}
    return {**bare, **{(f"model.{n}" if n else "model"): s for n, s in bare.items()}}


def test_check_passes_with_matching_base_shapes(saved_adapter):
    path, _ = saved_adapter
    report = check_adapter(path, shapes_of(tiny_llama(layers=12)))
    assert report.ok, report.format()


def test_check_catches_adapter_for_another_width(saved_adapter):
    path, _ = saved_adapter
    report = check_adapter(path, shapes_of(llama_base(layers=12, hidden=32, vocab=64)))
    assert not report.ok
    text = "\n".join(report.problems)
    assert ("model.layers.0.self_attn.q_proj: lora_A has d_in 16 and lora_B has d_out 16, but the base module is "
            "(d_in, d_out) = (32, 32); the adapter was made for a model of another size") in text
    assert "model.layers.0.mlp.down_proj: lora_A has d_in 32 and lora_B has d_out 16, but the base module is " \
           "(d_in, d_out) = (80, 32)" in text
    assert len(report.problems) == 84


def test_check_catches_modules_missing_from_base(saved_adapter):
    path, _ = saved_adapter
    report = check_adapter(path, shapes_of(tiny_llama(layers=2)))
    assert "model.layers.2.self_attn.q_proj: no such module in the base model" in report.problems
    assert sum("no such module" in p for p in report.problems) == 70


def test_check_catches_adapter_made_on_a_cut_model(tmp_path):
    """An adapter saved from a 2-layer cut loads onto the 6-layer model with layers 2-5 un-adapted: a problem."""
    lora_llama(layers=2).save_pretrained(tmp_path / "a")
    assert check_adapter(tmp_path / "a", shapes_of(tiny_llama(layers=2))).ok
    report = check_adapter(tmp_path / "a", shapes_of(tiny_llama(layers=6)))
    assert report.problems == [
        "28 base module(s) match target_modules but have no LoRA tensors in the adapter (e.g. "
        "model.layers.2.mlp.down_proj): PEFT would add fresh zero adapters there; was the adapter made on a model cut "
        "to fewer layers (calibrate --n-layers N)? give the same --n-layers N with the base"], report.format()


@pytest.mark.parametrize("targeting, found", [
    ({"target_modules": r".*\.(q_proj|v_proj)"}, 4),               # a regex string
    ({"layers_to_transform": [0, 1]}, 0),                          # only layers 0-1 were ever targeted
    ({"exclude_modules": ["down_proj"]}, 12),
], ids=["regex", "layers_to_transform", "exclude_modules"])
def test_check_untargeted_modules_follow_peft_rule(tmp_path, targeting, found):
    lora_llama(layers=2, **targeting).save_pretrained(tmp_path / "a")
    report = check_adapter(tmp_path / "a", shapes_of(tiny_llama(layers=4)))
    assert [p.split(" ")[0] for p in report.problems if "no LoRA tensors" in p] == ([str(found)] if found else [])


def test_check_with_base_passes_on_adapter_with_dropped_modules(tmp_path):
    model = lora_llama()
    fimlora.apply_fim_ranks(model, lm_batches(), n_batches=2, progress=False, r_min=0, budget_unit="params",
                            budget_fraction=0.5)
    model.save_pretrained(tmp_path / "a")
    assert len(json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"]) < 14
    tiny_llama().save_pretrained(tmp_path / "base")
    report = check_adapter(tmp_path / "a", shapes_of(tiny_llama()))
    assert report.ok, report.format()
    from fimlora.cli import main

    assert main(["check", str(tmp_path / "a"), "--base-model", str(tmp_path / "base")]) == 0


def check_on_saved_base(tmp_path, adapter, base):
    """``fimlora check ADAPTER --base-model BASE``: BASE saved as a folder, its names read by base_module_shapes."""
    from fimlora.cli import main

    base.save_pretrained(tmp_path / "base")
    adapter.save_pretrained(tmp_path / "a", save_embedding_layers=False)
    return main(["check", str(tmp_path / "a"), "--base-model", str(tmp_path / "base")])


def drop_tensors(adapter, needle):
    """The adapter as if saved without the modules whose names contain ``needle``."""
    weights = adapter / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if needle not in k}, weights)


@pytest.mark.parametrize("exclude", [["bert.encoder.layer.0.attention.self.query"],
                                     r"bert\.encoder\.layer\.0\..*"], ids=["list", "regex"])
def test_check_passes_exclude_modules_written_with_peft_names(tmp_path, capsys, exclude):
    """PEFT matches exclude_modules against the names of the model it wraps (``bert.encoder...`` for a SEQ_CLS
    adapter); the same module's bare name (``encoder...``) is not one PEFT ever saw."""
    from fimlora.app.models import base_module_shapes

    assert check_on_saved_base(tmp_path, lora_bert(exclude_modules=exclude), tiny_bert()) == 0, \
        capsys.readouterr().out
    base = base_module_shapes(str(tmp_path / "base"))  # no task type: every name form, still no problem
    assert check_adapter(tmp_path / "a", base).ok
    # The adapter cut to its first layer: what exclude_modules spared in layer 1 is missing, and reported.
    lora_bert(exclude_modules=exclude).save_pretrained(tmp_path / "cut")
    drop_tensors(tmp_path / "cut", ".layer.1.")
    report = check_adapter(tmp_path / "cut", base)
    assert [p.split(" (e.g. ")[0] for p in report.problems] == [
        "6 base module(s) match target_modules but have no LoRA tensors in the adapter"], report.problems


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_check_passes_lora_on_lm_head(tmp_path, capsys, tied):
    """A causal LM's head is a module of the model PEFT wraps (AutoModelForCausalLM), not of the bare AutoModel."""
    base = tiny_llama()
    base.config.tie_word_embeddings = tied
    assert check_on_saved_base(tmp_path, lora_llama(target_modules=["q_proj", "lm_head"]), base) == 0, \
        capsys.readouterr().out


def test_check_still_reports_lm_head_missing_from_the_adapter(tmp_path, capsys):
    from fimlora.cli import main

    lora_llama(target_modules=["q_proj", "lm_head"]).save_pretrained(tmp_path / "a", save_embedding_layers=False)
    tiny_llama(layers=4).save_pretrained(tmp_path / "base")
    drop_tensors(tmp_path / "a", "lm_head")
    assert main(["check", str(tmp_path / "a"), "--base-model", str(tmp_path / "base")]) == 1
    out = capsys.readouterr().out
    assert ("3 base module(s) match target_modules but have no LoRA tensors in the adapter (e.g. lm_head)") in out, out


def test_check_catches_non_finite_values(saved_adapter):
    path, _ = saved_adapter
    sd = load_file(path / "adapter_model.safetensors")
    b_key = next(k for k in sd if "layers.3" in k and "lora_B" in k)
    a_key = next(k for k in sd if "layers.5" in k and "lora_A" in k)
    sd[b_key][0, 0] = float("nan")
    sd[a_key][1, 2] = float("-inf")
    save_file(sd, path / "adapter_model.safetensors")
    report = check_adapter(path)
    assert f"{b_key}: 1 non-finite value(s) (NaN or inf)" in report.problems
    assert f"{a_key}: 1 non-finite value(s) (NaN or inf)" in report.problems
    assert len(report.problems) == 2


# ----------------------------------------------------------------------------- unreadable or invalid files


@pytest.mark.parametrize("text, message", [
    ("{not json", r"adapter_config.json: not valid JSON \(Expecting property name"),
    ("[1, 2]", r"adapter_config.json: must be a JSON object, got list"),
    ("", r"adapter_config.json: not valid JSON"),
], ids=["broken", "list", "empty"])
def test_check_reports_unreadable_config(saved_adapter, text, message):
    path, _ = saved_adapter
    (path / "adapter_config.json").write_text(text)
    report = check_adapter(path)
    assert len(report.problems) == 1 and re.match(re.escape(str(path)) + "/" + message, report.problems[0]), \
        report.problems
    assert "FAILED: 1 problem(s)" in report.format()


@pytest.mark.parametrize("keep", [0, 7, 200, -40], ids=["empty", "short-header", "truncated-header", "truncated"])
def test_check_reports_unreadable_weights(saved_adapter, keep):
    path, _ = saved_adapter
    weights = path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:keep])
    report = check_adapter(path)
    assert len(report.problems) == 1
    assert report.problems[0].startswith(f"{weights}: cannot be read as safetensors (")
    assert "truncated or not a safetensors file" in report.problems[0]


@pytest.mark.parametrize("field, value, message", [
    ("r", 0, "r: must be >= 1, got 0"),
    ("r", -4, "r: must be >= 1, got -4"),
    ("r", 2.5, "r: must be an integer, got 2.5"),
    ("r", "8", "r: must be an integer, got '8'"),
    ("lora_alpha", None, "lora_alpha: must be a finite number, got None"),
    ("rank_pattern", [["model.layers.0.self_attn.q_proj", 2]],
     "rank_pattern: must be an object mapping key -> value, got list"),
    ("alpha_pattern", "q_proj=4", "alpha_pattern: must be an object mapping key -> value, got str"),
], ids=["r0", "r-neg", "r-float", "r-str", "alpha-none", "rank-pattern-list", "alpha-pattern-str"])
def test_check_reports_invalid_config_values(saved_adapter, field, value, message):
    path, _ = saved_adapter
    rewrite_config(path, **{field: lambda _: value})
    report = check_adapter(path)
    assert message in report.problems, report.problems
    assert not report.ok


def test_check_reports_invalid_pattern_entries(saved_adapter):
    path, _ = saved_adapter
    rewrite_config(path, rank_pattern=lambda p: {**p, "layers.0.(q_proj": 2, "model.layers.1.mlp.up_proj": 0},
                   alpha_pattern=lambda p: {**p, "[v_proj": 4.0, "model.layers.1.mlp.up_proj": float("nan")})
    report = check_adapter(path)
    text = "\n".join(report.problems)
    assert "rank_pattern: key 'layers.0.(q_proj' is not a valid regular expression (missing ), unterminated " \
           "subpattern at position 9); PEFT cannot load the adapter" in text
    assert "alpha_pattern: key '[v_proj' is not a valid regular expression" in text
    assert "rank_pattern['model.layers.1.mlp.up_proj']: must be >= 1, got 0" in text
    assert "alpha_pattern['model.layers.1.mlp.up_proj']: must be a finite number, got nan" in text


def test_check_pattern_keys_reports_invalid_regex_instead_of_raising():
    problems = check_pattern_keys({"(q_proj": 2, "q_proj": 3}, ["a.q_proj"], ["a", "a.q_proj"])
    assert problems == ["key '(q_proj' is not a valid regular expression (missing ), unterminated subpattern at "
                        "position 0)"]


def saved_fim_adapter(tmp_path, r=4, use_rslora=False, **settings):
    model = lora_llama(r=r, use_rslora=use_rslora)
    alloc = fimlora.apply_fim_ranks(model, lm_batches(), n_batches=2, progress=False, **settings)
    model.save_pretrained(tmp_path / "a")
    return tmp_path / "a", model, alloc


def test_check_serving_sizes_match_hand_computed(tmp_path):
    path, model, alloc = saved_fim_adapter(tmp_path)
    report = check_adapter(path)
    infos = fimlora.lora_modules(model)
    largest = max(i.r for i in infos)
    k = next(v for v in (1, 8, 16, 32, 64, 128, 256, 320, 512) if v >= largest)
    assert report.vllm_max_lora_rank == k
    assert report.real_params == sum(i.r * (i.in_features + i.out_features) for i in infos) == alloc.params_spent
    assert report.serving_params == sum(k * (i.in_features + i.out_features) for i in infos)
    text = report.format()
    assert f"serving size {report.serving_params:,} params" in text and f"real size {report.real_params:,}" in text
    assert not any("served wrongly by vLLM" in n for n in report.notes)


def test_check_warns_that_vllm_mis_scales_fixed_alpha(tmp_path):
    path, _, _ = saved_fim_adapter(tmp_path, scale="fixed_alpha")
    report = check_adapter(path)
    warnings = [n for n in report.notes if "served wrongly by vLLM <= 0.31" in n]
    assert len(warnings) == 1 and "instead of" in warnings[0] and "--for vllm" in warnings[0]
    assert "WARNING: served wrongly by vLLM" in report.format()


def test_check_serving_size_of_a_max_lora_rank_8_adapter(tmp_path):
    path, model, alloc = saved_fim_adapter(tmp_path, max_lora_rank=8)
    report = check_adapter(path)
    assert report.vllm_max_lora_rank == 8 and max(alloc.ranks.values()) <= 8
    assert report.serving_params == 8 * sum(alloc.costs.values())


# ----------------------------------------------------------------------------- pattern keys PEFT users write


def saved_peft_adapter(tmp_path, **config):
    """A plain PEFT adapter (no fimlora) with a non-zero B, saved: what users bring to `fimlora check`."""
    model = lora_llama(**config)
    make_b_nonzero(model, lm_batches())
    model.save_pretrained(tmp_path / "a")
    return tmp_path / "a", model


def test_check_accepts_a_key_that_matches_several_modules(tmp_path):
    path, model = saved_peft_adapter(tmp_path, rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 4})
    names = [n for n, _ in model.base_model.model.named_modules()]
    report = check_adapter(path, names)
    assert report.ok, report.format()
    assert {n: r for n, r in report.ranks.items() if "q_proj" in n} == {
        "model.layers.0.self_attn.q_proj": 2, "model.layers.1.self_attn.q_proj": 2}


def test_check_still_catches_keys_that_overlap_on_one_module(tmp_path):
    path, _ = saved_peft_adapter(tmp_path, rank_pattern={"q_proj": 2, "layers.0.self_attn.q_proj": 2})
    report = check_adapter(path)
    assert any("model.layers.0.self_attn.q_proj' is matched by 2 keys" in p for p in report.problems)
    assert not any("layers.1.self_attn.q_proj' is matched" in p for p in report.problems)


# ----------------------------------------------------------------------------- serving engines


def test_check_names_modules_to_save_for_vllm_and_llamacpp(tmp_path):
    model = lora_bert()  # every classifier adapter saves its head through modules_to_save
    model.save_pretrained(tmp_path / "a")
    report = check_adapter(tmp_path / "a")
    assert report.ok
    text = "\n".join(report.notes)
    # classifier/score heads alone: vLLM >= 0.31 loads them (a note, no refusal); llama.cpp's converter refuses them
    assert "served wrongly by vLLM" not in text
    assert "vLLM: modules_to_save=['classifier', 'score'] are classification heads" in text
    assert "served wrongly by llama.cpp (Ollama, LM Studio): refuses it: modules_to_save" in text
    assert "--for merged --out DIR --base-model BASE" in text


def test_check_max_lora_rank_covers_the_config_r(tmp_path):
    """vLLM validates the config's r against --max-lora-rank: r = 16 with every module at rank 4 needs K = 16."""
    every = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
    path, _ = saved_peft_adapter(tmp_path, r=16, rank_pattern={every: 4})
    report = check_adapter(path)
    assert report.ok, report.format()
    assert set(report.ranks.values()) == {4}
    assert report.vllm_max_lora_rank == 16


def test_check_vllm_scaling_honours_rslora(tmp_path):
    """rsLoRA at r = 16 (preserve scale): vLLM applies lora_alpha / sqrt(r) = PEFT's alpha_m / sqrt(r_m) on every
    module; llama.cpp ignores rsLoRA and serves alpha / r_m."""
    path, _, alloc = saved_fim_adapter(tmp_path, r=16, use_rslora=True)
    assert len(set(alloc.ranks.values())) > 1
    report = check_adapter(path, serve="vllm")
    assert report.ok, report.format()
    assert report.serving["vllm"].ok and report.vllm_max_lora_rank == 32
    report = check_adapter(path, serve="llama.cpp")
    assert not report.ok
    assert len(report.serving["llama.cpp"].mis_scaled) == len(report.ranks)
    assert report.problems == [report.serving["llama.cpp"].describe(str(path))]
    assert f"run `fimlora export {path} --for llama.cpp --out DIR`" in report.problems[0]
    default = check_adapter(path)
    assert default.ok and any("served wrongly by llama.cpp" in n for n in default.notes)
    assert not any("served wrongly by vLLM" in n for n in default.notes)


def test_check_serve_rejects_an_unknown_engine(saved_adapter):
    path, _ = saved_adapter
    with pytest.raises(ValueError, match=r"serve: must be one of \['peft', 'vllm', 'llama.cpp', 'sglang'\], "
                                         r"got 'ollama'"):
        check_adapter(path, serve="ollama")


def test_an_adapter_folder_that_does_not_exist_is_one_problem_without_a_module_count(tmp_path):
    report = check_adapter(tmp_path / "nope")
    assert not report.ok and report.problems == [f"{tmp_path / 'nope'}: does not exist"]
    nope = tmp_path / "nope"
    assert report.format().splitlines() == [f"adapter: {nope}", f"PROBLEM: {nope}: does not exist",
                                            "FAILED: 1 problem(s)"]


# Keys whose meaning under PEFT's rule, re.match(rf"(.*\.)?({key})$", name), is easy to get wrong: a leading ^
# with a top-level | (the ^ binds to the first alternative only), an anchored full name, a plain suffix.
TRICKY_KEYS = [
    {"^model.layers.0.self_attn.q_proj|v_proj": 8},
    {"^model.layers.0.self_attn.q_proj$": 8, "v_proj": 2},
    {"layers.1.self_attn.(q|v)_proj": 6, "^model.layers.0.self_attn.v_proj": 3},
]


@pytest.mark.parametrize("pattern", TRICKY_KEYS, ids=["caret-pipe", "anchored", "groups"])
def test_check_reads_every_pattern_key_as_peft_does(tmp_path, pattern):
    """Ranks and scales that check (and so export) reads from the config are the ones PEFT builds: compared with
    the layers of the PEFT model that the config made, not with a second copy of PEFT's rule."""
    from fimlora.check import served_scales

    model = lora_llama(rank_pattern=pattern, alpha_pattern={k: 2 * v for k, v in pattern.items()})
    make_b_nonzero(model, lm_batches())
    model.save_pretrained(tmp_path / "a")
    report = check_adapter(tmp_path / "a")
    assert not [p for p in report.problems if "size mismatch" in p], report.format()
    from peft.tuners.lora import LoraLayer

    layers = {n: m for n, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer)}
    assert report.ranks == {n: m.r["default"] for n, m in layers.items()}
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    peft = served_scales(cfg, report.ranks, "peft")
    assert peft == pytest.approx({n: m.scaling["default"] for n, m in layers.items()}, rel=1e-12)
    assert report.scalings == pytest.approx(peft, rel=1e-12)


def _base_weight_change(init) -> float:
    """Largest change PEFT makes to the base weights of a tiny LLaMA while creating an adapter with ``init``,
    with the preprocessing that init needs (CorDA's covariance run, LoRA-GA's gradients)."""
    from peft import EvaConfig, LoraConfig, LoraGAConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda
    from peft.tuners.lora.loraga import preprocess_loraga

    base = tiny_llama()
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=init,
                        eva_config=EvaConfig() if init == "eva" else None,
                        lora_ga_config=LoraGAConfig() if init == "lora_ga" else None,
                        corda_config=CordaConfig(corda_method="kpm") if init == "corda" else None)
    batches = lm_batches()
    if init == "corda":  # CorDA's hooks take one sequence per forward
        preprocess_corda(base, config, run_model=lambda: [base(input_ids=b["input_ids"][i:i + 1])
                                                          for b in batches for i in range(2)])
    if init == "lora_ga":
        preprocess_loraga(base, config, lambda: [base(input_ids=b["input_ids"], labels=b["input_ids"]).loss.backward()
                                                 for b in batches])
    model = get_peft_model(base, config)
    change = 0.0
    for name, p in model.base_model.model.named_parameters():
        key = name.replace(".base_layer", "")
        if "lora_" not in name and key in before:
            change = max(change, (p.detach() - before[key]).abs().max().item())
    return change


NOT_BASE_CHANGING = [True, False, "gaussian", "eva", "orthogonal", "mica"]
BASE_CHANGING = ["pissa", "pissa_niter_2", "olora", "corda", "lora_ga"]


@pytest.mark.parametrize("init", NOT_BASE_CHANGING + BASE_CHANGING)
def test_base_changing_inits_are_those_of_the_pinned_peft(init):
    """The table against what PEFT does: it changes the base weights exactly for the inits the table names."""
    from fimlora.check import changes_base_weights

    changed = _base_weight_change(init) > 0
    assert changed == changes_base_weights(init), (init, changed)


def test_loftq_changes_the_base_weights_in_the_pinned_peft():
    """LoftQ quantises on CUDA only, so it is checked in PEFT's source: its init assigns the base weight."""
    import inspect

    from peft.tuners.lora.layer import LoraLayer

    from fimlora.check import changes_base_weights

    assert "self.get_base_layer().weight.data = qweight" in inspect.getsource(LoraLayer.loftq_init)
    assert changes_base_weights("loftq")


@pytest.mark.parametrize("init", NOT_BASE_CHANGING + BASE_CHANGING + ["loftq", "PiSSA_niter_4", "corda_anything"])
def test_every_init_through_check_and_export(tmp_path, init):
    """What check --serve and export say of an adapter saved with each init_lora_weights value: every engine but
    PEFT loads it onto the original base, so a base-changing init is refused by each, and by export."""
    from fimlora.check import changes_base_weights

    model = lora_llama()
    make_b_nonzero(model, lm_batches())
    model.save_pretrained(tmp_path / "a")
    rewrite_config(tmp_path / "a", init_lora_weights=lambda _: init)
    base_changing = changes_base_weights(init)
    assert base_changing == (init in BASE_CHANGING + ["loftq", "PiSSA_niter_4", "corda_anything"])
    for engine in ("vllm", "llama.cpp", "sglang"):
        verdict = check_adapter(tmp_path / "a", serve=engine).serving[engine]
        refused = any("changes the base weights" in r for r in verdict.refusals)
        assert refused == base_changing, (engine, verdict.refusals)
    for engine in ("vllm", "llama.cpp"):
        if base_changing:
            with pytest.raises(ValueError, match=rf"{re.escape(engine)} cannot serve .*init_lora_weights="
                                                 rf"{re.escape(repr(init))} changes the base weights"):
                fimlora.export_adapter(tmp_path / "a", engine, tmp_path / f"out-{engine}")
        else:
            fimlora.export_adapter(tmp_path / "a", engine, tmp_path / f"out-{engine}")


def test_check_serve_llamacpp_reads_lora_alpha_zero_as_scale_one(tmp_path):
    """llama.cpp's get_scale: alpha 0 means scale 1; PEFT's alpha/r is 0. check --serve llama.cpp must say so."""
    model = lora_llama()
    model.save_pretrained(tmp_path / "a")
    rewrite_config(tmp_path / "a", lora_alpha=lambda _: 0)
    report = check_adapter(tmp_path / "a", serve="llama.cpp")
    verdict = report.serving["llama.cpp"]
    assert not report.ok and verdict.mis_scaled
    assert set(verdict.mis_scaled.values()) == {(1.0, 0.0)}


def test_check_serve_sglang_rule(tmp_path):
    """SGLang 0.5.23 loads every module at the config's r (mixed ranks cannot load) and applies one lora_alpha / r,
    reading neither pattern nor use_rslora."""
    uniform = lora_llama()
    uniform.save_pretrained(tmp_path / "uniform")
    assert check_adapter(tmp_path / "uniform", serve="sglang").ok
    mixed = lora_llama(rank_pattern={"q_proj": 2})
    mixed.save_pretrained(tmp_path / "mixed")
    verdict = check_adapter(tmp_path / "mixed", serve="sglang").serving["sglang"]
    assert verdict.refusals == ["modules of rank [2] other than the config's r=4: every module is loaded at r"]
    scaled = lora_llama(alpha_pattern={"q_proj": 16})
    scaled.save_pretrained(tmp_path / "scaled")
    verdict = check_adapter(tmp_path / "scaled", serve="sglang").serving["sglang"]
    assert not verdict.refusals and set(verdict.mis_scaled) == {f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)}
    assert set(verdict.mis_scaled.values()) == {(2.0, 4.0)}
    rslora = lora_llama(use_rslora=True)
    rslora.save_pretrained(tmp_path / "rslora")
    verdict = check_adapter(tmp_path / "rslora", serve="sglang").serving["sglang"]
    assert set(verdict.mis_scaled.values()) == {(2.0, 4.0)}  # SGLang 8/4 against PEFT's 8/sqrt(4)


def test_check_reads_an_unsorted_hand_edited_pattern_in_the_file_s_order(tmp_path):
    """PEFT tries pattern keys in the order the loaded config holds them (save_pretrained writes them sorted, a
    hand-edited file need not be). Sorted, '^model...$' (rank 6) would come first; in the file's order layer 0's
    q_proj gets 'layers.0.self_attn.q_proj' (rank 2), as PEFT loads it: no false size mismatch, overlap reported."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    lora_llama(rank_pattern={"layers.0.self_attn.q_proj": 2}).save_pretrained(tmp_path / "a")
    rewrite_config(tmp_path / "a", rank_pattern=lambda p: {**p, "^model.layers.0.self_attn.q_proj$": 6})
    assert list(json.loads((tmp_path / "a" / "adapter_config.json").read_text())["rank_pattern"]) == [
        "layers.0.self_attn.q_proj", "^model.layers.0.self_attn.q_proj$"]
    reloaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"))
    peft_ranks = {n: m.r["default"] for n, m in reloaded.base_model.model.named_modules() if isinstance(m, LoraLayer)}
    assert peft_ranks["model.layers.0.self_attn.q_proj"] == 2
    report = check_adapter(tmp_path / "a")
    assert not [p for p in report.problems if "size mismatch" in p], report.problems
    assert any("matched by 2 keys" in p for p in report.problems)
    assert report.scalings["model.layers.0.self_attn.q_proj"] == pytest.approx(reloaded.base_model.model.model
                                                                               .layers[0].self_attn.q_proj
                                                                               .scaling["default"])
