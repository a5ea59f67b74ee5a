"""The parts of the axolotl plugin that need no axolotl: settings, the resume decision, axolotl's pattern rules.

Kept apart from :mod:`fimlora.integrations.axolotl` (which subclasses axolotl's ``BasePlugin`` and so imports
axolotl) so that they are tested in the default suite and so that nothing in the library loads axolotl.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from ..allocation import RankAllocation
from ..config import FimConfig, check_bool
from ..lr import LrRecommendation

__all__ = [
    "PLUGIN",
    "RANK_MAP",
    "FRAGMENT",
    "LORA_ADAPTERS",
    "LORA_KERNELS",
    "PLUGIN_SETTINGS",
    "default_kernels_off",
    "check_no_lora_kernels",
    "Plan",
    "fim_settings",
    "plan_run",
    "checkpoints_in",
    "axolotl_lora_settings",
    "fragment_yaml",
]

logger = logging.getLogger(__name__)

PLUGIN = "fimlora.integrations.axolotl.FimLoraPlugin"
RANK_MAP = "rank_map.json"
# A config fragment that trains the same ranks without the plugin (axolotl's own lora_rank_pattern keys).
FRAGMENT = "fimlora_axolotl.yaml"
LORA_ADAPTERS = ("lora", "qlora")
# axolotl's fused LoRA kernels (auto-enabled for LoRA on supported models) call LoRA A/B weights inside one
# autograd function and bypass the LoRA layers' forward, so the hooks that calibration puts on each LoRA-B
# never see a batch.
LORA_KERNELS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")
# Keys of the fimlora: block that are the plugin's own, not FimConfig settings, with their defaults.
# use_learning_rate: train at the recommended learning rate (calibrate_trainer's) and write it into the fragment.
PLUGIN_SETTINGS = {"use_learning_rate": False}


def fim_settings(value) -> dict:
    """The ``fimlora:`` block of an axolotl config, checked by constructing :class:`FimConfig` from it.

    Returns the settings as given (``None`` -> ``{}``), so that defaults left out stay the Trainer's (progress
    bars follow ``disable_tqdm``); the plugin's own keys (:data:`PLUGIN_SETTINGS`) are checked too. Errors are
    FimConfig's own, prefixed with ``fimlora.`` so they point into the YAML; an unknown key names the known ones.
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"fimlora: must be a mapping of FimConfig settings, got {type(value).__name__} {value!r}")
    settings = dict(value)
    known = [f.name for f in fields(FimConfig)] + list(PLUGIN_SETTINGS)
    unknown = sorted(str(k) for k in settings if k not in known)
    if unknown:
        raise ValueError(f"fimlora.{unknown[0]}: unknown setting; known settings are {known}")
    try:
        for key in PLUGIN_SETTINGS.keys() & settings.keys():
            check_bool(key, settings[key])
        FimConfig(**{k: v for k, v in settings.items() if k not in PLUGIN_SETTINGS})
    except ValueError as e:
        raise ValueError(f"fimlora.{e}") from None
    return settings


def default_kernels_off(cfg) -> list[str]:
    """Set every unset ``lora_*_kernel`` of the raw config to false (before axolotl's schema would turn them on);
    returns the keys set. An explicit ``true`` stays, for :func:`check_no_lora_kernels` to refuse."""
    unset = [k for k in LORA_KERNELS if cfg.get(k) is None]
    for key in unset:
        cfg[key] = False
    return unset


def check_no_lora_kernels(cfg) -> None:
    """Calibration needs the LoRA layers' own forward; axolotl's fused kernels bypass it."""
    on = [k for k in LORA_KERNELS if cfg.get(k)]
    if on:
        raise ValueError(f"{on[0]}: must be false to calibrate with fimlora (axolotl's fused LoRA kernels bypass "
                         f"the LoRA layers whose gradients calibration reads), got true; set {', '.join(on)}: false "
                         "(a resumed run, which loads its ranks, may use them)")


