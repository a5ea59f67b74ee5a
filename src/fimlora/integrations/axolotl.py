"""FIM-LoRA as an axolotl plugin: calibrate on the batches axolotl builds, resize before its optimizer exists.

    plugins: [fimlora.integrations.axolotl.FimLoraPlugin]
    fimlora: {n_batches: 8, r_min: 1, budget_unit: params}

axolotl (0.19) calls ``post_trainer_create`` right after building its Trainer and before ``trainer.train()``,
which is where HF Trainers create the optimizer; so :func:`fimlora.integrations.calibrate_trainer` runs there,
on the trainer's own dataloader (axolotl's packing, masking, collator) and loss (``trainer.compute_loss``).
axolotl saves the adapter config (``save_initial_configs``) after this hook, from the same LoraConfig object
the resize updates, so the pre-saved and the final ``adapter_config.json`` both carry the new patterns.

Importing this module imports axolotl; nothing else in fimlora does.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..allocation import RankAllocation
from ..extras import require
from ..io import atomic_write_text
from ..resize import apply_allocation
from . import _unwrapped, apply_learning_rate, calibrate_trainer, check_no_optimizer
from .axolotl_rules import (
    FRAGMENT,
    LORA_ADAPTERS,
    PLUGIN_SETTINGS,
    axolotl_lora_settings,
    check_no_lora_kernels,
    default_kernels_off,
    fim_settings,
    fragment_yaml,
    plan_run,
)

__all__ = ["FimLoraPlugin"]

logger = logging.getLogger(__name__)

# Without axolotl, an error that names the extra to install, as every other optional dependency's does.
BasePlugin = require("axolotl.integrations.base", "axolotl", "fimlora.integrations.axolotl (the plugin)").BasePlugin


class FimLoraPlugin(BasePlugin):
    """Calibrates and resizes the LoRA adapter of an axolotl run, or gives a resumed run its saved ranks."""

    def __init__(self):
        super().__init__()
        self.allocation: RankAllocation | None = None
        self.plan = None
        self.settings: dict = {}

    def register(self, cfg):
        # The raw config, before axolotl's schema auto-enables its fused LoRA kernels.
        unset = default_kernels_off(cfg)
        if unset:
            logger.info("fimlora: %s set to false (fused LoRA kernels bypass the layers calibration reads)",
                        ", ".join(unset))

    def get_input_args(self) -> str:
        return "fimlora.integrations.axolotl_args.FimLoraArgs"

    def post_trainer_create(self, cfg, trainer):
        if cfg.adapter not in LORA_ADAPTERS:
            raise ValueError(f"adapter: the fimlora plugin resizes a LoRA adapter; needs adapter: lora or qlora, "
                             f"got {cfg.adapter!r}")
        settings = fim_settings(cfg.fimlora)  # validated by the schema already; a DictDefault becomes a dict
        self.plan = plan_run(cfg.output_dir, cfg.resume_from_checkpoint, bool(cfg.auto_resume_from_checkpoints),
                             cfg.lora_model_dir)
        logger.info("fimlora: %s (%s)", self.plan.action, self.plan.reason)
        if self.plan.action == "keep":
            return
        if self.plan.action == "load":
            check_no_optimizer(trainer, "the fimlora plugin")
            self.allocation = RankAllocation.from_json(self.plan.rank_map)
            apply_allocation(_unwrapped(trainer.model), self.allocation,
                             settings.get("adapter_name", "default"))
            # A resumed run trains at the learning rate the first one did.
            apply_learning_rate(trainer, self.allocation, settings.get("use_learning_rate", False))
            return
        check_no_lora_kernels(cfg)
        self.settings = settings
        self.allocation = calibrate_trainer(trainer, **settings)
        if trainer.args.process_index == 0:
            self._write_fragment(Path(cfg.output_dir))

    def _write_fragment(self, out: Path) -> None:
        # Optional convenience: an adapter whose alphas axolotl cannot write is still a good adapter.
        try:
            use = self.settings.get("use_learning_rate", PLUGIN_SETTINGS["use_learning_rate"])
            text = fragment_yaml(axolotl_lora_settings(self.allocation, use), str(out / "rank_map.json"),
                                 self.allocation)
        except ValueError as e:
            logger.warning("fimlora: %s not written: %s", FRAGMENT, e)
            return
        atomic_write_text(out / FRAGMENT, text)
