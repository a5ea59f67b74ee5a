"""``fimlora check``: the things that break rank_pattern adapters in practice.

Reads ``adapter_config.json`` and the safetensors file of a saved PEFT adapter
and reports: unreadable or invalid files and config values; pattern keys that are
not valid regexes, match no module, more than one module, or carry the
``base_model.model.`` prefix; modules matched by several keys (resolved in sorted
order after a reload); ranks that disagree with the tensor shapes; LoRA shapes that
disagree with the base model's modules (an adapter made for another model size);
DoRA magnitude vectors missing, of the wrong length or without use_dora; NaN/inf
values; inconsistent scaling; and for vLLM: the smallest ``max_lora_rank`` that serves it,
the padded serving size (every module at that rank) against the real size, and a warning when
the scaling differs between modules (vLLM applies one lora_alpha / r to all of them).

``check_adapter`` runs one step per group of rules; each step returns a list of
problems (or notes), so a broken file is reported rather than raised.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .allocation import lora_scaling
from .config import VLLM_MAX_LORA_RANKS, check_int, check_number
from .modules import check_pattern_keys, pattern_key_error, pattern_matches

__all__ = ["CheckReport", "check_adapter", "VLLM_MAX_LORA_RANKS", "vllm_max_lora_rank"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_TENSOR = re.compile(r"^(?:base_model\.model\.)?(?P<name>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
# DoRA's magnitude vector m (d_out,): PEFT saves it as "<module>.lora_magnitude_vector" (no adapter name, no ".weight")
_MAGNITUDE = re.compile(r"^(?:base_model\.model\.)?(?P<name>.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$")
_PEFT_DEFAULT_R, _PEFT_DEFAULT_ALPHA = 8, 8
_PATTERNS = ("rank_pattern", "alpha_pattern")

# name -> {"A": shape of lora_A (r, d_in), "B": shape of lora_B (d_out, r), "M": DoRA magnitude (d_out,) if saved}
LoraShapes = dict[str, dict[str, tuple[int, ...]]]
# name -> (d_in, d_out) of a linear-like base module, None for other modules
BaseShapes = Mapping[str, "tuple[int, int] | None"]


@dataclass
class CheckReport:
    path: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ranks: dict[str, int] = field(default_factory=dict)
    scalings: dict[str, float] = field(default_factory=dict)
    vllm_max_lora_rank: int | None = None
    # Parameters of the LoRA pairs: real, sum_m r_m * (d_in + d_out), and as vLLM pads them,
    # sum_m max_lora_rank * (d_in + d_out) (linear-like modules; None before the serving step ran).
    real_params: int | None = None
    serving_params: int | None = None

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
        if self.serving_params is not None and self.real_params:
            lines.append(f"vLLM: serving size {self.serving_params:,} params (every module padded to rank "
                         f"{self.vllm_max_lora_rank}) vs real size {self.real_params:,} "
                         f"({self.serving_params / self.real_params:.2f}x)")
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"PROBLEM: {p}" for p in self.problems]
        lines.append("OK" if self.ok else f"FAILED: {len(self.problems)} problem(s)")
        return "\n".join(lines)


class _Unreadable(Exception):
    """A file the remaining checks cannot run without; its message is the one problem reported."""


def vllm_max_lora_rank(max_rank: int) -> int | None:
    return next((v for v in VLLM_MAX_LORA_RANKS if v >= max_rank), None)


def _first_key(pattern: dict, name: str):
    for key in sorted(pattern):  # PEFT's order after save_pretrained (sorted JSON keys)
        if pattern_matches(key, name):
            return key
    return None


def _problem(check, *args) -> list[str]:
    """The config.py validators raise ValueError("field: rule, got value"); here that message is a problem."""
    try:
        check(*args)
    except ValueError as e:
        return [str(e)]
    return []


# ----------------------------------------------------------------------------- step 1: read the files


def read_adapter_config(cfg_path: Path) -> dict:
    """``adapter_config.json`` as a dict; _Unreadable names the file when missing, not JSON or not an object."""
    if not cfg_path.exists():
        raise _Unreadable(f"{cfg_path}: missing; not a PEFT adapter folder")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _Unreadable(f"{cfg_path}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise _Unreadable(f"{cfg_path}: must be a JSON object, got {type(cfg).__name__}")
    return cfg


def read_lora_tensors(weights: Path) -> tuple[LoraShapes, list[str]]:
    """(LoRA A/B shapes by module, problems with non-finite values) from reading every tensor of ``weights``.

    Adapters are small (MBs), so values are read, not only the header.
    """
    from safetensors import SafetensorError, safe_open

    if not weights.exists():
        raise _Unreadable(f"{weights}: missing (only safetensors adapters are checked)")
    shapes: LoraShapes = {}
    problems = []
    try:
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                m = _TENSOR.match(key)
                if m:
                    shapes.setdefault(m.group("name"), {})[m.group("ab")] = tuple(tensor.shape)
                m = _MAGNITUDE.match(key)
                if m:
                    shapes.setdefault(m.group("name"), {})["M"] = tuple(tensor.shape)
                if tensor.is_floating_point():
                    bad = int((~tensor.isfinite()).sum())
                    if bad:
                        problems.append(f"{key}: {bad} non-finite value(s) (NaN or inf)")
    except (SafetensorError, OSError) as e:
        raise _Unreadable(
            f"{weights}: cannot be read as safetensors ({e}); truncated or not a safetensors file?"
        ) from e
    if not any("A" in ab or "B" in ab for ab in shapes.values()):
        raise _Unreadable(f"{weights}: holds no LoRA A/B tensors")
    return shapes, problems


def _as_base_shapes(base_modules: BaseShapes | Iterable[str] | None) -> BaseShapes | None:
    if base_modules is None or isinstance(base_modules, Mapping):
        return base_modules
    return dict.fromkeys(base_modules)


# ----------------------------------------------------------------------------- step 2: config values


def config_problems(cfg: dict) -> list[str]:
    """Values PEFT (or the checks below) cannot use: peft_type, r, lora_alpha, the patterns and their entries."""
    problems = []
    if cfg.get("peft_type") not in (None, "LORA"):
        problems.append(f"peft_type: {cfg.get('peft_type')!r} is not LORA")
    problems += _problem(check_int, "r", cfg.get("r", _PEFT_DEFAULT_R), 1)
    problems += _problem(check_number, "lora_alpha", cfg.get("lora_alpha", _PEFT_DEFAULT_ALPHA), 0)
    for label in _PATTERNS:
        pattern = cfg.get(label) or {}
        if not isinstance(pattern, dict):
            problems.append(f"{label}: must be an object mapping key -> value, got {type(pattern).__name__}")
            continue
        for key, value in pattern.items():
            error = pattern_key_error(key)
            if error:
                problems.append(f"{label}: {error}; PEFT cannot load the adapter")
            if label == "rank_pattern":
                problems += _problem(check_int, f"rank_pattern[{key!r}]", value, 1)
            else:
                problems += _problem(check_number, f"alpha_pattern[{key!r}]", value, 0)
    return problems


# ----------------------------------------------------------------------------- step 3: tensors against the base model


def tensor_problems(shapes: LoraShapes, base: BaseShapes | None) -> list[str]:
    """Half-saved modules, empty tensors, and A (r, d_in) / B (d_out, r) that disagree with the base module."""
    problems = []
    for name, ab in shapes.items():
        a_shape, b_shape = ab.get("A"), ab.get("B")
        if a_shape is None and b_shape is None:
            continue  # a DoRA magnitude alone: reported by dora_problems
        if a_shape is None or b_shape is None:
            problems.append(f"{name}: has only lora_{'A' if a_shape else 'B'}")
            continue
        if 0 in a_shape or 0 in b_shape:
            problems.append(f"{name}: empty LoRA tensor {a_shape} / {b_shape} (a ZeRO-3 or sharded save?)")
            continue
        if base is None:
            continue
        if name not in base:
            problems.append(f"{name}: no such module in the base model")
            continue
        expected = base[name]
        # Only linear-like modules have a known (d_in, d_out); conv/embedding LoRA is not compared.
        if expected is not None and len(a_shape) == 2 and (a_shape[1], b_shape[0]) != tuple(expected):
            problems.append(
                f"{name}: lora_A has d_in {a_shape[1]} and lora_B has d_out {b_shape[0]}, but the base module is "
                f"(d_in, d_out) = ({expected[0]}, {expected[1]}); the adapter was made for a model of another size "
                "and fails to load"
            )
    return problems


def dora_problems(cfg: dict, shapes: LoraShapes) -> list[str]:
    """DoRA magnitude vectors against use_dora and the tensors: one m of shape (d_out,) per module, or none at all.

    A module saved without m reloads with m = ||W||_row of the base weight, not the trained m (PEFT only warns about
    the missing key); an m of another length fails to load; m without use_dora is ignored.
    """
    use_dora = bool(cfg.get("use_dora", False))
    problems = []
    for name, ab in shapes.items():
        m_shape, b_shape = ab.get("M"), ab.get("B")
        if m_shape is not None and "A" not in ab and b_shape is None:
            problems.append(f"{name}: has a DoRA lora_magnitude_vector but no lora_A/lora_B")
        elif not use_dora and m_shape is not None:
            problems.append(f"{name}: has a DoRA lora_magnitude_vector but use_dora is false; PEFT ignores it and "
                            "loads a plain LoRA adapter")
        elif use_dora and m_shape is None and b_shape is not None:
            problems.append(f"{name}: use_dora=True but no lora_magnitude_vector saved; PEFT warns and keeps "
                            "m = ||W||_row of the base weight instead of the trained magnitude")
        elif use_dora and m_shape is not None and b_shape is not None and tuple(m_shape) != (b_shape[0],):
            problems.append(f"{name}: lora_magnitude_vector has shape {list(m_shape)} but lora_B has d_out "
                            f"{b_shape[0]}; loading fails with a size mismatch")
    return problems


# ----------------------------------------------------------------------------- step 4: ranks and scales


def rank_and_scale_problems(cfg: dict, shapes: LoraShapes, report: CheckReport) -> list[str]:
    """Config rank (rank_pattern, else r) against the tensors; fills ``report.ranks`` and ``report.scalings``.

    Scaling per module is PEFT's alpha_m / r_m (alpha_m / sqrt(r_m) with rsLoRA), from the config.
    """
    problems = []
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    r0, alpha0 = cfg.get("r", _PEFT_DEFAULT_R), float(cfg.get("lora_alpha", _PEFT_DEFAULT_ALPHA))
    rslora = bool(cfg.get("use_rslora", False))
    for name, ab in shapes.items():
        a_shape, b_shape = ab.get("A"), ab.get("B")
        if a_shape is None or b_shape is None or 0 in a_shape or 0 in b_shape:
            continue  # reported by tensor_problems
        key = _first_key(rank_pattern, name)
        r = rank_pattern[key] if key is not None else r0
        akey = _first_key(alpha_pattern, name)
        alpha = float(alpha_pattern[akey]) if akey is not None else alpha0
        if a_shape[0] != r or b_shape[1] != r:
            problems.append(
                f"{name}: config gives rank {r} (key {key!r}) but tensors are A{list(a_shape)}, B{list(b_shape)}; "
                "loading fails with a size mismatch"
            )
        report.ranks[name] = int(a_shape[0])
        report.scalings[name] = lora_scaling(alpha, r, rslora)
    return problems


def scaling_notes(cfg: dict, report: CheckReport) -> list[str]:
    """Whether every module has one scale (what vLLM applies), and pattern entries without an alpha."""
    r0, alpha0 = cfg.get("r", _PEFT_DEFAULT_R), cfg.get("lora_alpha", _PEFT_DEFAULT_ALPHA)
    base_scaling = lora_scaling(alpha0, r0, bool(cfg.get("use_rslora", False)))
    notes = []
    distinct = sorted({round(s, 9) for s in report.scalings.values()})
    if len(distinct) == 1:
        notes.append(f"scaling {distinct[0]:g} on every module (base alpha/r = {base_scaling:g})")
    elif distinct:
        notes.append(f"scaling varies over modules: {distinct[0]:g} .. {distinct[-1]:g} "
                     f"(base alpha/r = {base_scaling:g}; expected with scale='fixed_alpha')")
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    changed = [n for n in report.ranks if _first_key(rank_pattern, n) is not None
               and _first_key(alpha_pattern, n) is None and report.ranks[n] != r0]
    if changed:
        notes.append(f"{len(changed)} module(s) have a rank_pattern entry but no alpha_pattern entry; "
                     f"their scale is alpha/r_m (e.g. {changed[0]})")
    return notes


# ----------------------------------------------------------------------------- step 5: vLLM


def serving_sizes(shapes: LoraShapes, ranks: Mapping[str, int], max_lora_rank: int) -> tuple[int, int]:
    """(real, padded) parameters: sum_m r_m * (d_in + d_out) and sum_m max_lora_rank * (d_in + d_out).

    vLLM copies each module into a slot of rank max_lora_rank, so the padded size is what serving costs.
    Only linear-like modules (2-d A and B) count; d_in from A (r, d_in), d_out from B (d_out, r).
    """
    real = padded = 0
    for name, r in ranks.items():
        a_shape, b_shape = shapes[name]["A"], shapes[name]["B"]
        if len(a_shape) != 2 or len(b_shape) != 2:
            continue
        cost = a_shape[1] + b_shape[0]
        real += r * cost
        padded += max_lora_rank * cost
    return real, padded


def vllm_scaling_note(cfg: dict, report: CheckReport) -> list[str]:
    """A warning when any module's scaling differs from the config's lora_alpha / r, the one vLLM applies."""
    r0, alpha0 = cfg.get("r", _PEFT_DEFAULT_R), cfg.get("lora_alpha", _PEFT_DEFAULT_ALPHA)
    base = lora_scaling(alpha0, r0, bool(cfg.get("use_rslora", False)))
    off = [n for n, s in report.scalings.items() if round(s, 9) != round(base, 9)]
    if not off:
        return []
    return [f"WARNING: vLLM will mis-scale this adapter: it ignores alpha_pattern and applies one scaling "
            f"lora_alpha/r = {base:g} to every module, but {len(off)} of {len(report.scalings)} module(s) use "
            f"another (e.g. {off[0]}: {report.scalings[off[0]]:g}; scale='fixed_alpha' does this); recalibrate "
            "with scale='preserve' to serve it with vLLM"]


def vllm_findings(cfg: dict, shapes: LoraShapes, report: CheckReport) -> tuple[list[str], list[str]]:
    """(problems, notes) for serving with vLLM; sets ``report.vllm_max_lora_rank`` and the serving sizes."""
    problems, notes = [], []
    if report.ranks:
        largest = max(max(report.ranks.values()), cfg.get("r", _PEFT_DEFAULT_R))
        report.vllm_max_lora_rank = vllm_max_lora_rank(largest)
        if report.vllm_max_lora_rank is None:
            problems.append(f"rank {largest} exceeds vLLM's largest max_lora_rank {VLLM_MAX_LORA_RANKS[-1]}")
        else:
            report.real_params, report.serving_params = serving_sizes(shapes, report.ranks,
                                                                      report.vllm_max_lora_rank)
    notes += vllm_scaling_note(cfg, report)
    if cfg.get("use_dora"):
        notes.append("use_dora=True: vLLM refuses DoRA adapters")
    if cfg.get("lora_bias"):
        notes.append("lora_bias=True: vLLM refuses LoRA bias")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().split("_")[0] in ("pissa", "olora", "corda", "loftq"):
        notes.append(f"init_lora_weights={init!r} changes the base weights; vLLM refuses it")
    return problems, notes


# ----------------------------------------------------------------------------- the check


def check_adapter(path: str | Path, base_modules: BaseShapes | Iterable[str] | None = None) -> CheckReport:
    """Check a saved adapter folder; problems are reported in the returned CheckReport, not raised.

    ``base_modules`` (optional) describes the base model: a dict of every module name ->
    (d_in, d_out) for linear-like modules or None for others (as ``base_module_shapes`` gives),
    or just the names. It sharpens the pattern-key checks, and with shapes each LoRA module's
    A (r, d_in) and B (d_out, r) are compared with its base module.
    """
    path = Path(path)
    report = CheckReport(str(path))
    try:
        cfg = read_adapter_config(path / CONFIG_NAME)
        shapes, non_finite = read_lora_tensors(path / WEIGHTS_NAME)
    except _Unreadable as e:
        report.problems.append(str(e))
        return report
    report.problems += non_finite
    base = _as_base_shapes(base_modules)
    report.problems += tensor_problems(shapes, base)
    report.problems += dora_problems(cfg, shapes)
    bad_config = config_problems(cfg)
    if bad_config:
        # The key and rank checks below would trip over the same values.
        report.problems += bad_config
        return report
    targets = list(shapes)
    all_names = list(base) if base is not None else targets
    for label in _PATTERNS:
        report.problems += [f"{label}: {p}" for p in check_pattern_keys(cfg.get(label) or {}, targets, all_names)]
    report.problems += rank_and_scale_problems(cfg, shapes, report)
    report.notes += scaling_notes(cfg, report)
    vllm_problems, vllm_notes = vllm_findings(cfg, shapes, report)
    report.problems += vllm_problems
    report.notes += vllm_notes
    return report