def checkpoints_in(output_dir: str | Path) -> list[Path]:
    """HF Trainer checkpoints (``checkpoint-N``) in ``output_dir``, oldest first (axolotl's auto-resume rule)."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


@dataclass(frozen=True)
class Plan:
    """What the plugin does to the model: ``calibrate``, ``load`` the ranks at ``rank_map``, or ``keep`` it."""

    action: str
    reason: str
    rank_map: Path | None = None


def plan_run(output_dir: str | Path, resume_from_checkpoint=None, auto_resume: bool = False,
             lora_model_dir=None) -> Plan:
    """Decide, before the optimizer exists, whether this run calibrates.

    - ``lora_model_dir`` set: the adapter comes from disk and its saved ``rank_pattern`` already holds its ranks
      (a trained adapter would be refused by calibration anyway): keep it.
    - resuming (``resume_from_checkpoint``: a path, or True for the newest ``checkpoint-N`` in ``output_dir`` as
      HF Trainer reads it; or ``auto_resume_from_checkpoints`` with a ``checkpoint-N`` in ``output_dir``, which
      a named checkpoint overrides): the checkpoint's tensors have the calibrated shapes, so the model must get
      the saved ranks before the Trainer loads them; calibrating again would score a different model and could
      change them. The rank map is looked for in the checkpoint, then in ``output_dir``; none is an error.
    - a ``rank_map.json`` already in ``output_dir``: a restarted run; reuse it rather than overwrite it with a
      map that may differ (delete it to calibrate afresh).
    - otherwise calibrate.
    """
    out = Path(output_dir)
    if lora_model_dir:
        return Plan("keep", f"lora_model_dir={lora_model_dir!s} is loaded with the ranks saved in it")
    checkpoint = resume_from_checkpoint
    if checkpoint is True or (not checkpoint and auto_resume):
        found = checkpoints_in(out)
        if checkpoint is True and not found:
            raise ValueError(f"resume_from_checkpoint: True means the newest checkpoint-N in output_dir={out!s}, "
                             "but it has none; name a checkpoint folder or start without resuming")
        checkpoint = found[-1] if found else None
    if checkpoint:
        for folder in (Path(checkpoint), out):
            if (folder / RANK_MAP).is_file():
                return Plan("load", f"resuming from {checkpoint!s}", folder / RANK_MAP)
        raise ValueError(
            f"resume_from_checkpoint: resuming from {checkpoint!s} needs the rank map the run was calibrated "
            f"with, but there is no {RANK_MAP} in {checkpoint!s} or in output_dir={out!s}; calibrating again "
            "could give other ranks than the checkpoint's tensors have"
        )
    if (out / RANK_MAP).is_file():
        return Plan("load", f"{out / RANK_MAP} exists (delete it to calibrate afresh)", out / RANK_MAP)
    return Plan("calibrate", "no checkpoint and no rank map in output_dir")


def axolotl_lora_settings(allocation: RankAllocation, use_learning_rate: bool = False) -> dict:
    """The axolotl config keys that build this allocation's adapter without the plugin; with
    ``use_learning_rate`` and a recommended learning rate (a fitted ``lr_rule``), ``learning_rate`` too.

    The keys and target list are the library's own (:func:`fimlora.lora_config_for_allocation`: one
    non-overlapping full-name key per kept module). axolotl's rules on top of PEFT's: ``lora_rank_pattern`` and
    ``lora_alpha_pattern`` take positive integers only, so a module allocated rank 0 is left out of the
    patterns and of ``lora_target_modules`` (and ``lora_target_linear`` is turned off, as it would add it
    back); an alpha that is not a whole number cannot be written (``scale: preserve`` with ``lora_alpha`` not a
    multiple of ``lora_r`` gives one) and is refused, naming the module.
    """
    from peft import LoraConfig

    from ..resize import lora_config_for_allocation

    base = LoraConfig(r=allocation.base_r, lora_alpha=allocation.base_alpha, use_rslora=allocation.use_rslora,
                      target_modules=list(allocation.ranks))
    config = lora_config_for_allocation(allocation, base)
    fractional = {k: v for k, v in config.alpha_pattern.items() if float(v) != int(v)}
    if fractional:
        key, alpha = next(iter(fractional.items()))
        raise ValueError(f"lora_alpha_pattern: axolotl takes positive integers only; module {key!r} has alpha "
                         f"{alpha} ({len(fractional)} such modules); use a lora_alpha that is a multiple of lora_r, "
                         "or fimlora: {scale: fixed_alpha}")
    settings = {"lora_r": int(config.r), "lora_alpha": int(config.lora_alpha),
                "lora_rank_pattern": {k: int(v) for k, v in config.rank_pattern.items()},
                "lora_alpha_pattern": {k: int(v) for k, v in config.alpha_pattern.items()}}
    if any(r == 0 for r in allocation.ranks.values()):
        target = config.target_modules
        settings["lora_target_modules"] = target if isinstance(target, str) else sorted(target)
        settings["lora_target_linear"] = False
    if use_learning_rate and allocation.learning_rate is not None:
        settings["learning_rate"] = float(allocation.learning_rate)
    return settings


def fragment_yaml(settings: dict, source: str, allocation: RankAllocation | None = None) -> str:
    """``settings`` as YAML with a header that says where they came from and how to use them; a learning-rate
    recommendation of ``allocation`` that ``settings`` leaves out is a comment there."""
    import yaml  # comes with transformers (huggingface_hub), and axolotl needs it anyway

    header = (f"# fimlora ranks for axolotl, from {source}.\n"
              "# Paste into an axolotl config (without the fimlora plugin) to train an adapter with these ranks.\n")
    if allocation is not None and allocation.lr and "learning_rate" not in settings:
        header += (f"# {LrRecommendation.from_dict(allocation.lr).text()}; learning_rate is written only with "
                   "fimlora: {use_learning_rate: true} and a fitted rule.\n")
    return header + yaml.safe_dump(settings, sort_keys=False)
