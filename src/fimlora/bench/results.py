"""One run's result: what the sweep writes as ``RUN_ID.json`` and the report reads back.

:class:`RunResult` names every key a result has; its JSON keeps the keys (and their order) the sweep has always
written, so older readers and every result under ``results/`` read alike. Result files written before a key existed
go through :func:`upgrade`, the one place that knows how older results differ.

A RunResult is also a read-only mapping of its keys (``run["metrics"]``, ``run.get("config")``), so the report's
table code reads a loaded result and a plain dict (a test's hand-made run) the same way.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

__all__ = ["RunResult", "upgrade", "read_result", "load_results", "FINISHED"]

# The statuses of a run that finished (a diverged run is a result too: its row says so).
FINISHED = ("ok", "diverged")


@dataclass(frozen=True)
class RunResult:
    """One finished run (``status`` ok or diverged).

    Identity: ``run_id`` = ``{task}__{method}__r{r}__s{seed}`` plus ``__{key}{value}`` per FIM variant setting.
    ``metrics``: {eval task: {metric: 0-1, "n": test size, "primary": headline metric, "correct": [0/1 per test
    example]}}. ``rank_map`` / ``rank_map_before_training``: {module: rank} after and before training.
    ``method_info``: what the method decided (scores, EVA's ranks, AdaLoRA's schedule, ...). ``config``: the
    experiment config as ``asdict`` gives it; ``data_contents`` and ``settings_hash``: what the result stands for
    (:func:`~fimlora.bench.config.run_settings_hash`); ``reused_from``: the result file it was copied from.
    ``learning_rate``: what it trained at; ``validation_metrics``: like ``metrics``, on the validation split
    carved from the training data (configs with ``data.max_validation``); ``served_params``: the parameters of
    the adapter as saved for serving (PiSSA and LoRA-GA save as plain LoRA of rank 2r); ``lr_choice``: for a run
    repeated at its cell's chosen learning rate, the choice (:class:`~fimlora.bench.lr_protocol.LrChoice`).
    ``validation_loss_curve``: [[step, validation loss], ...] during training (``train.eval_steps``).
    ``extra``: keys this code does not know, kept as read and written back after the known ones.
    """

    run_id: str
    status: str
    experiment: str = ""
    task: str = ""
    method: str = ""
    r: int = 0
    seed: int = 0
    fim_variant: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    rank_map: dict = field(default_factory=dict)
    rank_map_before_training: dict = field(default_factory=dict)
    trainable_params: int = 0
    calibration_seconds: float = 0.0
    train_seconds: float = 0.0
    train_loss: float | None = None
    train_steps: int = 0
    divergence: dict | None = None
    method_info: dict = field(default_factory=dict)
    data_meta: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    machine: dict = field(default_factory=dict)
    config: dict | None = None
    data_contents: dict | None = None
    settings_hash: str | None = None
    wall_seconds: float | None = None
    reused_from: str | None = None
    learning_rate: float | None = None
    validation_metrics: dict | None = None
    served_params: int | None = None
    validation_loss_curve: list | None = None
    lr_choice: dict | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping, upgraded: bool = False) -> RunResult:
        """The result in ``d`` (a result file's JSON), through :func:`upgrade` unless ``upgraded``."""
        d = dict(d) if upgraded else upgrade(d)
        known = {f.name for f in fields(cls)} - {"extra"}
        for key in ("run_id", "status"):
            if not isinstance(d.get(key), str) or not d[key]:
                raise ValueError(f"{key}: a run result needs a non-empty string, got {d.get(key)!r}")
        return cls(**{k: v for k, v in d.items() if k in known},
                   extra={k: v for k, v in d.items() if k not in known})

    def to_dict(self) -> dict:
        """The JSON object the sweep writes: every key in the order results have always had, then ``extra``;
        a key added later (``data_contents``, ``settings_hash``, ``reused_from``, ...) only when set."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        for key in _LATER:
            if out[key] is None:
                del out[key]
        return out | self.extra

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str) + "\n"

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    # A read-only mapping of the JSON keys (those of :meth:`to_dict`), so that code written for result dicts reads
    # a RunResult alike.
    def __getitem__(self, key: str):
        if key in _FIELDS and not (key in _LATER and getattr(self, key) is None):
            return getattr(self, key)
        return self.extra[key]

    def get(self, key: str, default=None):
        try:
            return self[key]
        except KeyError:
            return default

    def keys(self):
        return self.to_dict().keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __contains__(self, key) -> bool:
        return self.get(key, _ABSENT) is not _ABSENT


_ABSENT = object()
_FIELDS = frozenset(f.name for f in fields(RunResult)) - {"extra"}
Mapping.register(RunResult)

# Keys written only when set: results made before they existed lack them.
_LATER = ("config", "data_contents", "settings_hash", "wall_seconds", "reused_from", "learning_rate",
          "validation_metrics", "served_params", "lr_choice", "validation_loss_curve")


def upgrade(d: Mapping) -> dict:
    """A result file's JSON as the current code reads it; every difference of older results is handled here.

    * ``fim_variant`` and ``method_info`` missing or null (the first results): {}; the report reads them
      without a fallback.
    * ``settings_hash`` missing (results written before hashes were recorded): the hash of the config it recorded
      (:func:`~fimlora.bench.config.run_settings_hash`, without data contents: those results did not record
      them, so one that read a user's file cannot match a current run and runs again); none when that config
      lacks a key every config has.

    Keys are never renamed, and a result that has every key comes back equal.
    """
    d = dict(d)
    for key in ("fim_variant", "method_info"):
        if d.get(key) is None:
            d[key] = {}
    if d.get("settings_hash") is None and isinstance(d.get("config"), dict) and _has_identity(d):
        from .config import RunSpec, run_settings_hash

        lr = d.get("learning_rate") if d["config"].get("lr_grid") else None
        spec = RunSpec(d["task"], d["method"], d["r"], d["seed"], tuple(sorted(d["fim_variant"].items())), lr)
        try:
            d["settings_hash"] = run_settings_hash(d["config"], spec)
        except KeyError:  # a config without a required key (model, ...): no run it could stand for
            pass
    return d


def _has_identity(d: Mapping) -> bool:
    return all(isinstance(d.get(k), str) for k in ("task", "method")) and all(
        isinstance(d.get(k), int) for k in ("r", "seed"))


def read_result(path: str | Path) -> RunResult:
    """The result in ``path``; OSError or ValueError (a torn file, not JSON, not a run) when there is none."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a run result is a JSON object, got {type(data).__name__}")
    return RunResult.from_dict(data)


# JSON files a results folder may hold besides run results.
NOT_RUN_RESULTS = ("demo_results.json", "rank_map.json", "benchmarks.json")
# Folders the sweep keeps beside the results: work in progress, superseded runs, locks and saved adapters.
NOT_RESULT_FOLDERS = {".work", ".stale", ".locks", "adapters"}


def load_results(results_dirs) -> list[RunResult]:
    """Every finished run below the folder(s), through :func:`upgrade` (failed runs have ``.error.json`` and are
    skipped; a file that is not a run result is left out with a warning)."""
    if isinstance(results_dirs, (str, Path)):
        results_dirs = [results_dirs]
    runs = []
    paths = sorted(p for d in results_dirs for p in Path(d).rglob("*.json"))
    for path in paths:
        if path.name.endswith(".error.json") or NOT_RESULT_FOLDERS & set(path.parts):
            continue
        run = _read_run(path)
        if run is not None:
            runs.append(run)
    return runs


def _read_run(path: Path) -> RunResult | None:
    """The finished run in ``path``, or None: silently for an unfinished run or a known non-run file, with a
    warning for anything else that is not a run result."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        warnings.warn(f"results: could not read {path} ({e}); left out of the report", stacklevel=3)
        return None
    if not isinstance(data, dict) or not data.get("run_id"):
        if path.name not in NOT_RUN_RESULTS:
            warnings.warn(f"results: {path} is not a run result (no run_id); left out of the report", stacklevel=3)
        return None
    if data.get("status") not in FINISHED:
        return None
    try:
        return RunResult.from_dict(data)
    except (TypeError, ValueError) as e:
        warnings.warn(f"results: {path} is not a run result ({e}); left out of the report", stacklevel=3)
        return None
