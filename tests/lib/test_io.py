"""Atomic files: the permissions a plain open() gives, and a folder replaced in one move."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat

import pytest

from fimlora.io import OUTPUT_MANIFEST, atomic_directory, atomic_write_text, check_output_dir, output_path


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


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_directory_replaces_only_on_success(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "old.txt").write_text("old")
        (tmp / "old-dir").mkdir()
    assert names(target) == [OUTPUT_MANIFEST, "old-dir", "old.txt"]
    with pytest.raises(RuntimeError):
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("crash")
    assert names(target) == [OUTPUT_MANIFEST, "old-dir", "old.txt"]  # untouched, no temporary folder left
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert names(target) == [OUTPUT_MANIFEST, "new.txt"]
    assert json.loads((target / OUTPUT_MANIFEST).read_text())["files"] == ["new.txt"]
    assert names(tmp_path) == ["out"]
    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "fresh") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "fresh").stat().st_mode) == 0o755


def test_a_failed_write_into_a_new_folder_leaves_no_folder(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "a" / "new") as tmp:
            (tmp / "f").write_text("x")
            raise RuntimeError("crash")
    assert not (tmp_path / "a" / "new").exists()


def test_output_dir_rules(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        check_output_dir(tmp_path / "file")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match=r"is not empty \(it holds x\); choose a new or empty folder, or pass "
                                         "--overwrite to replace an earlier fimlora output there"):
        check_output_dir(tmp_path / "full")
    check_output_dir(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=f"out: {tmp_path / 'dangling'} is a symlink to .*nowhere, which does not "
                                         "exist"):
        check_output_dir(tmp_path / "dangling")


def user_folder(path):
    """A folder a user keeps things in: files, a hidden file and a sub-folder."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "notes.txt").write_text("mine")
    (path / ".env").write_text("secret")
    (path / "data").mkdir()
    (path / "data" / "train.jsonl").write_text("{}")
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_overwrite_refuses_a_folder_that_fimlora_did_not_write(tmp_path):
    """The data-loss bug: --overwrite on a folder of the user's own files (say the working directory) deleted them."""
    before = user_folder(tmp_path / "home")
    with pytest.raises(ValueError, match=rf"out: {tmp_path / 'home'} was not written by fimlora \(no "
                                         rf"{re.escape(OUTPUT_MANIFEST)}\), so --overwrite will not delete what it "
                                         r"holds \(\.env, data, notes\.txt\); choose a new or empty folder"):
        with atomic_directory(tmp_path / "home", overwrite=True) as tmp:
            (tmp / "adapter").mkdir()
    assert sorted(str(p.relative_to(tmp_path / "home")) for p in (tmp_path / "home").rglob("*")) == before


