"""The documentation site builds offline with every warning an error (`mkdocs build --strict`): a broken link or
anchor, a page missing from the navigation or the docs folder, or an API docstring that does not render fails here.
The docs packages come from requirements-docs.txt (scripts/setup.sh), so this test is never skipped."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


class _Loader(yaml.SafeLoader):
    """mkdocs.yml may hold tags such as !ENV; they are not needed to read the navigation."""


_Loader.add_multi_constructor("!", lambda loader, suffix, node: None)


def nav_pages(nav) -> list[str]:
    pages = []
    for item in nav:
        for value in item.values() if isinstance(item, dict) else [item]:
            pages += nav_pages(value) if isinstance(value, list) else [value]
    return pages


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    assert not re.search(r"^(WARNING|ERROR)\b", proc.stderr, flags=re.M), proc.stderr[-5000:]
    return out


def test_site_builds_strict_with_every_guide(site):
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=_Loader)  # noqa: S506 - our own file
    assert config["strict"] is True
    pages = nav_pages(config["nav"])
    for page in pages:
        assert (DOCS / page).exists(), page
        built = site / "index.html" if page == "index.md" else site / page.removesuffix(".md") / "index.html"
        assert built.exists(), page
    guides = {"library.md", "cli.md", "trainer.md", "axolotl.md", "llamafactory.md", "distributed.md", "serving.md",
              "experiments.md", "results.md", "benchmarks.md", "method.md", "api.md", "install.md"}
    assert guides <= set(pages)


def test_api_reference_renders_every_public_name(site):
    """Every name in the public modules' __all__ has its own entry in the generated reference."""
    import fimlora
    import fimlora.check
    import fimlora.export
    import fimlora.integrations

    html = (site / "api" / "index.html").read_text(encoding="utf-8")
    missing = [f"{m.__name__}.{name}" for m in (fimlora, fimlora.check, fimlora.export, fimlora.integrations)
               for name in m.__all__ if f'id="{m.__name__}.{name}"' not in html]
    assert missing == []


def test_readme_links_resolve():
    """The README is read on the repository page, outside the site: its relative links must point at files."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    assert targets
    assert [t for t in targets if not t.startswith("http") and not (ROOT / t).exists()] == []


def test_generated_pages_stay_where_their_writers_write_them():
    """fimlora report (scripts/replicate.sh) writes docs/results.md from docs/results_preface.md, and the benchmark
    scripts write docs/benchmarks.md: the site reads them there."""
    replicate = (ROOT / "scripts" / "replicate.sh").read_text()
    assert "--out docs/results.md" in replicate and "--preface docs/results_preface.md" in replicate
    assert "docs/benchmarks.md" in (ROOT / "benchmarks" / "bench_calibration.py").read_text()
    for page in ("results.md", "benchmarks.md", "results_preface.md"):
        assert (DOCS / page).exists()


def test_llamafactory_page_shows_the_shipped_recipe():
    """The config on the page is the one the script runs, and every file the recipe names ships."""
    page = (DOCS / "llamafactory.md").read_text(encoding="utf-8")
    recipe = ROOT / "examples" / "llamafactory"
    shown = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", page, flags=re.S)]
    config = yaml.safe_load((recipe / "llama_fim.yaml").read_text())
    assert config in shown
    info = yaml.safe_load((recipe / "dataset_info.json").read_text())
    assert config["dataset_dir"] == "examples/llamafactory"  # relative to the repository root, where the script runs
    assert (recipe / info[config["dataset"]]["file_name"]).exists()
    assert (recipe / "stubs" / "torchaudio" / "__init__.py").exists()
    requirements = (ROOT / "requirements-llamafactory.txt").read_text()
    assert "omegaconf" in requirements and "omegaconf" in page and "dataset_dir" in page
    script = (ROOT / "scripts" / "test_llamafactory.sh").read_text()
    assert "examples/llamafactory/llama_fim.yaml" in script and "requirements-llamafactory.txt" in script
