"""``fimlora calibrate`` as a job: settings in a validated dataclass, outputs written atomically.

The CLI builds a :class:`CalibrateJob` from its arguments and calls :func:`run_calibrate`; nothing
else happens in the CLI. Every setting is checked before the model is loaded, so a bad value costs
no calibration time, and the output folder appears only when everything in it is written.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..allocation import RankAllocation
from ..config import FIM_DEFAULTS, FimConfig, check_bool, check_fraction, check_int, check_number
from ..io import atomic_directory, check_output_dir, output_path
from ..modules import DORA_8BIT_REASON
from ..rankmap import save_rank_map
from .builders import (
    build_base_model,
    build_calibration_loader,
    build_lora_config,
    build_peft_model,
    build_tokenizer,
    normalize_target_modules,
    require_bitsandbytes,
)
from .tasks import TaskData, is_user_file, load_task
from .user_files import check_task_type

__all__ = ["CalibrateJob", "CalibrateResult", "MIN_MAX_LENGTH", "check_dora_quantization", "check_one_quantization",
           "parse_budget", "run_calibrate"]

logger = logging.getLogger(__name__)

# Below this a sentence pair or a prompt with its answer no longer fits: the data would be mostly cut.
MIN_MAX_LENGTH = 8


@dataclass
class CalibrateJob:
    """What ``fimlora calibrate`` (and the demo, which extends it) needs; validated on construction."""

    model: str
    data: str
    out: str
    target_modules: list[str] | str | None = None
    n_layers: int | None = None
    batch_size: int = 16
    max_length: int = 128
    max_train: int | None = None
    task_type: str | None = None  # a text/label file's labels: "classification" or "regression" (target numbers)
    r: int = 8
    alpha: float | None = None
    # How to calibrate (n_batches, r_min, r_max, estimator, seed, ...); budget, max_lora_rank and progress come from
    # the job's own fields (the budget's command-line forms are parsed here), see fim_config().
    fim: FimConfig = field(default_factory=FimConfig)
    budget: int | str | None = None
    budget_params: int | None = None
    max_lora_rank: int | None = None
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    use_dora: bool = False
    overwrite: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_int("r", self.r, minimum=1)
        check_number("alpha", self.alpha, minimum=0, allow_none=True)
        check_int("batch_size", self.batch_size, minimum=1)
        check_int("max_length", self.max_length, minimum=MIN_MAX_LENGTH)
        check_int("n_layers", self.n_layers, minimum=1, allow_none=True)
        check_int("max_train", self.max_train, minimum=1, allow_none=True)
        data = Path(self.data).expanduser()
        if data.is_dir():
            raise ValueError(f"data: {data} is a folder; give a .jsonl/.csv file, a bundled task or hf:NAME")
        self.target_modules = normalize_target_modules(self.target_modules)
        for name in ("load_in_4bit", "load_in_8bit", "use_dora"):
            check_bool(name, getattr(self, name))
        check_task_type("task_type", self.task_type)
        check_one_quantization(self.load_in_4bit, self.load_in_8bit)
        check_dora_quantization(self.load_in_8bit, self.use_dora)
        if self.quantization is not None:
            require_bitsandbytes(f"load_in_{self.quantization}", self.quantization)
        self.fim_config()  # every FimConfig rule, before any model is loaded

    @property
    def quantization(self) -> str | None:
        """The base model's bitsandbytes quantisation for :func:`build_base_model`: "4bit", "8bit" or None."""
        return "4bit" if self.load_in_4bit else "8bit" if self.load_in_8bit else None

    def fim_config(self) -> FimConfig:
        budget, fraction = parse_budget(self.budget)
        if self.budget is not None and self.budget_params is not None:
            raise ValueError(f"budget, budget_params: give at most one, got budget={self.budget!r} and "
                             f"budget_params={self.budget_params!r}")
        # A fraction ("0.5x") is of the uniform adapter's size in parameters, the size that is served and stored.
        unit = "params" if self.budget_params is not None or fraction is not None else "rank"
        return dataclasses.replace(self.fim, progress=self.progress, max_lora_rank=self.max_lora_rank,
                                   budget=self.budget_params if self.budget_params is not None else budget,
                                   budget_unit=unit, budget_fraction=fraction)

    @classmethod
    def from_settings(cls, **settings):
        """The job from flat settings (the command's flags): the job's own fields, and any FimConfig setting
        (``n_batches`` as a number or ``"auto"``, ``r_min``, ...) into :attr:`fim`."""
        own = {f.name for f in dataclasses.fields(cls)}
        fim = {k: settings.pop(k) for k in list(settings) if k not in own and k in FIM_DEFAULTS}
        if "n_batches" in fim:
            fim["n_batches"] = parse_n_batches(fim["n_batches"])
        return cls(**settings, fim=FimConfig(**fim))

    @property
    def seed(self) -> int:
        """One seed for the job: data order, head init and FIM-LoRA's new A rows (:attr:`FimConfig.seed`)."""
        return self.fim.seed


