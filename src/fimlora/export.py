"""Export an adapter so that a serving engine computes exactly what PEFT computes.

PEFT adds s_m * B_m A_m x to module m's output, with A_m (r_m, d_in), B_m (d_out, r_m) and
s_m = alpha_m / r_m (alpha_m / sqrt(r_m) with use_rslora). Engines apply their own rule
(:func:`fimlora.engines.served_scales`; each engine's record in :mod:`fimlora.engines` cites its source):

* vLLM <= 0.31 and SGLang apply one s = lora_alpha / r to every module (vLLM: / sqrt(r) with rsLoRA);
  vLLM >= 0.32 reads the patterns like PEFT.
* llama.cpp (``convert_lora_to_gguf.py`` + ``llama_adapter_lora_weight::get_scale``) applies
  sigma_m = lora_alpha / r_m with r_m the tensor's own rank, ignoring alpha_pattern and use_rslora.

Because B_m enters linearly, any engine scale sigma_m != 0 is corrected by folding the ratio into B:

    B'_m = B_m * s_m / sigma_m   =>   sigma_m * B'_m A_m x = s_m * B_m A_m x.

``--for vllm``:  config r, lora_alpha, use_rslora kept; s = lora_alpha / r (/ sqrt(r) with rsLoRA);
    B'_m = B_m * s_m / s, and alpha_pattern rewritten to alpha'_m = s * r_m (s * sqrt(r_m)), so PEFT and
    vLLM >= 0.32 also compute s for every module. A default fimlora adapter (alpha_m / r_m = alpha / r)
    has s_m = s: its tensors are copied unchanged.
``--for llama.cpp``: lora_alpha kept (> 0), alpha_pattern dropped, use_rslora false; sigma_m = alpha / r_m;
    B'_m = B_m * s_m * r_m / alpha (with rsLoRA s_m = alpha_m / sqrt(r_m), so B'_m = B_m * alpha_m sqrt(r_m) / alpha).
    PEFT reads that config with the same rule (alpha / r_m, no alpha_pattern, no rsLoRA), so the exported
    folder also reloads in PEFT with the original logits; vLLM <= 0.31 serves it wrongly unless all r_m = r.
``--for peft``: a copy with the export record.
``--for merged``: base + adapter merged by PEFT's ``merge_and_unload`` and saved as safetensors; every engine
    serves it as a plain model.

Every export writes ``fimlora_export.json`` (engine, source, the rule, per-module ranks, scales and B factors,
package versions), into a temporary folder whose contents are moved into ``out`` on success
(``io.atomic_directory``: ``--overwrite`` replaces only an earlier fimlora output).
``compute_export`` returns the plan as data; ``export_adapter`` writes it.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .adapter_files import (
    CONFIG_NAME,
    PEFT_DEFAULT_ALPHA,
    PEFT_DEFAULT_R,
    WEIGHTS_NAME,
    config_rank_alpha,
    module_rank_alpha,
    module_shapes,
    parse_tensor_key,
    read_adapter_config,
    read_module_ranks,
)
from .check import check_adapter
from .config import check_choice, first_line
from .engines import engine_refusals, only_classifier_heads, served_scales
from .io import atomic_directory, atomic_write_text, check_output_dir, package_versions
from .modules import cut_layers, pattern_keys

__all__ = ["EXPORT_ENGINES", "ExportPlan", "compute_export", "export_adapter", "load_base_model", "EXPORT_RECORD"]

logger = logging.getLogger(__name__)

EXPORT_ENGINES = ("peft", "vllm", "llama.cpp", "merged")
EXPORT_RECORD = "fimlora_export.json"
# Files an export rewrites or must not carry over (a .bin beside the safetensors would be a second, stale copy).
_REWRITTEN = {CONFIG_NAME, WEIGHTS_NAME, "adapter_model.bin", EXPORT_RECORD}
# What travels with an exported adapter (:func:`carried_files`): its model card, tokenizer and chat template, and
# fimlora's rank map.
_CARRIED = {"README.md", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
            "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
            "rank_map.json", "rank_map.png", "rank_map.svg"}
_CARRIED_PREFIXES = ("spiece.", "sentencepiece.")
_SERVE_HINTS = {
    "peft": "PeftModel.from_pretrained(base_model, DIR)",
    "vllm": "vllm serve BASE --enable-lora --lora-modules NAME=DIR --max-lora-rank K",
    "llama.cpp": "python convert_lora_to_gguf.py DIR --base BASE_HF_DIR --outfile adapter.gguf; "
                 "llama-server -m base.gguf --lora adapter.gguf",
    "merged": "vllm serve DIR  (or convert_hf_to_gguf.py DIR for llama.cpp)",
}


@dataclass
class ExportPlan:
    """What an export writes, as data: the new adapter config and, per module, the factor its lora_B is
    multiplied by (B'_m = B_m * b_factors[m]), with the ranks and scales it was computed from."""

    engine: str
    source: str
    config: dict
    ranks: dict[str, int] = field(default_factory=dict)
    peft_scales: dict[str, float] = field(default_factory=dict)
    served_scales: dict[str, float] = field(default_factory=dict)
    b_factors: dict[str, float] = field(default_factory=dict)
    rule: str = ""
    # Top-level entries of the source folder an adapter export does not copy (a checkpoint's optimizer.pt, ...).
    left_out: list[str] = field(default_factory=list)

    def record(self) -> dict:
        """The content of ``fimlora_export.json``."""
        d = asdict(self)
        d.pop("config")
        d["serve"] = _SERVE_HINTS[self.engine]
        d["versions"] = package_versions()
        return d


def _is_head_tensor(key: str, heads) -> bool:
    """Whether tensor ``key`` belongs to one of the modules_to_save ``heads`` (saved whole, as PEFT saves them)."""
    name = key.removeprefix("base_model.model.")
    return any(name.startswith(f"{h}.") or f".{h}." in name for h in heads)


def _checked_source(path: Path, base_modules=None, base_name: str | None = None
                    ) -> tuple[dict, dict[str, int], list[str]]:
    """The adapter's config, module ranks and non-LoRA tensors, after ``fimlora check`` found no problem
    (against the base model's modules when ``base_modules`` is given)."""
    if not path.exists():
        raise ValueError(f"adapter: {path}: does not exist")
    if not path.is_dir():
        raise ValueError(f"adapter: {path} is not a folder (expected {CONFIG_NAME} + {WEIGHTS_NAME})")
    if base_modules is not None and (path / CONFIG_NAME).exists():
        ranks, _ = read_module_ranks(path / WEIGHTS_NAME) if (path / WEIGHTS_NAME).exists() else ({}, [])
        if ranks and not any(n in base_modules for n in ranks):
            cfg = read_adapter_config(path / CONFIG_NAME)
            raise ValueError(f"base_model: {base_name} has none of the adapter's target modules (target_modules="
                             f"{cfg.get('target_modules')!r}; the adapter's modules are like {next(iter(ranks))}); "
                             "give the model the adapter was made for")
    report = check_adapter(path, base_modules)
    if not report.ok:
        against = f" against base_model {base_name}" if base_modules is not None else ""
        raise ValueError(f"adapter: {path} fails `fimlora check`{against} ({len(report.problems)} problem(s)); fix "
                         "them before exporting: " + "; ".join(report.problems[:3]))
    cfg = read_adapter_config(path / CONFIG_NAME)
    ranks, other = read_module_ranks(path / WEIGHTS_NAME)
    return cfg, ranks, other


def compute_export(path: str | Path, engine: str, base_modules=None, base_name: str | None = None) -> ExportPlan:
    """The export of the adapter at ``path`` for ``engine`` (one of ``EXPORT_ENGINES``), without writing anything.

    Raises ValueError naming the field, the rule and the value when the engine cannot serve the adapter
    (DoRA, modules_to_save, LoRA bias, base-changing inits for vLLM and llama.cpp; lora_alpha = 0 for llama.cpp)
    or the adapter fails ``fimlora check`` (with ``base_modules``, as :func:`fimlora.check.check_adapter` takes
    them, also against the base model: ``export --for merged`` passes the base it merges onto).
    """
    check_choice("engine", engine, EXPORT_ENGINES)
    path = Path(path)
    cfg, ranks, other = _checked_source(path, base_modules, base_name)
    peft = served_scales(cfg, ranks, "peft")
    plan = ExportPlan(engine, str(path.resolve()), dict(cfg), ranks, peft, dict(peft), dict.fromkeys(ranks, 1.0))
    if engine != "merged":
        plan.left_out = carried_files(path)[1]
    if engine in ("peft", "merged"):
        plan.rule = ("copy: PEFT's own scales" if engine == "peft"
                     else "merged: W' = W + s_m B_m A_m (PEFT merge_and_unload)")
        return plan
    refusals = engine_refusals(cfg, ranks, engine)
    if refusals:
        raise ValueError(f"engine: {engine} cannot serve {path}: " + "; ".join(refusals)
                         + "; export --for merged (with --base-model) instead")
    if engine == "vllm" and only_classifier_heads(cfg.get("modules_to_save")):
        # The heads vLLM >= 0.31 loads are copied as they are (no LoRA scale applies to a whole module).
        other = [k for k in other if not _is_head_tensor(k, cfg["modules_to_save"])]
    if other:
        # Folding touches lora_B only; any other tensor (embedding LoRA, a saved head) would keep its old meaning.
        raise ValueError(f"adapter: {path} holds tensors other than lora_A/lora_B weights ({other[:3]}), which "
                         f"export --for {engine} cannot rescale; export --for merged instead")
    new = plan.config
    # Written out, so that every engine and converter reads the values PEFT used (llama.cpp's converter reads
    # lparams["lora_alpha"] and fails on a config without it).
    new.setdefault("r", PEFT_DEFAULT_R)
    new.setdefault("lora_alpha", PEFT_DEFAULT_ALPHA)
    # One key per module that matches that module alone (fc -> ^fc$ beside inner.fc), so no key order (PEFT's
    # sorted, vLLM's file order) matters.
    keys = pattern_keys(ranks)
    rank_pattern = {keys[n]: r for n, r in ranks.items() if r != new["r"]}
    if engine == "vllm":
        s = served_scales(cfg, ranks, "vllm")
        rslora = bool(cfg.get("use_rslora", False))
        one = next(iter(s.values()))
        alpha0 = config_rank_alpha(new)[1]
        # alpha'_m with alpha'_m / r_m = s (alpha'_m / sqrt(r_m) = s): PEFT and vLLM >= 0.32 then apply s too.
        alphas = {n: one * (r ** 0.5 if rslora else r) for n, r in ranks.items()}
        alpha_pattern = {keys[n]: a for n, a in alphas.items() if abs(a - alpha0) > 1e-12 * max(1.0, alpha0)}
        plan.rule = "vllm: B'_m = B_m * s_m / s, s = lora_alpha / r (sqrt(r) with rsLoRA); alpha'_m = s * r_m"
    else:
        alpha = config_rank_alpha(cfg)[1]
        if alpha <= 0:
            raise ValueError(f"lora_alpha: must be > 0 to export for llama.cpp (it reads alpha 0 as scale 1 and PEFT "
                             f"as scale 0), got {cfg.get('lora_alpha')}")
        new["use_rslora"] = False
        alpha_pattern = {}
        s = {n: alpha / r for n, r in ranks.items()}
        plan.rule = "llama.cpp: B'_m = B_m * s_m / (lora_alpha / r_m); no alpha_pattern, use_rslora false"
    new["rank_pattern"], new["alpha_pattern"] = rank_pattern, alpha_pattern
    plan.served_scales = s
    unfixable = [n for n in ranks if s[n] == 0 and peft[n] != 0]
    if unfixable:  # the engine multiplies by 0: no factor in B brings PEFT's delta W back
        raise ValueError(f"lora_alpha: {engine} applies scale 0 (lora_alpha {new['lora_alpha']}) where PEFT applies "
                         f"{peft[unfixable[0]]:g} (module {unfixable[0]}); give the adapter a lora_alpha > 0")
    plan.b_factors = {n: peft[n] / s[n] if s[n] else 1.0 for n in ranks}
    # The new config must give every module its tensors' rank and the scale the engine applies, or PEFT's reload
    # would differ from the engine.
    reloaded = served_scales(new, ranks, "peft")
    bad = [n for n in ranks if module_rank_alpha(new, n)[0] != ranks[n] or abs(reloaded[n] - s[n]) > 1e-9 * s[n]]
    if bad:  # pragma: no cover - a bug in the rule above, not bad input
        raise RuntimeError(f"export: PEFT would scale {bad[:3]} otherwise than {engine}")
    return plan


def _folded_tensors(path: Path, factors: dict[str, float]) -> dict:
    """Every tensor of the adapter, each lora_B multiplied by its module's factor (in float64, cast back)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path / WEIGHTS_NAME))
    for key, t in tensors.items():
        name, part = parse_tensor_key(key) or (None, None)
        if part == "B" and factors.get(name, 1.0) != 1.0:
            tensors[key] = (t.double() * factors[name]).to(t.dtype).contiguous()
    return tensors


def carried_files(src: Path) -> tuple[list[str], list[str]]:
    """(files an export copies beside the adapter, other top-level entries it leaves out): the model card, the
    tokenizer and fimlora's rank map travel with an adapter; a training checkpoint's optimizer, scheduler and RNG
    state (hundreds of MB, no use to a server), sub-folders and anything else do not."""
    carried, left_out = [], []
    for item in sorted(src.iterdir()):
        if item.name in _REWRITTEN:
            continue
        if item.is_file() and (item.name in _CARRIED or item.name.startswith(_CARRIED_PREFIXES)):
            carried.append(item.name)
        else:
            left_out.append(item.name)
    return carried, left_out


def _write_adapter(plan: ExportPlan, src: Path, tmp: Path) -> None:
    from safetensors.torch import save_file

    for name in carried_files(src)[0]:
        shutil.copy2(src / name, tmp / name)
    save_file(_folded_tensors(src, plan.b_factors), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
    # PEFT writes its config with sorted keys; so do we, so that a reload tries pattern keys in the same order.
    atomic_write_text(tmp / CONFIG_NAME, json.dumps(plan.config, indent=2, sort_keys=True) + "\n")


def _head_labels(src: Path, cfg: dict) -> int | None:
    """Rows of the classification head saved through modules_to_save (its weight is (num_labels, hidden))."""
    from safetensors import safe_open

    heads = cfg.get("modules_to_save") or []
    with safe_open(str(src / WEIGHTS_NAME), framework="pt") as f:
        for key in f.keys():
            if any(key.endswith(f"{h}.weight") or key.endswith(f"{h}.out_proj.weight") for h in heads):
                return int(f.get_slice(key).get_shape()[0])
    return None


def load_base_model(base: str, adapter: str | Path, n_layers: int | None = None):
    """The base model named ``base`` (a folder or hub name), as the class the adapter was made for, cut to its
    first ``n_layers`` layers when given (:func:`fimlora.modules.cut_layers`: the model ``calibrate --n-layers``
    made the adapter on).

    ``task_type`` SEQ_CLS gives ``AutoModelForSequenceClassification`` with as many labels as the head saved in
    the adapter; CAUSAL_LM or none gives ``AutoModelForCausalLM``; other task types are refused. Float32.
    Returns (model, tokenizer or None when the base has no tokenizer files).
    """
    from transformers import AutoTokenizer

    src = Path(adapter)
    cfg = read_adapter_config(src / CONFIG_NAME)
    try:
        model = _load_base_weights(base, src, cfg)
    except OSError as e:  # no such folder on disk and none on the hub (or no network)
        raise ValueError(f"base_model: {base!r} could not be loaded as a model folder or hub name "
                         f"({first_line(e)})") from e
    cut_layers(model, n_layers)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError) as e:  # a folder of weights without tokenizer files still merges
        logger.warning("fimlora: %s has no tokenizer (%s); the merged model is saved without one: copy the base "
                       "model's tokenizer files into the output", base, first_line(e))
        return model, None
    if not usable_tokenizer(tokenizer):
        logger.warning("fimlora: %s has no tokenizer files (transformers built one of %d tokens, which maps every "
                       "word to one token); the merged model is saved without one: copy the base model's tokenizer "
                       "files into the output", base, len(tokenizer))
        return model, None
    return model, tokenizer


# A folder without tokenizer files can still "load" a tokenizer: transformers builds one of the special tokens alone
# (BERT: 5, GPT-2: 1), and every word becomes [UNK]. Real vocabularies are in the thousands.
MIN_VOCABULARY = 100


def usable_tokenizer(tokenizer) -> bool:
    """Whether ``tokenizer`` has a real vocabulary (at least :data:`MIN_VOCABULARY` tokens), not one transformers
    made up of special tokens for a folder without tokenizer files."""
    return len(tokenizer) >= MIN_VOCABULARY


def _load_base_weights(base: str, src: Path, cfg: dict):
    """:func:`load_base_model`'s class choice: SEQ_CLS with the saved head's labels, or a causal LM."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    task = cfg.get("task_type")
    if task == "SEQ_CLS":
        labels = _head_labels(src, cfg)
        if labels is None:
            raise ValueError(f"modules_to_save: a SEQ_CLS adapter must save its head to be merged, got "
                             f"{cfg.get('modules_to_save')!r} with no head tensor in {src / WEIGHTS_NAME}")
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=labels, dtype=torch.float32)
    elif task in (None, "CAUSAL_LM"):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    else:
        raise ValueError(f"task_type: export --for merged loads CAUSAL_LM or SEQ_CLS base models, got {task!r}; "
                         "pass a loaded model as base_model instead")
    return model


