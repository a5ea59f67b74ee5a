"""The one place that turns settings into objects: tokenizer, base model, LoRA config, calibration
loader and FimConfig. The CLI, the demo and every experiment run build through these functions.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Mapping

import torch

from ..config import FIM_DEFAULTS, FimConfig, check_keys
from ..extras import require
from .collators import collator_for
from .models import load_causal_lm, load_classifier, load_tokenizer
from .tasks import HEAD_KINDS, TaskData

__all__ = [
    "QUANTIZATIONS",
    "ALL_LINEAR",
    "task_type_for",
    "normalize_target_modules",
    "build_quantization_config",
    "build_tokenizer",
    "check_quantization",
    "require_bitsandbytes",
    "quantized_device_map",
    "build_base_model",
    "build_lora_config",
    "build_peft_model",
    "build_calibration_loader",
    "build_fim_config",
    "check_tokenizer_coverage",
]

logger = logging.getLogger(__name__)

# The CLI and the configs take their defaults from here, so there is one list of them.

# Base-model quantisations (bitsandbytes): 4-bit NF4 as in QLoRA, or LLM.int8().
QUANTIZATIONS = ("4bit", "8bit")
# Names of the new classification heads (BERT-style, LLaMA-style): trained whole, so never quantised.
CLASSIFICATION_HEADS = ("classifier", "score")
# PEFT's shortcut for "every linear layer except the output layer"; PEFT only reads it as a plain string.
ALL_LINEAR = "all-linear"

# Fraction of unknown tokens above which calibration data is almost certainly mis-tokenised.
UNKNOWN_TOKEN_WARNING = 0.5


def task_type_for(kind: str) -> str:
    """PEFT task type for a task kind: a classification (or regression) head or a causal LM."""
    return "SEQ_CLS" if kind in HEAD_KINDS else "CAUSAL_LM"


def build_tokenizer(model: str):
    """The model's tokenizer (pad token set); refuses a folder without a usable tokenizer."""
    return load_tokenizer(model)


def check_quantization(quantization: str | None) -> None:
    """None or one of :data:`QUANTIZATIONS`."""
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization: must be one of {list(QUANTIZATIONS)} or None, got {quantization!r}")


def require_bitsandbytes(field: str, quantization: str) -> None:
    """bitsandbytes is an extra: without it, say which ``pip install`` adds it (before any model is loaded)."""
    require("bitsandbytes", "qlora", f"{field}: loading the base model in {quantization[0]} bits")


def build_quantization_config(quantization: str, compute_dtype: torch.dtype = torch.float32,
                              skip_modules: list[str] | None = None):
    """BitsAndBytesConfig: NF4 with double quantisation (QLoRA's recipe) for "4bit", LLM.int8() for "8bit".

    ``skip_modules`` stay in full precision (a new classification head is trained whole, not quantised).
    """
    from transformers import BitsAndBytesConfig

    check_quantization(quantization)
    require_bitsandbytes("quantization", quantization)
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)


def quantized_device_map():
    """bitsandbytes places the quantised weights when the model loads: the first GPU if there is one, else CPU."""
    return {"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu"


def build_base_model(model: str, task: TaskData, n_layers: int | None = None, seed: int = 0,
                     dtype: torch.dtype = torch.float32, quantization: str | None = None):
    """A classifier with a seeded head for classification (one output for regression) tasks, else a causal LM.

    ``quantization`` ("4bit" or "8bit") loads the weights through bitsandbytes and then runs PEFT's
    ``prepare_model_for_kbit_training`` (frozen base, norms and head in fp32), ready for ``get_peft_model``.
    """
    check_quantization(quantization)
    load = {}
    if quantization is not None:
        skip = list(CLASSIFICATION_HEADS) if task.kind in HEAD_KINDS else None
        load = {"quantization_config": build_quantization_config(quantization, dtype, skip),
                "device_map": quantized_device_map()}
    if task.kind in HEAD_KINDS:
        base = load_classifier(model, task.num_labels, n_layers, seed=seed, regression=task.kind == "regression",
                               **load)
    else:
        base = load_causal_lm(model, n_layers, dtype=dtype, **load)
    if quantization is None:
        return base
    from peft import prepare_model_for_kbit_training

    # No gradient checkpointing here: calibration is a few backward passes, and a trainer turns it on itself.
    return prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)


