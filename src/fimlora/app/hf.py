"""``hf:NAME[:CONFIG]``: a task from a Hugging Face hub dataset (needs the network and ``fimlora[hf]``)."""

from __future__ import annotations

from ..extras import require
from .metrics import GLUE_METRICS, MISMATCHED, glue_task
from .tasks import TaskData
from .user_files import _file_kind, _rows_from_records

__all__ = ["hub_task", "hub_load_dataset", "load_hub"]

def hub_load_dataset(spec: str):
    """``datasets.load_dataset``; the ``datasets`` package is an extra, so its absence says how to install it."""
    return require("datasets", "hf", f"data: hf:{spec}").load_dataset


def load_hub(spec: str, seed: int) -> TaskData:  # pragma: no cover - needs the network
    load_dataset = hub_load_dataset(spec)
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