def parse_n_batches(value: int | str) -> int | str:
    """``--n-batches``: a number of batches, or ``auto`` (calibrate until the rank map is stable)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"n_batches: must be a positive integer or 'auto', got {value!r}") from None


def parse_budget(value: int | str | None) -> tuple[int | None, float | None]:
    """(budget in ranks, fraction) from ``--budget``: ``N`` ranks, or ``0.5x`` of the uniform adapter's size."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value, None
    text = str(value).strip()
    try:
        if text.lower().endswith("x"):
            fraction = float(text[:-1])
        else:
            return int(text), None
    except ValueError:
        raise ValueError(f"budget: must be a whole number of ranks (e.g. 56) or a fraction of the uniform adapter's "
                         f"size in parameters (0.5x), got {value!r}") from None
    check_fraction("budget", fraction)
    return None, fraction


def check_one_quantization(load_in_4bit: bool, load_in_8bit: bool) -> None:
    """A base model is loaded in 4 bits or in 8 bits, never both."""
    if load_in_4bit and load_in_8bit:
        raise ValueError("load_in_4bit, load_in_8bit: choose at most one quantisation of the base model "
                         "(4-bit NF4 or 8-bit), got both true")


def check_dora_quantization(load_in_8bit: bool, use_dora: bool) -> None:
    """DoRA on an 8-bit base is refused before any model is loaded: bitsandbytes fails on its second
    forward/backward (stock PEFT too), after the model load and calibration were spent."""
    if load_in_8bit and use_dora:
        raise ValueError(f"load_in_8bit, use_dora: DoRA on an 8-bit base is not supported: {DORA_8BIT_REASON}; give "
                         "one of them: DoRA on a base that is not 8-bit, or plain LoRA on the 8-bit base")


@dataclass
class CalibrateResult:
    allocation: RankAllocation
    task: TaskData
    seconds: float
    out: Path
    files: list[Path]
    notes: list[str]


def run_calibrate(job: CalibrateJob) -> CalibrateResult:
    """Calibrate, allocate and resize; write ``adapter/``, ``rank_map.json`` (and ``.png``) into ``job.out``.

    The outputs are written into a temporary folder inside ``job.out`` and moved into place together
    (:func:`fimlora.io.atomic_directory`, the output rule of every command), so an interrupted run leaves the
    folder as it was.
    """
    from ..api import apply_fim_ranks

    out = output_path(job.out)
    inputs = (job.data, job.model)
    check_output_dir(out, job.overwrite, inputs)
    # A user's file is all training data here: calibration never evaluates, so nothing is held out.
    # A bundled task keeps its recorded split, so its test part stays unseen.
    test_fraction = 0.0 if is_user_file(job.data) else None
    task = load_task(job.data, seed=job.seed, max_train=job.max_train, test_fraction=test_fraction,
                     task_type=job.task_type)
    # A user can act on what was dropped from their own file; a bundled task's drops are part of its recipe.
    log = logger.warning if is_user_file(job.data) else logger.info
    for note in task.meta.get("dropped", []):
        log("data: %s", note)
    tok = build_tokenizer(job.model)
    base = build_base_model(job.model, task, job.n_layers, seed=job.seed, quantization=job.quantization)
    lora_config = build_lora_config(task.kind, job.r, job.alpha, job.target_modules, use_dora=job.use_dora)
    model = build_peft_model(base, lora_config, job.seed)
    loader = build_calibration_loader(task, tok, job.batch_size, job.max_length, job.seed)
    start = time.perf_counter()
    allocation = apply_fim_ranks(model, loader, config=job.fim_config())
    seconds = time.perf_counter() - start
    # What the adapter cannot say itself: the labels' order behind the classifier's outputs, and a model cut to its
    # first n_layers (adapter_config.json names the whole model, on which the cut-off layers get no adapter).
    allocation.settings.update({"model": job.model, "data": job.data, "calibration_seconds": seconds,
                                "data_meta": task.meta, "quantization": job.quantization, "use_dora": job.use_dora,
                                "n_layers": job.n_layers, "label_names": task.label_names})
    if job.n_layers is not None:
        logger.warning("model: the adapter was made on %s cut to its first %d layers; it fits that cut model, "
                       "not the whole one its adapter_config.json names (whose other layers it leaves un-adapted): "
                       "give check and export --for merged the same --n-layers %d", job.model, job.n_layers,
                       job.n_layers)
    with atomic_directory(out, overwrite=job.overwrite, inputs=inputs) as tmp:
        model.save_pretrained(tmp / "adapter")
        files, notes = save_rank_map(allocation, tmp)
    files = [out / "adapter"] + [out / f.name for f in files]
    return CalibrateResult(allocation, task, seconds, out, files, notes)
