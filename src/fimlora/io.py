"""Files and provenance shared by the library and the harness: atomic writes, package versions."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

__all__ = ["atomic_write_text", "atomic_directory", "check_output_dir", "package_versions", "share_by_umask"]


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a file.

    The file gets the permissions a plain ``open(path, "w")`` would give (0666 minus the
    umask), not mkstemp's private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def share_by_umask(root: str | os.PathLike) -> None:
    """Give every file under ``root`` the mode a plain open() would (0666 less the umask) and every folder 0777 less
    the umask. safetensors writes its files 0600, so without this an adapter is unreadable to a server that runs as
    another user (a vLLM container), while the JSON beside it is readable."""
    mask = _umask()
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False, inputs: Iterable = ()):
    """Yield a temporary folder beside ``target``; on success it replaces ``target`` in one rename.

    A crash or an exception inside the block leaves ``target`` exactly as it was (the temporary
    folder is removed). ``target`` must not exist, be an empty folder, or ``overwrite`` must be set;
    it is checked before the block runs, so no work is spent on an output that would be refused.
    What the block wrote gets the umask's permissions (:func:`share_by_umask`).
    ``inputs``: the files and folders the work reads, which ``overwrite`` must never delete.
    """
    target = Path(target)
    check_output_dir(target, overwrite, inputs)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        share_by_umask(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_dir(target: str | os.PathLike, overwrite: bool = False, inputs: Iterable = ()) -> None:
    """Refuse an output folder that is a file, a non-empty folder without ``overwrite``, or one that is or holds
    any of ``inputs`` (the data, model or adapter the work reads), which replacing it would delete."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise ValueError(f"out: {target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ValueError(f"out: {target} is not empty; choose a new folder or pass --overwrite to replace it")
    resolved = target.expanduser().resolve()
    for item in inputs:
        if item is None or not Path(item).expanduser().exists():
            continue  # a bundled task or hub name is not a path
        path = Path(item).expanduser().resolve()
        if path == resolved or resolved in path.parents:
            raise ValueError(f"out: {target} holds the input {path}; writing there (--overwrite replaces the whole "
                             "folder) would delete it; choose another output folder")


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide a result, for experiment records and rank maps."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("fimlora", "torch", "transformers", "peft", "accelerate"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out