def normalize_target_modules(target_modules):
    """PEFT's target_modules from what a user typed: ``["all-linear"]`` becomes the string PEFT expects.

    PEFT reads the shortcut only as a plain string; in a list it looks for a module called "all-linear" and finds
    none. The shortcut names every linear layer, so it cannot be combined with other names.
    """
    if target_modules is None or isinstance(target_modules, str):
        return target_modules
    names = list(target_modules)
    shortcut = [n for n in names if isinstance(n, str) and n.lower() == ALL_LINEAR]
    if not shortcut:
        return names
    if len(names) > 1:
        raise ValueError(f"target_modules: {ALL_LINEAR!r} already names every linear layer and cannot be combined "
                         f"with other module names, got {names}")
    return ALL_LINEAR


def build_lora_config(kind: str, r: int, lora_alpha: float | None = None, target_modules=None,
                      lora_dropout: float = 0.0, use_dora: bool = False, **extra):
    """LoraConfig for a task kind; ``lora_alpha`` defaults to 2r; ``target_modules`` may be ``["all-linear"]``."""
    from peft import LoraConfig

    alpha = 2 * r if lora_alpha is None else lora_alpha
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=normalize_target_modules(target_modules),
                      lora_dropout=lora_dropout, use_dora=use_dora, task_type=task_type_for(kind), **extra)


@contextlib.contextmanager
def quiet_peft():
    """PeftModel's constructor (get_peft_model, from_pretrained) reads transformers' deprecated
    is_gradient_checkpointing; the FutureWarning is nothing for a user to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def reload_adapter(base, adapter_dir):
    """Stock ``PeftModel.from_pretrained`` of a saved adapter onto ``base``, in eval mode."""
    from peft import PeftModel

    with quiet_peft():
        return PeftModel.from_pretrained(base, adapter_dir).eval()


def build_peft_model(base, peft_config, seed: int | None = 0, **kwargs):
    """``get_peft_model`` (A drawn from ``seed`` unless None); target modules that select nothing LoRA can adapt are
    refused first (:func:`check_target_modules`), with the model untouched."""
    from peft import get_peft_model

    check_target_modules(base, peft_config)
    if seed is not None:
        torch.manual_seed(seed)
    with quiet_peft():
        try:
            return get_peft_model(base, peft_config, **kwargs)
        except ValueError as e:
            if "No modules were targeted" not in str(e) and "not found in the base model" not in str(e):
                raise
            # What check_target_modules could not foresee (a custom dispatcher, a PEFT rule it does not read).
            raise _no_match_error(base, peft_config, peft_config.target_modules, "PEFT targets none") from None


def _no_match_error(base, peft_config, targets, rule: str) -> ValueError:
    """target_modules that select nothing, named with the model's real linear-layer names to choose from."""
    return ValueError(f"target_modules: {targets!r} match no module of {type(base).__name__} ({rule}); its linear "
                      f"layers are named {_choices(base, peft_config)}")


def _choices(model, peft_config) -> list[str]:
    """The linear layers a user can give LoRA: not the task heads PEFT trains whole."""
    from peft.tuners.tuners_utils import check_target_module_exists

    saved = _unfiltered(as_peft_matches(peft_config), "modules_to_save")
    heads = set()
    for name, _ in model.named_modules():
        saved.target_modules = {name}
        if name and not check_target_module_exists(saved, name):
            heads.add(name.rsplit(".", 1)[-1])
    return [n for n in linear_layer_names(model) if n not in heads]


