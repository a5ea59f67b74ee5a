"""Finding LoRA modules and naming them exactly as PEFT's ``rank_pattern`` keys (and cutting a model to its
first layers, the model such an adapter may have been made on).

The single source of module names in fimlora is :func:`lora_modules`. A name is
the module's path *inside the base model* (``model.layers.0.self_attn.q_proj``),
never with PEFT's wrapper prefix ``base_model.model.``: PEFT matches pattern
keys against exactly these names with the regex ``(.*\\.)?(KEY)$``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from .distributed import check_not_wrapped, full_tensor

__all__ = [
    "LoraModuleInfo",
    "cut_layers",
    "base_model_of",
    "lora_config_of",
    "lora_modules",
    "pattern_matches",
    "pattern_keys",
    "exact_target_modules",
    "pattern_key_error",
    "check_pattern_keys",
    "check_same_modules",
    "check_fresh_adapter",
    "check_dora_fresh",
]

_SUPPORTED_INITS = (True, False, "gaussian")


@dataclass(frozen=True)
class LoraModuleInfo:
    """A LoRA linear layer: its rank_pattern key, the adapter's current shape and whether it is DoRA.

    ``layer`` is any PEFT LoRA layer whose adapter is A = lora_A (r, d_in), B = lora_B (d_out, r), both nn.Linear
    (plain, GPT-2 Conv1D, bitsandbytes 4/8-bit, ...); ``in_features``/``out_features`` are d_in/d_out.
    """

    name: str
    layer: nn.Module
    in_features: int
    out_features: int
    r: int
    alpha: float
    dora: bool = False


def base_model_of(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (or a LoraModel).

    A PeftModel inside a training wrapper (DDP, accelerate, ...) is refused with a ValueError
    saying to calibrate before wrapping; any other model is a TypeError.
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraModel

    if isinstance(model, PeftModel):
        model = model.base_model
    if isinstance(model, LoraModel):
        return model.model
    check_not_wrapped(model, (PeftModel, LoraModel))
    raise TypeError(
        f"model: expected a peft.PeftModel (or LoraModel) with LoRA adapters, got {type(model).__name__}; "
        "wrap it first with peft.get_peft_model(model, LoraConfig(...))"
    )


def lora_config_of(model: nn.Module, adapter_name: str = "default"):
    """The LoraConfig of ``adapter_name``; clear errors for a missing or non-LoRA adapter."""
    from peft import LoraConfig

    base_model_of(model)  # type check first
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        raise ValueError("model: has no peft_config; it carries no LoRA adapter")
    if adapter_name not in configs:
        raise ValueError(
            f"adapter_name: no adapter named {adapter_name!r} in the model; it has {sorted(configs)}"
        )
    config = configs[adapter_name]
    if not isinstance(config, LoraConfig):
        raise ValueError(
            f"adapter_name: adapter {adapter_name!r} is a {type(config).__name__}, not a LoraConfig; "
            "fimlora resizes plain LoRA adapters only"
        )
    return config


def _layer_type(layer: nn.Module) -> str:
    return f"{type(layer).__module__}.{type(layer).__name__}"


def _is_dora_variant(variant) -> bool:
    """True for PEFT's DoRA on a linear-like layer (its embedding/conv DoRA subclasses are not that)."""
    from peft.tuners.lora.variants import DoraLinearVariant

    return type(variant) is DoraLinearVariant


def _kind_reason(layer: nn.Module, adapter_name: str) -> str | None:
    """Why this kind of LoRA layer is not a pair of linear maps with lora_B called on an input, or None."""
    from peft.tuners.lora import layer as lora_layer

    kind = f"layer type {_layer_type(layer)} is not supported"
    if adapter_name in getattr(layer, "lora_embedding_A", {}):
        # PEFT's embedding LoRA starts at A = 0, B random: there dL/dB = 0, so the Fisher of B scores nothing.
        return (f"{kind}: LoRA on an embedding (lora_embedding_A/B) is initialised with A = 0 and B random, "
                "so dL/dB is zero at initialisation and the Fisher of LoRA-B carries no signal")
    param_wrapper = getattr(lora_layer, "ParamWrapper", None)  # absent from older PEFT
    if param_wrapper is not None and isinstance(layer, param_wrapper):
        return (f"{kind}: LoRA on a parameter (target_parameters, e.g. MoE experts) applies B A through a "
                "parametrization of the weight, never by calling lora_B on an input, and lora_B holds "
                "r * num_experts columns")
    if isinstance(layer.get_base_layer(), nn.MultiheadAttention):
        return (f"{kind}: LoRA on nn.MultiheadAttention merges B A into in_proj_weight around each forward, "
                "so lora_B never runs on an input")
    a = layer.lora_A[adapter_name] if adapter_name in layer.lora_A else None
    b = layer.lora_B[adapter_name] if adapter_name in layer.lora_B else None
    if not isinstance(a, nn.Linear) or not isinstance(b, nn.Linear):
        return (f"{kind}: lora_A is a {type(a).__name__} and lora_B a {type(b).__name__}, not a pair of "
                "nn.Linear maps (conv LoRA?); fimlora scores and resizes linear LoRA factors only")
    return None


