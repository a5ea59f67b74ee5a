"""A real axolotl plugin for the tests: listed before FimLoraPlugin, it records what calibration is about to see.

In ``post_trainer_create`` it saves the PEFT model as axolotl built it (before the resize: its LoraConfig and
every tensor, as the model itself does not pickle) and the first training batches of the trainer axolotl built,
so the test can rebuild that model and run ``fimlora.apply_fim_ranks`` on exactly those batches and compare.
The random states are restored, so training and calibration see the same batches.
"""

from __future__ import annotations

import copy
import itertools
import os
from pathlib import Path

import torch
from axolotl.integrations.base import BasePlugin

from fimlora.integrations import _unwrapped, preserved_rng


class ProbePlugin(BasePlugin):
    def post_trainer_create(self, cfg, trainer):
        n = int(os.environ.get("FIMLORA_PROBE_BATCHES", "0"))
        if not n:
            return
        with preserved_rng():
            batches = [dict(b) for b in itertools.islice(trainer.get_train_dataloader(), n)]
        model = _unwrapped(trainer.model)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        config = copy.deepcopy(model.peft_config["default"])
        torch.save({"state": state, "config": config, "batches": batches}, Path(cfg.output_dir) / "probe.pt")
