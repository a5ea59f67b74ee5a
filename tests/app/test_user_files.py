"""Users' own data files: labels, CSV rows, encodings, JSON arrays, a separate test file, the hf extra."""

from __future__ import annotations

import json
import sys

import pytest

from fimlora.app.tasks import load_task
from fimlora.app.user_files import load_user_file


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def write_text(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return str(path)


# Labels


@pytest.mark.parametrize("labels", [[0, 1, 0.0, 1.0], ["0", "1", "0.0", "1.0"], [0, "1", "0.0", 1.0]])
def test_equal_numeric_labels_are_one_class(tmp_path, labels):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": f"t{i}", "label": labels[i % 4]} for i in range(8)])
    task = load_user_file(p, test_fraction=0.0)
    assert task.label_names == ["0", "1"] and task.num_labels == 2
    assert sorted(e["label"] for e in task.train) == [0] * 4 + [1] * 4


def test_csv_numeric_labels_are_one_class(tmp_path):
    p = write_text(tmp_path / "d.csv", "text,label\na,1\nb,1.0\nc,0\nd,0.00\n")
    task = load_user_file(p, test_fraction=0.0)
    assert task.label_names == ["0", "1"]
    assert {e["text"]: e["label"] for e in task.train} == {"a": 1, "b": 1, "c": 0, "d": 0}


def test_numeric_labels_sort_numerically(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": f"t{i}", "label": v} for i, v in enumerate([10, 2, -1, 2.5])])
    # 2.5 is not whole, so these numbers read as scores unless declared classes (issue 20, 4)
    assert load_user_file(p, test_fraction=0.0, task_type="classification").label_names == ["-1", "2", "2.5", "10"]


def test_word_labels_stay_words(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": f"t{i}", "label": v} for i, v in enumerate(["pos", " neg", 3])])
    assert load_user_file(p, test_fraction=0.0).label_names == ["3", "neg", "pos"]


def test_boolean_labels(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": f"t{i}", "label": i % 2 == 0} for i in range(4)])
    task = load_user_file(p, test_fraction=0.0)
    assert task.label_names == ["false", "true"]
    assert {e["text"]: e["label"] for e in task.train} == {"t0": 1, "t1": 0, "t2": 1, "t3": 0}


@pytest.mark.parametrize("labels", [[1, 1.0, "1"], ["pos", "pos ", "pos"]])
def test_single_class_is_an_error(tmp_path, labels):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": f"t{i}", "label": v} for i, v in enumerate(labels)])
    label = "1" if labels[0] == 1 else "pos"
    with pytest.raises(ValueError, match=rf"d.jsonl: every example has the label '{label}'; .* at least two classes"):
        load_user_file(p)


def test_label_that_is_a_list_is_an_error(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": [1]}])
    with pytest.raises(ValueError, match=r"d.jsonl: line 2: label \[1\] is not a string, number or boolean"):
        load_user_file(p)


# CSV


def test_csv_row_with_an_extra_field_names_its_line(tmp_path):
    p = write_text(tmp_path / "d.csv", "text,label\ngood film,1\nbad, really bad,0\n")
    with pytest.raises(ValueError, match=r"d.csv: line 3: 3 fields, but the header has 2; .*double quotes"):
        load_user_file(p)


def test_csv_row_with_a_missing_field_names_its_line(tmp_path):
    p = write_text(tmp_path / "d.csv", "text,text_pair,label\na,b,1\nc,0\n")
    needle = r"d.csv: line 3: 2 fields, but the header has 3 \(no value for \['label'\]\)"
    with pytest.raises(ValueError, match=needle):
        load_user_file(p)


def test_csv_quoted_comma_and_byte_order_mark(tmp_path):
    p = write_text(tmp_path / "d.csv", '\ufefftext,label\r\n"bad, really bad",0\r\ngood,1\r\n')
    task = load_user_file(p, test_fraction=0.0)
    assert sorted((e["text"], e["label"]) for e in task.train) == [("bad, really bad", 0), ("good", 1)]


def test_jsonl_with_byte_order_mark(tmp_path):
    p = write_text(tmp_path / "d.jsonl", '\ufeff{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    assert len(load_user_file(p, test_fraction=0.0).train) == 2


# Encodings


@pytest.mark.parametrize("name, text, line", [
    ("d.jsonl", '{"text": "a", "label": 0}\n\n{"text": "caf\u00e9", "label": 1}\n', 3),
    ("d.csv", "text,label\na,0\ncaf\u00e9,1\n", 3),
    ("d.json", '[\n  {"text": "a", "label": 0},\n  {"text": "caf\u00e9", "label": 1}\n]\n', 3),
])
def test_non_utf8_file_names_the_line(tmp_path, name, text, line):
    p = write_text(tmp_path / name, text, encoding="latin-1")
    with pytest.raises(ValueError, match=rf"{name}: line {line}: not UTF-8 text \(byte 0xe9\); save"):
        load_user_file(p)


# .json


def test_json_array_of_objects(tmp_path):
    records = [{"text": f"t{i}", "label": ["neg", "pos"][i % 2]} for i in range(6)]
    p = write_text(tmp_path / "d.json", json.dumps(records, indent=2))
    task = load_user_file(p, test_fraction=0.0)
    assert task.label_names == ["neg", "pos"] and len(task.train) == 6


def test_json_lines_under_a_json_name_still_read(tmp_path):
    p = write_jsonl(tmp_path / "d.json", [{"text": "a", "label": 0}, {"text": "b", "label": 1}])
    assert len(load_user_file(p, test_fraction=0.0).train) == 2


@pytest.mark.parametrize("text, needle", [
    ('{"text": "a", "label": 0}', r"d.json: expected a JSON array of objects .* got a single object"),
    ("42", r"d.json: expected a JSON array of objects .* got a single number"),
    ('[{"text": "a", "label": 0}, "b"]', r"d.json: item 2 of the array: expected a JSON object, got string"),
    ('[\n  {"text": "a", "label": 0},\n  {"text": "b" "label": 1}\n]', r"d.json: line 3: not valid JSON"),
    ("[]", r"d.json: the file is empty"),
    ('[{"text": "a", "label": 0}, {"text": "b"}]', r"d.json: item 2: missing column 'label'"),
])
def test_bad_json_files(tmp_path, text, needle):
    p = write_text(tmp_path / "d.json", text)
    with pytest.raises(ValueError, match=needle):
        load_user_file(p)


# A separate test file


def pair(tmp_path, test_labels=("neg", "pos", "neg")):
    labels = ["pos", "neg"] * 3
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": f"t{i}", "label": v} for i, v in enumerate(labels)])
    test = write_jsonl(tmp_path / "val.jsonl", [{"text": f"v{i}", "label": v} for i, v in enumerate(test_labels)])
    return train, test


def test_separate_test_file(tmp_path):
    train, test = pair(tmp_path)
    task = load_task(train, seed=0, test_data=test)
    assert [e["text"] for e in task.train] == [f"t{i}" for i in range(6)]
    assert [(e["text"], e["label"]) for e in task.test] == [("v0", 0), ("v1", 1), ("v2", 0)]
    assert task.label_names == ["neg", "pos"]
    assert task.meta["train_source"] == train and task.meta["test_source"] == test
    assert task.meta["dropped"] == [] and task.meta["inputs_in_both"] == 0


def test_test_file_labels_follow_the_training_classes(tmp_path):
    # The test file alone would sort to ["1", "2"]; the training file's classes decide the indices.
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": f"t{i}", "label": i % 3} for i in range(6)])
    test = write_text(tmp_path / "val.csv", "text,label\nx,2.0\ny,1\n")
    task = load_user_file(train, test_data=test)
    assert task.label_names == ["0", "1", "2"] and [e["label"] for e in task.test] == [2, 1]


def test_test_file_label_not_in_training_is_named(tmp_path):
    train, test = pair(tmp_path, test_labels=("neg", "meh", "pos"))
    with pytest.raises(ValueError, match=r"val.jsonl: line 2: unknown label\(s\) \['meh'\] .* the classes of the "
                                         r"training file .*train.jsonl are \['neg', 'pos'\]"):
        load_user_file(train, test_data=test)


def test_test_file_of_another_kind(tmp_path):
    train, _ = pair(tmp_path)
    test = write_jsonl(tmp_path / "val.jsonl", [{"prompt": "p", "answer": "a"}])
    with pytest.raises(ValueError, match=r"val.jsonl: a generation file, but the training file .* is classification"):
        load_user_file(train, test_data=test)


def test_test_file_overlap_is_counted(tmp_path, caplog):
    train, _ = pair(tmp_path)
    test = write_jsonl(tmp_path / "val.jsonl", [{"text": "t1", "label": "neg"}, {"text": "new", "label": "pos"}])
    task = load_user_file(train, test_data=test)
    assert task.meta["inputs_in_both"] == 1 and "1 of 2 test examples" in caplog.text


@pytest.mark.parametrize("name", ["trec6", "hf:glue:sst2"])
def test_test_file_only_for_user_files(tmp_path, name):
    _, test = pair(tmp_path)
    with pytest.raises(ValueError, match=rf"data: test_data=.*val.jsonl' is only for a user's own file; '{name}'"):
        load_task(name, test_data=test)


def test_test_file_and_test_fraction_conflict(tmp_path):
    train, test = pair(tmp_path)
    with pytest.raises(ValueError, match=r"data: test_fraction=0.2 with test_data=.*is not split"):
        load_task(train, test_fraction=0.2, test_data=test)
    assert len(load_task(train, test_fraction=0.0, test_data=test).train) == 6  # calibration passes 0.0


def test_missing_test_file(tmp_path):
    train, _ = pair(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"data: .*nope.jsonl does not exist"):
        load_user_file(train, test_data=str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match=r"data: test_data 'val.txt' is not a data file"):
        load_user_file(train, test_data="val.txt")


@pytest.mark.parametrize("fraction", [1.0, -0.1, "0.2"])
def test_test_fraction_range(tmp_path, fraction):
    train, _ = pair(tmp_path)
    with pytest.raises(ValueError, match=r"data: test_fraction must be a number in \[0, 1\); got"):
        load_user_file(train, test_fraction=fraction)


# hf:


def test_hub_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"hf:glue:sst2 needs the 'datasets' package.*pip install 'fimlora\[hf\]'"):
        load_task("hf:glue:sst2")
    with pytest.raises(ValueError, match=r"pip install 'fimlora\[hf\]'"):  # the CLI reports ValueErrors as bad input
        load_task("hf:glue:sst2")