def _variant_reason(layer: nn.Module, adapter_name: str) -> str | None:
    """Why the adapter's LoRA variant is not supported (anything but DoRA on a linear layer), or None."""
    variant = getattr(layer, "lora_variant", {}).get(adapter_name)  # PEFT before variants: DoRA lives on the layer
    if variant is not None and not (_is_dora(layer, adapter_name) and _is_dora_variant(variant)):
        return f"LoRA variant {type(variant).__name__} is not supported (plain LoRA and DoRA are)"
    return None


def _is_bnb_8bit(base: nn.Module) -> bool:
    """A bitsandbytes int8 base layer, by class (never by what the CPU's kernels do); False without bitsandbytes."""
    bnb = sys.modules.get("bitsandbytes")  # a layer of its class exists only once it was imported
    linear8 = getattr(getattr(bnb, "nn", None), "Linear8bitLt", None)
    return isinstance(linear8, type) and isinstance(base, linear8)


# Why DoRA on a bitsandbytes 8-bit base is refused (the library's layer check and the CLI's flag check say it alike).
DORA_8BIT_REASON = "bitsandbytes fails on the second forward/backward of such a layer (stock PEFT too)"


def _combination_reason(layer: nn.Module, adapter_name: str) -> str | None:
    """Why this base layer and LoRA variant do not go together, or None: DoRA on a bitsandbytes 8-bit base fails
    inside bitsandbytes on the second forward/backward (stock PEFT too), so it is refused before any compute."""
    if _is_dora(layer, adapter_name) and _is_bnb_8bit(layer.get_base_layer()):
        return (f"DoRA (use_dora=True) on a bitsandbytes 8-bit base layer ({_layer_type(layer)}) is not supported: "
                f"{DORA_8BIT_REASON}; use a 4-bit base (QDoRA) or plain LoRA (use_dora=False) on the 8-bit base")
    return None


def _shape_reason(layer: nn.Module, adapter_name: str) -> str | None:
    """Why lora_A/lora_B are not A (r, d_in) and B (d_out, r) of the layer's (in_features, out_features), or None."""
    a, b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
    r, d_in, d_out = layer.r[adapter_name], getattr(layer, "in_features", None), getattr(layer, "out_features", None)
    if (isinstance(d_in, int) and isinstance(d_out, int) and (a.in_features, a.out_features) == (d_in, r)
            and (b.in_features, b.out_features) == (r, d_out)):
        return None
    return (f"layer type {_layer_type(layer)} is not supported: its LoRA factors are not A (r, d_in) and "
            f"B (d_out, r) of the layer: r={r}, (d_in, d_out)=({d_in}, {d_out}), lora_A maps {a.in_features} -> "
            f"{a.out_features}, lora_B {b.in_features} -> {b.out_features}")


def _is_dora(layer: nn.Module, adapter_name: str) -> bool:
    return bool(layer.use_dora.get(adapter_name, False)) or adapter_name in getattr(
        layer, "lora_magnitude_vector", {})


def _unsupported_reason(layer: nn.Module, adapter_name: str, config, any_init: bool = False) -> str | None:
    """Why module ``layer`` cannot be calibrated and resized, or None.

    Supported: any PEFT LoRA layer whose adapter is a pair of nn.Linear maps A (r, d_in), B (d_out, r)
    with lora_B called on an input (plain, GPT-2 Conv1D via fan_in_fan_out, bitsandbytes 4/8-bit and
    the other quantised wrappers), plain or DoRA (not DoRA on a bitsandbytes 8-bit base).
    """
    for rule in (_kind_reason, _variant_reason, _combination_reason, _shape_reason):
        reason = rule(layer, adapter_name)
        if reason is not None:
            return reason
    if layer.merged_adapters and adapter_name in layer.merged_adapters:
        return "the adapter is merged into the base weight; unmerge it first"
    init = config.init_lora_weights
    if not any_init and init not in _SUPPORTED_INITS:
        return (
            f"init_lora_weights={init!r} is not supported (only True, False or 'gaussian'); "
            "data-driven inits set the rank themselves"
        )
    return None


