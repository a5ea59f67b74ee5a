"""Atomic files: the permissions a plain open() gives, and a folder replaced in one move."""

from __future__ import annotations

import os
import stat

import pytest

from fimlora.io import atomic_directory, atomic_write_text, check_output_dir


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_write_respects_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        with open(tmp_path / "plain.json", "w") as f:
            f.write("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "plain.json").stat().st_mode) == mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "plain.json"]  # no temporary file left


def test_atomic_directory_replaces_only_on_success(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("crash")
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "fresh") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "fresh").stat().st_mode) == 0o755


def test_output_dir_rules(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        check_output_dir(tmp_path / "file")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="is not empty; choose a new folder or pass --overwrite"):
        check_output_dir(tmp_path / "full")
    check_output_dir(tmp_path / "full", overwrite=True)
    check_output_dir(tmp_path / "new")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_atomic_directory_gives_safetensors_files_the_umask_s_mode(tmp_path, umask, mode):
    """safetensors writes 0600 whatever the umask; an adapter folder must be as readable as the JSON beside it."""
    import torch
    from safetensors.torch import save_file

    old = os.umask(umask)
    try:
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "adapter").mkdir()
            save_file({"w": torch.zeros(2)}, str(tmp / "adapter" / "adapter_model.safetensors"))
            (tmp / "adapter" / "adapter_config.json").write_text("{}")
    finally:
        os.umask(old)
    for f in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        assert stat.S_IMODE((tmp_path / "out" / f).stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "out" / "adapter").stat().st_mode) == mode | (0o111 & ~umask)