def as_peft_matches(peft_config):
    """The config PEFT matches module names with: for SEQ_CLS, PeftModelForSequenceClassification first adds the
    classification heads to modules_to_save (trained whole, so never LoRA-adapted), and matching skips them."""
    config = copy.copy(peft_config)
    if config.task_type == "SEQ_CLS":
        config.modules_to_save = [*(config.modules_to_save or []), *CLASSIFICATION_HEADS]
    return config


# The config fields that remove a module target_modules matches, as PEFT applies them.
_FILTERS = {"modules_to_save": ("modules_to_save",), "exclude_modules": ("exclude_modules",),
            "layers_to_transform": ("layers_to_transform", "layers_pattern")}


def _unfiltered(config, keep: str | None = None):
    """``config`` with every filter of :data:`_FILTERS` off but ``keep``."""
    one = copy.copy(config)
    for label, names in _FILTERS.items():
        if label != keep:
            for name in names:
                setattr(one, name, None)
    return one


def _removed_by(config, key: str) -> list[str]:
    """The filters of ``config`` that each on its own remove module ``key`` (which its target_modules match)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    if not check_target_module_exists(_unfiltered(config), key):
        return []
    # An excluded module comes back as a falsy marker, not False.
    return [label for label in _FILTERS if not check_target_module_exists(_unfiltered(config, label), key)]


def check_target_modules(model, peft_config) -> None:
    """Refuse target_modules that would give LoRA to nothing, or that PEFT cannot adapt, before ``get_peft_model``.

    By PEFT's own rule (``check_target_module_exists`` on the config PEFT matches with, :func:`as_peft_matches`),
    each name of a list (a regex string as a whole) must select a module, and that module must not be removed by
    exclude_modules or layers_to_transform or be a head trained whole (modules_to_save); the first name that fails
    is named with the reason. A selected module that is not linear-like (a norm, a whole block) is refused here in
    one line rather than by PEFT's dump of the module. ``"all-linear"`` is PEFT's to expand, and not checked.
    """
    from peft.tuners.tuners_utils import check_target_module_exists

    targets = peft_config.target_modules
    if targets is None or targets == ALL_LINEAR:
        return
    unmatched = unmatched_target_modules(model, peft_config)
    config = as_peft_matches(peft_config)
    modules = [(name, module) for name, module in model.named_modules() if name]
    for target in [targets] if isinstance(targets, str) else sorted(targets):
        one = copy.copy(config)
        one.target_modules = target if isinstance(targets, str) else {target}
        if target in unmatched or isinstance(targets, str):
            matched = [name for name, _ in modules if check_target_module_exists(_unfiltered(one), name)]
            if not matched and not isinstance(targets, str):
                continue  # matches no name at all: reported for every such name together, below
            removed = {label for name in matched for label in _removed_by(one, name)}
            if matched and not any(check_target_module_exists(one, name) for name in matched):
                raise ValueError(_removed_error(target, matched, removed, one, model, peft_config))
        for name, module in modules:
            if check_target_module_exists(one, name) and not _lora_adaptable(module):
                raise ValueError(f"target_modules: {target!r} selects {name}, a non-linear module of type "
                                 f"{type(module).__name__} that LoRA cannot adapt; its linear layers are named "
                                 f"{_choices(model, peft_config)}")
    if unmatched:
        # PEFT adapts whatever part of a list matches, so one misspelt name would silently go un-adapted.
        raise _no_match_error(model, peft_config, unmatched, "every name must match one")


def _removed_error(target, matched: list[str], removed: set[str], config, model, peft_config) -> str:
    """Why ``target``, which matches ``matched``, selects nothing: the filters that removed every match."""
    model_type, choices = type(model).__name__, _choices(model, peft_config)
    if removed == {"modules_to_save"}:
        return (f"target_modules: {target!r} selects {', '.join(matched)}, trained whole as modules_to_save "
                f"{list(config.modules_to_save)} (the task head of {model_type}), and cannot take LoRA; its linear "
                f"layers are named {choices}")
    why = " and ".join(f"{label}={getattr(config, label)!r}" for label in _FILTERS if label in removed)
    return (f"target_modules: {target!r} matches {len(matched)} module(s) of {model_type} (e.g. {matched[0]}), "
            f"but {why} removed every one; its linear layers are named {choices}")


def _lora_adaptable(module) -> bool:
    """Whether LoRA can wrap ``module``: it holds a weight matrix of its own (linear, Conv1D, conv, embedding,
    attention's in_proj_weight), or is a leaf with a matrix buffer (a quantised linear's packed weight). A norm (a
    1-d weight) or a block of modules (an embeddings block holds only position-id buffers) cannot take one."""
    if any(p.ndim >= 2 for p in module.parameters(recurse=False)):
        return True
    return next(module.children(), None) is None and any(b.ndim >= 2 for b in module.buffers(recurse=False))


def unmatched_target_modules(model, peft_config) -> list[str]:
    """The names in a ``target_modules`` list that select no module of ``model``, sorted, by PEFT's own rule
    (``check_target_module_exists`` on the config PEFT matches with, so ``exclude_modules``,
    ``layers_to_transform`` and the task heads PEFT trains whole count: a name whose only matches are removed
    selects nothing). A string (a regex or "all-linear") is not checked."""
    from peft.tuners.tuners_utils import check_target_module_exists

    targets = peft_config.target_modules
    if targets is None or isinstance(targets, str):
        return []
    config = as_peft_matches(peft_config)
    keys = [name for name, _ in model.named_modules() if name]
    unmatched = []
    for target in sorted(targets):
        one = copy.copy(config)
        one.target_modules = {target}
        # An excluded module comes back as a falsy marker, not False.
        if not any(check_target_module_exists(one, key) for key in keys):
            unmatched.append(target)
    return unmatched


def linear_layer_names(model, limit: int = 12) -> list[str]:
    """The distinct last name parts of a model's linear layers (what target_modules usually lists)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Conv1D", "Linear4bit", "Linear8bitLt"):
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in names:
                names.append(leaf)
    return names[:limit]