def lora_modules(model: nn.Module, adapter_name: str = "default", any_init: bool = False) -> list[LoraModuleInfo]:
    """All LoRA modules of ``adapter_name`` in model order, named as rank_pattern keys.

    Raises ValueError up front if the adapter does not exist, if the model has no
    LoRA module for it, or if any module cannot be calibrated and resized. ``any_init=True`` accepts adapters that a
    data-driven init (EVA, PiSSA, LoRA-GA, ...) built: what reads their weights without resizing them (the
    learning-rate rule) needs nothing else.
    """
    from peft.tuners.lora.layer import LoraLayer

    config = lora_config_of(model, adapter_name)
    base = base_model_of(model)
    found: list[LoraModuleInfo] = []
    problems: list[str] = []
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if adapter_name not in module.r:
            continue
        reason = _unsupported_reason(module, adapter_name, config, any_init)
        if reason is not None:
            problems.append(f"{name}: {reason}")
            continue
        found.append(
            LoraModuleInfo(
                name=name,
                layer=module,
                in_features=int(module.in_features),
                out_features=int(module.out_features),
                r=int(module.r[adapter_name]),
                alpha=float(module.lora_alpha[adapter_name]),
                dora=_is_dora(module, adapter_name),
            )
        )
    if problems:
        raise ValueError(
            f"model: {len(problems)} LoRA module(s) of adapter {adapter_name!r} cannot be resized:\n  "
            + "\n  ".join(problems)
        )
    if not found:
        raise ValueError(f"model: no LoRA layers for adapter {adapter_name!r}; check target_modules")
    return found


def _first_nonzero_b(infos: list[LoraModuleInfo], adapter_name: str) -> tuple[LoraModuleInfo, float] | None:
    """The first module whose LoRA-B has a non-zero entry, with max |B|; None if every B is all zero.

    A sharded (FSDP2) B is gathered, so every process sees the same answer and takes the same path.
    """
    for info in infos:
        b = full_tensor(info.layer.lora_B[adapter_name].weight.detach())
        if (b != 0).any():
            return info, b.abs().max().item()
    return None


def check_fresh_adapter(infos: list[LoraModuleInfo], adapter_name: str = "default") -> None:
    """Raise ValueError naming the first module whose LoRA-B is not all zero.

    FIM-LoRA scores dL/dB at B = 0, the state PEFT leaves straight after ``get_peft_model``;
    on a trained adapter the scores mean something else and shrinking drops trained components.
    A DoRA module gets :func:`check_dora_fresh`'s error, since ``allow_trained`` would not help there.
    """
    check_dora_fresh(infos, adapter_name)
    found = _first_nonzero_b(infos, adapter_name)
    if found is not None:
        info, largest = found
        raise ValueError(
            f"model: LoRA-B of {info.name!r} is non-zero (max |B| = {largest:.3g}); calibration "
            "assumes a freshly initialised adapter (B = 0, straight after get_peft_model), and resizing a "
            "trained one drops trained rank components; pass allow_trained=True to calibrate it anyway"
        )


def check_dora_fresh(infos: list[LoraModuleInfo], adapter_name: str = "default") -> None:
    """Raise ValueError naming the first DoRA module whose LoRA-B is not all zero; ``allow_trained`` does not lift it.

    A DoRA layer outputs m (*) (W + s B A) x / ||W + s B A||_row with the magnitude m (d_out,). At B = 0 PEFT
    sets m = ||W||_row, which does not depend on the rank, so resizing A and B keeps the layer exact. With
    B != 0, m was fitted (or initialised) to the row norms of W + s B A at this rank: dropping rank components
    renormalises every output row, W's part included, not only the dropped terms (plain LoRA's allow_trained
    risk), and dL/dB carries the factor m / ||W + s B A||_row that the B = 0 scores do not.
    """
    found = _first_nonzero_b([i for i in infos if i.dora], adapter_name)
    if found is not None:
        info, largest = found
        raise ValueError(
            f"model: LoRA-B of DoRA module {info.name!r} is non-zero (max |B| = {largest:.3g}); fimlora resizes "
            "DoRA adapters only at initialisation (B = 0, where the magnitude vector is the row norms of W at any "
            "rank), also with allow_trained=True; create the adapter with init_lora_weights=True or 'gaussian' "
            "and calibrate before training"
        )


def check_same_modules(field: str, keys: Iterable[str], expected: Iterable[str], what: str) -> None:
    """Raise ValueError unless ``keys`` are exactly the module names ``expected`` (``what`` describes them)."""
    keys, expected = list(keys), list(expected)
    missing = [n for n in expected if n not in set(keys)]
    extra = [n for n in keys if n not in set(expected)]
    if missing or extra:
        more = lambda xs: f"{xs[:3]}{'...' if len(xs) > 3 else ''}"  # noqa: E731
        raise ValueError(f"{field}: keys must be exactly {what}; missing {more(missing)}, extra {more(extra)}")