def _base_name(base_model) -> str:
    if isinstance(base_model, (str, Path)):
        return str(base_model)
    name = getattr(getattr(base_model, "config", None), "_name_or_path", "")
    return name or type(base_model).__name__


def _write_merged(plan: ExportPlan, src: Path, tmp: Path, base_model, tokenizer, base_name: str) -> None:
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(base_model, str(src))
    except ValueError as e:  # PEFT's own refusal (say, target modules not found in the base model)
        raise ValueError(f"base_model: {base_name} does not take the adapter {src} (PEFT: {e}); give the model the "
                         "adapter was made for") from e
    model = model.merge_and_unload()
    model.save_pretrained(str(tmp), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))


def export_adapter(path: str | Path, engine: str, out: str | Path, *, base_model=None, tokenizer=None,
                   overwrite: bool = False, n_layers: int | None = None) -> ExportPlan:
    """Write the adapter at ``path`` to ``out`` so that ``engine`` serves it as PEFT computes it.

    ``engine``: ``"peft"``, ``"vllm"``, ``"llama.cpp"`` or ``"merged"`` (see the module docstring for each rule).
    ``base_model``: the base ``transformers`` model, needed for ``"merged"`` only: a loaded model (modified in
    place by the merge) or a folder / hub name (:func:`load_base_model`, which also saves its tokenizer);
    ``tokenizer`` is saved next to a merged model when given. ``n_layers``: with a base model named, load it cut
    to its first ``n_layers`` layers (an adapter from ``calibrate --n-layers``). ``out`` must be new or empty, or with
    ``overwrite`` an earlier fimlora output (:func:`fimlora.io.check_output_dir`); the files are written into a
    temporary folder and moved into place. Returns the plan written.
    """
    src = Path(path)
    inputs = (src, base_model if isinstance(base_model, (str, Path)) else None)
    check_output_dir(out, overwrite, inputs)  # before any work; never over the adapter (or base) being read
    base_modules = base_name = None
    if engine == "merged" and base_model is None:
        raise ValueError("base_model: export --for merged needs the base model (--base-model), got None")
    if n_layers is not None and (engine != "merged" or not isinstance(base_model, (str, Path))):
        given = "None" if base_model is None else repr(_base_name(base_model))
        raise ValueError(f"n_layers: cuts the base model that --for merged loads by folder or hub name; got "
                         f"n_layers={n_layers} with engine {engine!r} and base_model {given} (a loaded model: "
                         "cut it yourself with fimlora.modules.cut_layers)")
    if engine == "merged":
        base_name = _base_name(base_model)
        compute_export(src, engine)  # the adapter alone first: a broken one is named before any base is loaded
        if isinstance(base_model, (str, Path)):
            base_model, loaded_tokenizer = load_base_model(str(base_model), src, n_layers)
            tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
        # The base it merges onto: shapes of every module, and every module the config targets has LoRA tensors.
        base_modules = module_shapes(base_model)
    plan = compute_export(src, engine, base_modules, base_name)
    with atomic_directory(out, overwrite=overwrite, inputs=inputs) as tmp:
        if engine == "merged":
            _write_merged(plan, src, tmp, base_model, tokenizer, base_name)
        else:
            _write_adapter(plan, src, tmp)
        atomic_write_text(tmp / EXPORT_RECORD, json.dumps(plan.record(), indent=2) + "\n")
    if plan.left_out:
        logger.info("fimlora: not copied from %s (not part of a served adapter): %s", src, ", ".join(plan.left_out))
    logger.info("fimlora: exported %s for %s to %s", src, engine, out)
    return plan