def build_calibration_loader(task: TaskData, tokenizer, batch_size: int, max_length: int, seed: int = 0):
    """Shuffled (seeded) batches of the task's training split, collated with labels."""
    from torch.utils.data import DataLoader

    if not task.train:
        raise ValueError(f"data: task {task.name!r} has no training examples to calibrate on")
    check_tokenizer_coverage(tokenizer, task)
    g = torch.Generator().manual_seed(seed)
    return DataLoader(task.train, batch_size=batch_size, shuffle=True, generator=g,
                      collate_fn=collator_for(task, tokenizer, max_length))


def build_fim_config(settings: Mapping | None = None, **overrides) -> FimConfig:
    """FimConfig from a settings mapping (a config's ``fim:`` block) plus explicit overrides."""
    merged = {**(settings or {}), **overrides}
    check_keys("fim", merged, FIM_DEFAULTS)
    return FimConfig(**merged)


def _sample_texts(task: TaskData, limit: int = 64) -> list[str]:
    texts = []
    for row in task.train[:limit]:
        if "text" in row:
            texts.append(row["text"])
        elif "context" in row:
            texts.append(f"{row['context']} {row['choices'][row['answer']]}")
    return texts


def check_tokenizer_coverage(tokenizer, task: TaskData) -> float:
    """Share of unknown tokens over the first training texts; warns above one half."""
    unk = getattr(tokenizer, "unk_token_id", None)
    texts = _sample_texts(task)
    if unk is None or not texts:
        return 0.0
    ids = [i for t in texts for i in tokenizer(t, add_special_tokens=False)["input_ids"]]
    share = sum(i == unk for i in ids) / max(1, len(ids))
    if share > UNKNOWN_TOKEN_WARNING:
        warnings.warn(
            f"tokenizer: {share:.0%} of the calibration tokens of {task.name!r} are unknown "
            f"({tokenizer.unk_token!r}); the tokenizer does not fit this data or this model",
            stacklevel=2,
        )
    return share
