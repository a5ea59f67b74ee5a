"""The README's Python snippets run as written (on a tiny seeded model), and its claims match the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.references import lm_batches, lora_llama, tiny_llama

README = Path(__file__).resolve().parents[1] / "README.md"


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_the_snippets_this_test_runs():
    assert len(snippets()) == 6


def test_library_snippets_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"base_model": tiny_llama(), "train_dataloader": lm_batches(n_batches=8),
                 "loader": lm_batches(n_batches=8), "fresh_model": lora_llama(target_modules=["q_proj", "v_proj"])}
    one, two, *_ = snippets()
    exec(compile(one, "README snippet 1", "exec"), namespace)  # noqa: S102 - the README's own code
    assert sum(namespace["allocation"].ranks.values()) == 4 * 8  # 2 layers x (q, v) at r = 8
    exec(compile(two, "README snippet 2", "exec"), namespace)  # noqa: S102
    assert sum(namespace["ranks"].values()) == 32 and (tmp_path / "rank_map.json").exists()
    assert isinstance(namespace["fisher"], __import__("fimlora").FisherResult)


def test_drop_snippet_runs():
    from fimlora.modules import lora_modules

    model = lora_llama(seed=3, r=8, target_modules="all-linear")
    full = sum(i.r * (i.in_features + i.out_features) for i in lora_modules(model))
    namespace = {"model": model, "train_dataloader": lm_batches(n_batches=8), "fimlora": __import__("fimlora")}
    exec(compile(snippets()[2], "README snippet 3", "exec"), namespace)  # noqa: S102
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
    exec(compile(snippets()[3], "README snippet 4", "exec"), namespace)  # noqa: S102
    assert (tmp_path / "rank_map.json").exists()


def test_trl_qlora_snippet_runs(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    pytest.importorskip("bitsandbytes")
    from tests.lib.test_trl import text_data, word_tokenizer
    from tests.references import save_tiny_llama

    monkeypatch.chdir(tmp_path)
    namespace = {"path": save_tiny_llama(tmp_path / "base"), "ds": text_data(n=16), "tok": word_tokenizer()}
    # The snippet is written for a GPU; here the one call that differs on a CPU is swapped in.
    code = snippets()[4].replace('SFTConfig(output_dir="out")',
                                 'SFTConfig(output_dir="out", use_cpu=True, bf16=False, max_steps=2, report_to=[])')
    assert code != snippets()[4]
    exec(compile(code, "README snippet 5", "exec"), namespace)  # noqa: S102
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
        exec(compile(snippets()[5], "README snippet 6", "exec"), namespace)  # noqa: S102
        allocation, model = namespace["allocation"], namespace["model"]
        assert sum(allocation.ranks.values()) == 4 * 8 and len(set(allocation.ranks.values())) > 1
        assert {i.name: i.r for i in fimlora.lora_modules(model)} == allocation.ranks
        assert all(isinstance(p, DTensor) for p in model.parameters())
    finally:
        torch.distributed.destroy_process_group()


def test_readme_lists_every_bundled_task_and_extra():
    from fimlora.app.tasks import TASKS

    text = README.read_text(encoding="utf-8")
    missing = [t for t in TASKS if f"`{t}`" not in text]
    assert missing == []
    import tomllib

    extras = tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert [e for e in extras if e != "test" and f"fimlora[{e}]" not in text] == []


@pytest.mark.parametrize("claim", ["scripts/demo.sh", "scripts/test.sh"])
def test_the_two_commands_exist(claim):
    assert (README.parent / claim).exists()


def test_layout_section_matches_the_tree():
    text = README.read_text(encoding="utf-8")
    layout = text[text.index("## Layout"):]
    package = README.parent / "src" / "fimlora"
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