def pattern_matches(key: str, module_name: str) -> bool:
    """Whether PEFT gives module ``module_name`` the rank_pattern/alpha_pattern entry ``key``: PEFT's own
    ``get_pattern_key``, which tries ``re.match(rf"(.*\\.)?({key})$", name)`` for every key (a ``^`` or a
    top-level ``|`` in a key then means what that regex makes of it; no second copy of the rule here can drift)."""
    from peft.utils.other import get_pattern_key

    # get_pattern_key returns the key that matched, else the name itself: compare identities, not text.
    return get_pattern_key([key], module_name) is key


def pattern_keys(names: Iterable[str]) -> dict[str, str]:
    """The rank_pattern/alpha_pattern key of every module in ``names`` (the adapter's full module names).

    A module's key is its full name, which PEFT matches as ``(.*\\.)?(NAME)$``, unless that also matches another
    of ``names``: ``fc`` matches ``inner.fc`` too (and, since ``.`` is a wildcard, ``inner.fc`` matches
    ``inner_fc``). Such a module gets ``^NAME$`` (escaped), which PEFT's rule and :func:`pattern_matches` match
    against the whole name only. So every key matches exactly one module of ``names`` whatever order the keys
    are tried in.
    """
    names = list(names)
    keys = {}
    for name in names:
        last = name.rpartition(".")[2]  # literal: any name the key matches ends with it
        clash = any(other != name and other.endswith(last) and pattern_matches(name, other) for other in names)
        keys[name] = f"^{re.escape(name)}$" if clash else name
    return keys


def exact_target_modules(names: Iterable[str]) -> str:
    """A ``target_modules`` that selects exactly ``names``: PEFT full-matches a string target_modules as a regex,
    whereas a list entry also selects every module whose name ends with ``.ENTRY``."""
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"


def pattern_key_error(key: str) -> str | None:
    """Why PEFT cannot use ``key`` as a pattern key (it is not a valid regex), or None."""
    if not isinstance(key, str):
        return f"key {key!r} is not a string"
    try:
        re.compile(key)
    except re.error as e:
        return f"key {key!r} is not a valid regular expression ({e})"
    return None


def check_pattern_keys(
    pattern: dict[str, object], target_names: Iterable[str], all_names: Iterable[str]
) -> list[str]:
    """Problems with a rank/alpha pattern: keys that match no target, carry the wrapper prefix, or overlap.

    A key that matches several modules (``{"q_proj": 2}``) is ordinary PEFT usage and no problem; two keys
    that match one module are, since which one wins depends on their order.

    ``target_names``: the LoRA modules the pattern is meant for; ``all_names``:
    every module name of the base model. PEFT tries keys in *sorted* order after a
    save/reload, so shadowing is checked in that order.
    """
    targets = list(target_names)
    names = list(all_names)
    problems = [error for error in map(pattern_key_error, pattern) if error]
    # An invalid key would raise inside every match below; it is reported once above instead.
    valid = [key for key in pattern if pattern_key_error(key) is None]
    sorted_keys = sorted(valid)
    for key in valid:
        if key.startswith("base_model.model."):
            problems.append(f"key {key!r} carries PEFT's wrapper prefix 'base_model.model.' and matches nothing")
            continue
        if not any(pattern_matches(key, n) for n in names if n in targets):
            problems.append(f"key {key!r} matches no LoRA module")
    for name in targets:
        matching = [k for k in sorted_keys if pattern_matches(k, name)]
        if len(matching) > 1:
            problems.append(
                f"module {name!r} is matched by {len(matching)} keys {matching}; after a reload "
                f"{matching[0]!r} wins (keys are tried in sorted order)"
            )
    return problems


def cut_layers(model, n_layers: int | None):
    """Keep only the first ``n_layers`` transformer layers (weights stay real), in place; returns ``model``.

    Task models (``bert.encoder.layer``, ``model.layers``, ``transformer.h``) and bare base models
    (``encoder.layer``, ``layers``, ``h``) alike, so that an adapter made on a cut model can be checked against and
    merged onto the same cut model."""
    if n_layers is None:
        return model
    for path in ("bert.encoder.layer", "model.layers", "encoder.layer", "transformer.h", "layers", "h"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if n_layers < 1 or n_layers > len(obj):
            raise ValueError(f"n_layers: must be in [1, {len(obj)}], got {n_layers}")
        del obj[n_layers:]
        model.config.num_hidden_layers = n_layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:n_layers]
        return model
    raise ValueError(f"n_layers: don't know where the layers of {type(model).__name__} are")