def test_overwrite_refuses_a_fimlora_output_holding_the_user_s_files_too(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        (tmp / "rank_map.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds files fimlora did not write there \(notes.txt\); --overwrite "
                                         "replaces only fimlora's own output"):
        check_output_dir(out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    (out / OUTPUT_MANIFEST).write_text("not json")  # a damaged manifest proves nothing
    with pytest.raises(ValueError, match="was not written by fimlora"):
        check_output_dir(out, overwrite=True)


def test_a_symlinked_out_is_written_through(tmp_path):
    real = tmp_path / "volume" / "adapters"
    real.mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(real)
    for overwrite in (False, True):
        with atomic_directory(link, overwrite=overwrite) as tmp:
            (tmp / "a.txt").write_text(str(overwrite))
        assert link.is_symlink() and os.readlink(link) == str(real)
        assert (real / "a.txt").read_text() == str(overwrite)
        assert names(tmp_path) == ["link", "volume"]  # nothing beside the link, no dangling hidden link


def test_a_prepared_folder_keeps_its_mode_and_identity(tmp_path):
    """A user's shared folder (setgid, group-writable): the output goes into it, the folder itself stays."""
    out = tmp_path / "shared"
    out.mkdir()
    os.chmod(out, 0o2770)
    inode = out.stat().st_ino
    for overwrite in (False, True):
        with atomic_directory(out, overwrite=overwrite) as tmp:
            (tmp / "f").write_text("x")
        assert stat.S_IMODE(out.stat().st_mode) == 0o2770 and out.stat().st_ino == inode


def test_a_mount_point_is_never_renamed_or_removed(tmp_path, monkeypatch):
    """A Docker/Kubernetes volume can be written into but not renamed or removed (EBUSY); emulated by refusing
    exactly those operations on the folder itself."""
    out = tmp_path / "mnt"
    out.mkdir()

    def guard(fn):
        def call(*args, **kwargs):
            if any(os.path.abspath(os.fspath(a)) == str(out) for a in args[:2] if isinstance(a, (str, os.PathLike))):
                raise OSError(errno.EBUSY, "Device or resource busy", str(out))
            return fn(*args, **kwargs)
        return call

    for module, name in ((os, "replace"), (os, "rename"), (os, "rmdir"), (shutil, "rmtree"), (shutil, "move")):
        monkeypatch.setattr(module, name, guard(getattr(module, name)))
    for overwrite in (False, True):
        with atomic_directory(out, overwrite=overwrite) as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "f").write_text(str(overwrite))
        assert (out / "sub" / "f").read_text() == str(overwrite)


def test_dot_and_dotdot(tmp_path, monkeypatch):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    with atomic_directory(".") as tmp:
        (tmp / "f").write_text("1")
    with atomic_directory(".", overwrite=True) as tmp:  # once failed with "PosixPath('.') has an empty name"
        (tmp / "f").write_text("2")
    assert (work / "f").read_text() == "2"
    with pytest.raises(ValueError, match=f"out: {tmp_path / 'a'} was not written by fimlora"):
        check_output_dir("..", overwrite=True)  # once EBUSY after the work was done


def test_tilde_is_expanded_once_for_the_check_and_the_write(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    with atomic_directory("~/x") as tmp:
        (tmp / "f").write_text("x")
    assert (tmp_path / "home" / "x" / "f").exists() and not (tmp_path / "~").exists()
    assert output_path("~/x") == tmp_path / "home" / "x"


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


@pytest.mark.parametrize("entry", ["../victim", "sub/x"])
def test_a_manifest_naming_a_path_outside_its_folder_proves_nothing(tmp_path, entry):
    """A manifest entry is one name in the folder: one with a '/' (say '../victim', written by hand or by another
    tool) must not make --overwrite move and delete a file outside the output."""
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        (tmp / "rank_map.json").write_text("{}")
    (tmp_path / "victim").write_text("mine")
    record = json.loads((out / OUTPUT_MANIFEST).read_text())
    record["files"].append(entry)
    (out / OUTPUT_MANIFEST).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="was not written by fimlora"):
        with atomic_directory(out, overwrite=True) as tmp:
            (tmp / "rank_map.json").write_text("new")
    assert (tmp_path / "victim").read_text() == "mine"
    assert (out / "rank_map.json").read_text() == "{}"


def test_a_failed_write_into_an_existing_empty_folder_keeps_the_folder(tmp_path):
    """Only a folder atomic_directory created is removed when the block fails; an empty folder the user prepared
    (a mount point, a folder with its own mode) stays."""
    out = tmp_path / "prepared"
    out.mkdir()
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            (tmp / "f").write_text("x")
            raise RuntimeError("crash")
    assert out.is_dir() and names(out) == []


def test_overwrite_replaces_an_earlier_dangling_symlink(tmp_path):
    """An earlier output's entry that is a symlink to nothing is still one of its entries: replaced like the rest,
    not left behind (where the next --overwrite would find it a file fimlora did not write)."""
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        (tmp / "latest").symlink_to(tmp_path / "nowhere")
    assert os.path.islink(out / "latest")
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "f").write_text("x")
    assert names(out) == [OUTPUT_MANIFEST, "f"]
    check_output_dir(out, overwrite=True)


def test_the_files_in_the_way_are_listed_up_to_five(tmp_path):
    (tmp_path / "five").mkdir()
    for i in range(5):
        (tmp_path / "five" / f"f{i}").write_text("x")
    with pytest.raises(ValueError, match=r"\(it holds f0, f1, f2, f3, f4\); choose"):
        check_output_dir(tmp_path / "five")
    (tmp_path / "five" / "f5").write_text("x")
    with pytest.raises(ValueError, match=r"\(it holds f0, f1, f2, f3, f4 and 1 more\); choose"):
        check_output_dir(tmp_path / "five")


def test_a_symlink_to_a_file_is_not_a_folder_not_a_dangling_link(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "file")
    with pytest.raises(ValueError, match=f"out: {tmp_path / 'link'} exists and is not a folder"):
        check_output_dir(tmp_path / "link")
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("record", [{"files": ["rank_map.json"]}, {"written_by": "other", "files": ["rank_map.json"]},
                                    ["rank_map.json"]])
def test_a_manifest_fimlora_did_not_write_proves_nothing(tmp_path, record):
    out = tmp_path / "out"
    out.mkdir()
    (out / "rank_map.json").write_text("mine")
    (out / OUTPUT_MANIFEST).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="was not written by fimlora"):
        check_output_dir(out, overwrite=True)
    assert (out / "rank_map.json").read_text() == "mine"
