"""A user's own data file (JSON Lines, a JSON array or CSV) read into a :class:`~.tasks.TaskData`, with the rules
that decide what its rows and labels are; every error names the file, the line and the problem."""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

from .tasks import TASK_TYPES, TaskData, _input_key, _split, is_user_file

logger = logging.getLogger(__name__)

__all__ = ["load_user_file", "alpaca_prompt", "check_task_type", "REGRESSION_LABEL_LIMIT", "ALPACA_PROMPT",
           "ALPACA_PROMPT_INPUT"]



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
