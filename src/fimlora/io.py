"""Files and provenance shared by the library and the harness: atomic writes, package versions."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

__all__ = ["atomic_write_text", "atomic_directory", "check_output_dir", "output_path", "OUTPUT_MANIFEST",
           "package_versions", "share_by_umask"]


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


OUTPUT_MANIFEST = ".fimlora-output.json"
_TMP_PREFIX = ".fimlora-"


def output_path(target: str | os.PathLike) -> Path:
    """The folder a user named, as every command writes it: ``~`` expanded and made absolute, but a symlink kept as
    the link (the output goes into the folder it points to, which stays where it is)."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(target))))


def _listing(names: Iterable[str], limit: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _manifest_files(folder: Path) -> list[str] | None:
    """The entries a fimlora command wrote into ``folder`` (its :data:`OUTPUT_MANIFEST`), or None if it holds none
    that fimlora wrote."""
    try:
        record = json.loads((folder / OUTPUT_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = record.get("files") if isinstance(record, dict) and record.get("written_by") == "fimlora" else None
    if not isinstance(files, list) or not all(isinstance(f, str) and f and "/" not in f and f not in (".", "..")
                                              for f in files):
        return None
    return files


def check_output_dir(target: str | os.PathLike, overwrite: bool = False, inputs: Iterable = ()) -> None:
    """The one rule for every folder a fimlora command writes into (calibrate, export, demo).

    ``target`` (:func:`output_path`) may be new, or an existing empty folder (a mount point, a symlink to a folder,
    a folder with the group and mode a user set up: all kept, since the output is written into it). A non-empty
    folder is replaced only with ``overwrite``, and only when it is an earlier fimlora output: it holds the
    manifest fimlora wrote (:data:`OUTPUT_MANIFEST`) and nothing that manifest does not list. Anything else is
    refused with the files in the way named, so ``--overwrite`` never deletes what fimlora did not write.
    ``inputs`` (the data, model or adapter the work reads) may be neither the folder nor inside it.
    Raises ValueError before any work is spent on an output that would be refused.
    """
    path = output_path(target)
    if path.is_symlink() and not path.exists():
        raise ValueError(f"out: {path} is a symlink to {os.readlink(path)}, which does not exist; create that "
                         "folder or name another")
    if path.exists() and not path.is_dir():
        raise ValueError(f"out: {path} exists and is not a folder")
    resolved = path.resolve()
    for item in inputs:
        if item is None or not Path(item).expanduser().exists():
            continue  # a bundled task or hub name is not a path
        source = Path(item).expanduser().resolve()
        if source == resolved or resolved in source.parents:
            raise ValueError(f"out: {path} holds the input {source}; writing there could delete it; choose "
                             "another output folder")
    if not path.is_dir():
        return
    entries = [p.name for p in path.iterdir()]
    if not entries:
        return
    if not overwrite:
        raise ValueError(f"out: {path} is not empty (it holds {_listing(entries)}); choose a new or empty folder, "
                         "or pass --overwrite to replace an earlier fimlora output there")
    ours = _manifest_files(path)
    if ours is None:
        raise ValueError(f"out: {path} was not written by fimlora (no {OUTPUT_MANIFEST}), so --overwrite will not "
                         f"delete what it holds ({_listing(entries)}); choose a new or empty folder")
    foreign = [n for n in entries if n != OUTPUT_MANIFEST and n not in ours]
    if foreign:
        raise ValueError(f"out: {path} holds files fimlora did not write there ({_listing(foreign)}); --overwrite "
                         "replaces only fimlora's own output, so move them or choose a new or empty folder")


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False, inputs: Iterable = ()):
    """Yield a temporary folder inside ``target``; on success its contents replace what fimlora wrote there before.

    :func:`check_output_dir` runs first, so nothing is spent on an output that would be refused. The output is
    written *into* the folder the user named, never by replacing that folder: a mount point (which cannot be
    renamed), a symlink (its target gets the files) and a folder's owner, group and mode all stay as they were.
    An exception inside the block leaves ``target`` exactly as it was (a folder it had to create is removed
    again). On success the earlier output's entries (those its manifest lists) are moved aside, the new ones moved
    in, and the old ones deleted; a manifest :data:`OUTPUT_MANIFEST` listing the new entries is written last.
    What the block wrote gets the umask's permissions (:func:`share_by_umask`).
    """
    path = output_path(target)
    check_output_dir(path, overwrite, inputs)
    created = not os.path.lexists(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path, prefix=_TMP_PREFIX, suffix=".tmp"))
    try:
        yield tmp
        written = sorted(p.name for p in tmp.iterdir())
        if OUTPUT_MANIFEST in written:  # pragma: no cover - a caller's bug, not bad input
            raise RuntimeError(f"atomic_directory: the block wrote {OUTPUT_MANIFEST}, the name of fimlora's manifest")
        share_by_umask(tmp)
        atomic_write_text(tmp / OUTPUT_MANIFEST, json.dumps(
            {"written_by": "fimlora", "version": package_versions()["fimlora"], "files": written}, indent=2) + "\n")
        _swap_in(path, tmp, written + [OUTPUT_MANIFEST], (_manifest_files(path) or []) + [OUTPUT_MANIFEST])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                path.rmdir()  # only if empty: never more than this call made
        raise


def _swap_in(path: Path, tmp: Path, new: list[str], old: list[str]) -> None:
    """Move ``old`` entries of ``path`` into a folder aside, ``new`` entries of ``tmp`` into ``path``, then delete
    the old ones and ``tmp``; a failure while moving puts the old entries back. Every move is a rename within
    ``path``'s file system."""
    aside = Path(tempfile.mkdtemp(dir=path, prefix=_TMP_PREFIX, suffix=".old"))
    moved_old, moved_new = [], []
    try:
        for name in old:
            if os.path.lexists(path / name):
                os.replace(path / name, aside / name)
                moved_old.append(name)
        for name in new:
            os.replace(tmp / name, path / name)
            moved_new.append(name)
    except BaseException:
        for name in moved_new:
            with contextlib.suppress(OSError):
                os.replace(path / name, tmp / name)
        for name in moved_old:
            with contextlib.suppress(OSError):
                os.replace(aside / name, path / name)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    tmp.rmdir()


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
