"""The ``fimlora:`` block of an axolotl config as a pydantic model, which axolotl merges into its config schema.

axolotl imports this class by the dotted path :meth:`FimLoraPlugin.get_input_args` returns and validates the
YAML with it, so a wrong setting fails when the config is loaded, before any model is, with FimConfig's error.
Needs only pydantic (which axolotl requires), not axolotl, so its tests run without axolotl.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, field_validator

from .axolotl_rules import fim_settings

__all__ = ["FimLoraArgs"]


class FimLoraArgs(BaseModel):
    """``fimlora: {n_batches: 8, r_min: 1, budget_unit: params, ...}``: any :class:`fimlora.FimConfig` setting."""

    fimlora: dict[str, Any] | None = None

    @field_validator("fimlora", mode="before")
    @classmethod
    def _fim_config(cls, value):
        return fim_settings(value)  # FimConfig is the one place these rules live
