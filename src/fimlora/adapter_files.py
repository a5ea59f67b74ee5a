"""A saved PEFT adapter's files, read as PEFT reads them: the config, the tensor names and the shapes.

A PEFT adapter is a folder with ``adapter_config.json`` (:data:`CONFIG_NAME`) and ``adapter_model.safetensors``
(:data:`WEIGHTS_NAME`). Module m's LoRA pair is saved as ``<m>.lora_A.weight`` (A_m, (r_m, d_in)) and
``<m>.lora_B.weight`` (B_m, (d_out, r_m)), with an optional ``base_model.model.`` prefix and adapter name before
``.weight``; DoRA adds ``<m>.lora_magnitude_vector`` (m, (d_out,)). :func:`parse_tensor_key` is that rule.

Module m's rank and alpha are those of the first ``rank_pattern`` / ``alpha_pattern`` key that matches it (keys in
sorted order, as after a reload), else the config's ``r`` and ``lora_alpha``, PEFT's defaults
(:data:`PEFT_DEFAULT_R`, :data:`PEFT_DEFAULT_ALPHA`) where the config has none (:func:`module_rank_alpha`).

Readers raise :class:`UnreadableAdapter` with a message naming the file, which ``fimlora check`` reports as the
one problem of an adapter the other checks cannot run on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

from .modules import pattern_matches

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "PEFT_DEFAULT_R", "PEFT_DEFAULT_ALPHA", "LoraShapes", "BaseShapes",
           "UnreadableAdapter", "parse_tensor_key", "read_adapter_config", "read_lora_tensors", "read_module_ranks",
           "first_pattern_key", "config_rank_alpha", "module_rank_alpha", "linear_shape", "module_shapes"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# LoraConfig's r and lora_alpha when a config leaves them out.
PEFT_DEFAULT_R, PEFT_DEFAULT_ALPHA = 8, 8
_TENSOR = re.compile(r"^(?:base_model\.model\.)?(?P<name>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
# DoRA's magnitude vector m (d_out,): PEFT saves it as "<module>.lora_magnitude_vector" (no adapter name, no ".weight")
_MAGNITUDE = re.compile(r"^(?:base_model\.model\.)?(?P<name>.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$")

# name -> {"A": shape of lora_A (r, d_in), "B": shape of lora_B (d_out, r), "M": DoRA magnitude (d_out,) if saved}
LoraShapes = dict[str, dict[str, tuple[int, ...]]]
# name -> (d_in, d_out) of a linear-like base module, None for other modules
BaseShapes = Mapping[str, "tuple[int, int] | None"]


class UnreadableAdapter(Exception):
    """A file the remaining checks cannot run without; its message is the one problem reported."""


def parse_tensor_key(key: str) -> tuple[str, str] | None:
    """(module name, part) of a saved tensor: part "A" for lora_A, "B" for lora_B, "M" for DoRA's magnitude
    vector; None for any other tensor (a modules_to_save head, a LoRA bias, an embedding's lora_embedding_A)."""
    m = _TENSOR.match(key)
    if m:
        return m.group("name"), m.group("ab")
    m = _MAGNITUDE.match(key)
    if m:
        return m.group("name"), "M"
    return None


def read_adapter_config(cfg_path: Path) -> dict:
    """``adapter_config.json`` as a dict; UnreadableAdapter names the file when missing, not JSON or not an
    object."""
    if not cfg_path.exists():
        raise UnreadableAdapter(f"{cfg_path}: missing; not a PEFT adapter folder")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UnreadableAdapter(f"{cfg_path}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise UnreadableAdapter(f"{cfg_path}: must be a JSON object, got {type(cfg).__name__}")
    return cfg


def read_lora_tensors(weights: Path) -> tuple[LoraShapes, list[str]]:
    """(LoRA A/B shapes by module, problems with non-finite values) from reading every tensor of ``weights``.

    Adapters are small (MBs), so values are read, not only the header.
    """
    from safetensors import SafetensorError, safe_open

    if not weights.exists():
        raise UnreadableAdapter(f"{weights}: missing (only safetensors adapters are checked)")
    shapes: LoraShapes = {}
    problems = []
    try:
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                parsed = parse_tensor_key(key)
                if parsed:
                    shapes.setdefault(parsed[0], {})[parsed[1]] = tuple(tensor.shape)
                if tensor.is_floating_point():
                    bad = int((~tensor.isfinite()).sum())
                    if bad:
                        problems.append(f"{key}: {bad} non-finite value(s) (NaN or inf)")
    except (SafetensorError, OSError) as e:
        raise UnreadableAdapter(
            f"{weights}: cannot be read as safetensors ({e}); truncated or not a safetensors file?"
        ) from e
    if not any("A" in ab or "B" in ab for ab in shapes.values()):
        raise UnreadableAdapter(f"{weights}: holds no LoRA A/B tensors")
    return shapes, problems


def read_module_ranks(weights: Path) -> tuple[dict[str, int], list[str]]:
    """(module -> r_m, the rows of its lora_A (r_m, d_in); the keys of tensors that are not lora_A/lora_B) from
    the header of ``weights`` alone (no values read)."""
    from safetensors import safe_open

    ranks, other = {}, []
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            parsed = parse_tensor_key(key)
            if parsed is None or parsed[1] == "M":
                other.append(key)
            elif parsed[1] == "A":
                ranks[parsed[0]] = int(f.get_slice(key).get_shape()[0])
    return ranks, other


def first_pattern_key(pattern: Mapping, name: str):
    """The key of ``pattern`` (rank_pattern or alpha_pattern) PEFT applies to module ``name``: the first that
    matches in the config's own key order, the order PEFT tries them in after loading it (``save_pretrained``
    writes them sorted, a hand-edited file may not be); None when none matches."""
    for key in pattern:
        if pattern_matches(key, name):
            return key
    return None


def config_rank_alpha(cfg: dict) -> tuple[int, float]:
    """(r, lora_alpha) of an adapter config, PEFT's defaults where it has none; the values every module gets that
    no pattern key matches."""
    return int(cfg.get("r", PEFT_DEFAULT_R)), float(cfg.get("lora_alpha", PEFT_DEFAULT_ALPHA))


def module_rank_alpha(cfg: dict, name: str) -> tuple[int, float]:
    """(r_m, alpha_m) PEFT gives module ``name``: the first rank_pattern / alpha_pattern key that matches
    (:func:`first_pattern_key`), else the config's r and lora_alpha (:func:`config_rank_alpha`)."""
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    key, akey = first_pattern_key(rank_pattern, name), first_pattern_key(alpha_pattern, name)
    r, alpha = config_rank_alpha(cfg)
    return int(rank_pattern[key] if key is not None else r), float(alpha_pattern[akey] if akey is not None else alpha)


def linear_shape(module) -> tuple[int, int] | None:
    """(d_in, d_out) of a linear-like module: ``nn.Linear`` (weight (d_out, d_in)) or GPT-2's ``Conv1D`` (weight
    (d_in, d_out)); None for any other module."""
    import torch

    if isinstance(module, torch.nn.Linear):
        return int(module.in_features), int(module.out_features)
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        d_in, d_out = module.weight.shape
        return int(d_in), int(d_out)
    return None


def module_shapes(model) -> dict[str, tuple[int, int] | None]:
    """Every module of a loaded ``torch`` model: name -> :func:`linear_shape` (None for modules that are not
    linear-like); the ``base_modules`` that ``fimlora.check.check_adapter`` takes."""
    return {name: linear_shape(module) for name, module in model.named_modules()}
