"""``fimlora check``: the things that break rank_pattern adapters in practice.

Reads ``adapter_config.json`` and the safetensors file of a saved PEFT adapter
and reports: pattern keys that match no module, more than one module, or carry
the ``base_model.model.`` prefix; modules matched by several keys (resolved in
sorted order after a reload); ranks that disagree with the tensor shapes;
inconsistent scaling; and the smallest vLLM ``max_lora_rank`` that serves it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from .modules import check_pattern_keys, pattern_matches

__all__ = ["CheckReport", "check_adapter", "VLLM_MAX_LORA_RANKS", "vllm_max_lora_rank"]

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_TENSOR = re.compile(r"^(?:base_model\.model\.)?(?P<name>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class CheckReport:
    path: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ranks: dict[str, int] = field(default_factory=dict)
    scalings: dict[str, float] = field(default_factory=dict)
    vllm_max_lora_rank: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [f"adapter: {self.path}", f"modules: {len(self.ranks)}"]
        if self.ranks:
            lines.append(f"ranks: min {min(self.ranks.values())}, max {max(self.ranks.values())}, "
                         f"sum {sum(self.ranks.values())}")
        if self.vllm_max_lora_rank is not None:
            lines.append(f"vLLM: serve with --max-lora-rank {self.vllm_max_lora_rank}")
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"PROBLEM: {p}" for p in self.problems]
        lines.append("OK" if self.ok else f"FAILED: {len(self.problems)} problem(s)")
        return "\n".join(lines)


def vllm_max_lora_rank(max_rank: int) -> int | None:
    return next((v for v in VLLM_MAX_LORA_RANKS if v >= max_rank), None)


def _first_key(pattern: dict, name: str):
    for key in sorted(pattern):  # PEFT's order after save_pretrained (sorted JSON keys)
        if pattern_matches(key, name):
            return key
    return None


def check_adapter(path: str | Path, base_module_names: list[str] | None = None) -> CheckReport:
    """Check a saved adapter folder; ``base_module_names`` (all module names of the base model) sharpens key checks."""
    from safetensors import safe_open

    path = Path(path)
    report = CheckReport(str(path))
    cfg_path = path / "adapter_config.json"
    if not cfg_path.exists():
        report.problems.append(f"{cfg_path}: missing; not a PEFT adapter folder")
        return report
    cfg = json.loads(cfg_path.read_text())
    weights = path / "adapter_model.safetensors"
    if not weights.exists():
        report.problems.append(f"{weights}: missing (only safetensors adapters are checked)")
        return report
    if cfg.get("peft_type") not in (None, "LORA"):
        report.problems.append(f"peft_type: {cfg.get('peft_type')!r} is not LORA")
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            m = _TENSOR.match(key)
            if not m:
                continue
            shape = tuple(f.get_slice(key).get_shape())
            shapes.setdefault(m.group("name"), {})[m.group("ab")] = shape
    if not shapes:
        report.problems.append(f"{weights}: holds no LoRA A/B tensors")
        return report
    targets = list(shapes)
    all_names = base_module_names or targets
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    for label, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        for p in check_pattern_keys(pattern, targets, all_names):
            report.problems.append(f"{label}: {p}")

    r0, alpha0 = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    rslora = bool(cfg.get("use_rslora", False))
    for name, ab in shapes.items():
        key = _first_key(rank_pattern, name)
        r = int(rank_pattern[key]) if key is not None else r0
        akey = _first_key(alpha_pattern, name)
        alpha = float(alpha_pattern[akey]) if akey is not None else alpha0
        a_shape, b_shape = ab.get("A"), ab.get("B")
        if a_shape is None or b_shape is None:
            report.problems.append(f"{name}: has only lora_{'A' if a_shape else 'B'}")
            continue
        if 0 in a_shape or 0 in b_shape:
            report.problems.append(f"{name}: empty LoRA tensor {a_shape} / {b_shape} (a ZeRO-3 or sharded save?)")
            continue
        if a_shape[0] != r or b_shape[1] != r:
            report.problems.append(
                f"{name}: config gives rank {r} (key {key!r}) but tensors are A{list(a_shape)}, B{list(b_shape)}; "
                "loading fails with a size mismatch"
            )
        report.ranks[name] = int(a_shape[0])
        scaling = alpha / (math.sqrt(r) if rslora else r)
        if not (math.isfinite(scaling) and scaling > 0):
            report.problems.append(f"{name}: scaling alpha/r = {alpha}/{r} is not a finite positive number")
        report.scalings[name] = scaling
    distinct = sorted({round(s, 9) for s in report.scalings.values()})
    base_scaling = alpha0 / (math.sqrt(r0) if rslora else r0)
    if len(distinct) == 1:
        report.notes.append(f"scaling {distinct[0]:g} on every module (base alpha/r = {base_scaling:g})")
    elif distinct:
        report.notes.append(f"scaling varies over modules: {distinct[0]:g} .. {distinct[-1]:g} "
                            f"(base alpha/r = {base_scaling:g}; expected with scale='fixed_alpha')")
    changed = [n for n in targets if _first_key(rank_pattern, n) is not None and _first_key(alpha_pattern, n) is None
               and report.ranks.get(n) != r0]
    if changed:
        report.notes.append(f"{len(changed)} module(s) have a rank_pattern entry but no alpha_pattern entry; "
                            f"their scale is alpha/r_m (e.g. {changed[0]})")
    if report.ranks:
        report.vllm_max_lora_rank = vllm_max_lora_rank(max(max(report.ranks.values()), r0))
        if report.vllm_max_lora_rank is None:
            report.problems.append(f"rank {max(report.ranks.values())} exceeds vLLM's largest max_lora_rank 512")
    if cfg.get("use_dora"):
        report.notes.append("use_dora=True: vLLM refuses DoRA adapters")
    if cfg.get("lora_bias"):
        report.notes.append("lora_bias=True: vLLM refuses LoRA bias")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().split("_")[0] in ("pissa", "olora", "corda", "loftq"):
        report.notes.append(f"init_lora_weights={init!r} changes the base weights; vLLM refuses it")
    return report
