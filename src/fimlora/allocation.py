"""RankAllocation: the plain-data result of FIM-LoRA, serialisable to JSON."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .config import BUDGET_UNITS, SCALE_MODES, check_choice, check_int
from .io import atomic_write_text
from .lr import LrRecommendation
from .modules import check_same_modules

__all__ = ["RankAllocation", "scaled_alpha", "lora_scaling", "check_alphas", "serving_base"]

FORMAT_VERSION = 1
_PER_MODULE = ("scores", "ranks", "alphas", "old_ranks", "old_alphas", "shapes")


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """PEFT's scale of a LoRA module: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return float(alpha) / (math.sqrt(r) if use_rslora else r)


def scaled_alpha(alpha: float, old_r: int, new_r: int, scale: str, use_rslora: bool) -> float:
    """alpha for a module whose rank goes from ``old_r`` to ``new_r``.

    ``preserve``: alpha' = alpha * r'/r, so alpha'/r' == alpha/r
    (with rsLoRA: alpha' = alpha * sqrt(r'/r), so alpha'/sqrt(r') == alpha/sqrt(r)).
    ``fixed_alpha``: alpha' = alpha, so the scale becomes alpha/r'.
    """
    if scale == "fixed_alpha":
        return float(alpha)
    if scale != "preserve":
        raise ValueError(f"scale: must be 'preserve' or 'fixed_alpha', got {scale!r}")
    ratio = new_r / old_r
    return float(alpha * (math.sqrt(ratio) if use_rslora else ratio))


def _alpha_rule_text(old_alpha: float, old_r: int, new_r: int, scale: str, use_rslora: bool) -> str:
    if scale == "fixed_alpha":
        return f"the old alpha {old_alpha:g}"
    if use_rslora:
        return f"old alpha {old_alpha:g} * sqrt(r'/r) = {old_alpha:g} * sqrt({new_r}/{old_r})"
    return f"old alpha {old_alpha:g} * r'/r = {old_alpha:g} * {new_r}/{old_r}"


def check_alphas(allocation: RankAllocation) -> None:
    """Every kept module's alpha is :func:`scaled_alpha` of its old alpha and ranks under the map's own scale rule.

    The rule is ``settings["scale"]`` (every fimlora map records it); a map without one (written by hand) is
    checked against the default, ``"preserve"``. Rank-0 modules are skipped: they lose their adapter. A map
    whose ranks were edited by hand without its alphas fails here, naming the module, rule and values.
    """
    scale = allocation.settings.get("scale") if isinstance(allocation.settings, dict) else None
    note = ""
    if scale is None:
        scale, note = "preserve", " (settings has no 'scale'; maps without it are checked against the default)"
    check_choice("allocation.settings['scale']", scale, SCALE_MODES)
    for name, r in allocation.ranks.items():
        if r == 0:
            continue
        old_alpha, old_r = float(allocation.old_alphas[name]), int(allocation.old_ranks[name])
        want = scaled_alpha(old_alpha, old_r, r, scale, allocation.use_rslora)
        got = allocation.alphas[name]
        if not (isinstance(got, (int, float)) and math.isclose(float(got), want, rel_tol=1e-9, abs_tol=1e-12)):
            rule = _alpha_rule_text(old_alpha, old_r, r, scale, allocation.use_rslora)
            raise ValueError(f"allocation.alphas[{name!r}]: must be {want:g} = {rule} under the map's scale rule "
                             f"{scale!r}{note}, got {got!r}")


def serving_base(allocation: RankAllocation, r: int, alpha: float) -> tuple[int, float]:
    """The adapter config's global (r, lora_alpha) for a LoRA config with ``r``, ``alpha`` and this allocation.

    vLLM checks only the config's global r against ``--max-lora-rank`` and applies one scale, lora_alpha / r
    (lora_alpha / sqrt(r) with rsLoRA), to every module. With ``settings["max_lora_rank"] = K`` and r > K the
    config gets r' = K and alpha' = alpha * r'/r (rsLoRA: alpha * sqrt(r'/r)), so alpha'/r' = alpha/r: every
    module's scale under the default rule (alpha_m / r_m = alpha / r) is still the one vLLM applies. Otherwise
    (r, alpha) stay. PEFT reads every module's rank and alpha from rank_pattern/alpha_pattern, not from these.
    """
    k = allocation.settings.get("max_lora_rank") if isinstance(allocation.settings, dict) else None
    if k is None or r <= k:
        return r, alpha
    return int(k), scaled_alpha(alpha, r, int(k), "preserve", allocation.use_rslora)


@dataclass
class RankAllocation:
    """Per-module scores and ranks, keyed by exact PEFT rank_pattern keys (module order kept).

    ``old_ranks``/``old_alphas`` describe the adapter before resizing,
    ``ranks``/``alphas`` after; ``shapes`` maps name -> [d_in, d_out].

    ``budget`` counts ``budget_unit``: ``"rank"`` (the ranks sum to it exactly) or ``"params"``
    (sum_m r_m * costs[m] <= budget). ``costs`` maps name -> parameters per unit of rank
    (d_in + d_out; from ``shapes`` when not given) and ``params_spent`` is sum_m r_m * costs[m],
    recorded in both units; a rank map written before these fields loads with these defaults.
    ``confidence`` is the bootstrap of the map (:class:`fimlora.confidence.RankConfidence` as a dict:
    score and rank intervals, agreement per module, stable share), or None when not computed; with fewer
    than 2 calibration units it says ``estimable: False`` and carries no per-module values.
    ``lr`` is the recommended AdamW learning rate for the resized adapter and what it came from
    (:class:`fimlora.lr.LrRecommendation` as a dict: ``learning_rate``, None while the rule is not fitted,
    ``rule``, ``statistic``, ``constant``, ``passes``, ``seconds``, ``fitted_on``, ``details``), or None when
    not computed (``lr_rule="none"``, a rank map written before it, a random allocation).
    """

    scores: dict[str, float]
    ranks: dict[str, int]
    alphas: dict[str, float]
    old_ranks: dict[str, int]
    old_alphas: dict[str, float]
    shapes: dict[str, list[int]]
    budget: int
    r_min: int
    r_max: int
    base_r: int
    base_alpha: float
    use_rslora: bool = False
    method: str = "fim"
    settings: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    budget_unit: str = "rank"
    costs: dict[str, int] | None = None
    params_spent: int | None = None
    confidence: dict | None = None
    lr: dict | None = None

    def __post_init__(self) -> None:
        names = list(self.ranks)
        for fname in _PER_MODULE:
            check_same_modules(fname, getattr(self, fname), names, "the keys of ranks")
        check_choice("budget_unit", self.budget_unit, BUDGET_UNITS)
        if self.costs is None:
            self.costs = {n: sum(self.shapes[n]) for n in names}
        check_same_modules("costs", self.costs, names, "the keys of ranks")
        self.costs = {n: self.costs[n] for n in names}
        for n, c in self.costs.items():
            check_int(f"costs[{n!r}]", c, minimum=1)
        spent = self.trainable_lora_params()
        if self.params_spent is None:
            self.params_spent = spent
        elif self.params_spent != spent:
            raise ValueError(f"params_spent: must equal sum_m ranks[m] * costs[m] = {spent}, got {self.params_spent}")
        if self.budget_unit == "rank" and sum(self.ranks.values()) != self.budget:
            raise ValueError(f"ranks: must sum to budget={self.budget}, got {sum(self.ranks.values())}")
        if self.budget_unit == "params" and spent > self.budget:
            raise ValueError(f"ranks: sum_m ranks[m] * costs[m] must be <= budget={self.budget} parameters, "
                             f"got {spent}")
        if self.confidence is not None and self.confidence.get("estimable", True):
            check_same_modules("confidence.agreement", self.confidence.get("agreement", {}), names,
                               "the keys of ranks")
        if self.lr is not None:
            try:
                LrRecommendation.from_dict(self.lr)
            except TypeError as e:
                raise ValueError(f"lr: must be a learning-rate recommendation (LrRecommendation.to_dict()), got "
                                 f"{self.lr!r} ({e})") from None
        bad = [(n, r) for n, r in self.ranks.items() if not (self.r_min <= r <= self.r_max)]
        if bad:
            raise ValueError(f"ranks: must lie in [r_min={self.r_min}, r_max={self.r_max}], got {bad[:3]}")

    @property
    def learning_rate(self) -> float | None:
        """The recommended AdamW learning rate (``lr["learning_rate"]``), or None when there is none or the rule
        is not fitted yet."""
        return self.lr.get("learning_rate") if self.lr else None

    @property
    def module_names(self) -> list[str]:
        return list(self.ranks)

    def unstable_modules(self) -> list[str]:
        """Modules whose point rank comes back in fewer than the bootstrap's threshold of resamples ([] if none
        or no bootstrap, or a bootstrap that was not estimable)."""
        from .confidence import RankConfidence

        return RankConfidence.from_dict(self.confidence).unstable() if self.confidence else []

    def trainable_lora_params(self) -> int:
        """Number of LoRA parameters after resizing: sum_m r_m * costs[m], costs[m] = d_in + d_out."""
        return sum(r * self.costs[n] for n, r in self.ranks.items())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["format_version"] = FORMAT_VERSION
        d["module_order"] = list(self.ranks)
        return d

    def to_json(self, path: str | os.PathLike | None = None, indent: int = 2) -> str:
        """JSON text; also written atomically to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            atomic_write_text(path, text + "\n")
        return text

    @classmethod
    def from_dict(cls, d: dict) -> RankAllocation:
        """Build from :meth:`to_dict` output; ValueError naming the key for anything else."""
        if not isinstance(d, dict):
            raise ValueError(f"rank map: must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        unknown = sorted(set(d) - {f.name for f in fields(cls)} - {"format_version", "module_order"})
        if unknown:
            raise ValueError(f"rank map: unknown key(s) {unknown}; is this a fimlora rank_map.json?")
        version = d.pop("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(f"format_version: unsupported rank map version {version}, expected {FORMAT_VERSION}")
        for key in _PER_MODULE:
            if key not in d:
                raise ValueError(f"{key}: missing from the rank map")
            if not isinstance(d[key], dict):
                raise ValueError(f"{key}: must be an object mapping module name -> value, got {type(d[key]).__name__}")
        order = d.pop("module_order", None) or list(d["ranks"])
        check_same_modules("module_order", order, d["ranks"], "the keys of ranks")
        for key in _PER_MODULE:
            check_same_modules(key, d[key], order, "the keys of ranks")
            d[key] = {n: d[key][n] for n in order}
        d["ranks"] = {n: int(v) for n, v in d["ranks"].items()}
        d["old_ranks"] = {n: int(v) for n, v in d["old_ranks"].items()}
        if isinstance(d.get("costs"), dict):
            check_same_modules("costs", d["costs"], order, "the keys of ranks")
            d["costs"] = {n: d["costs"][n] for n in order}
        return cls(**d)

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> RankAllocation:
        """Parse JSON text, or read it from a file path; errors name the file."""
        s = str(text_or_path)
        where = "rank map JSON"
        if not s.lstrip().startswith("{"):
            where = s
            if not Path(s).is_file():
                raise FileNotFoundError(f"rank_map: {s} does not exist or is not a file")
            s = Path(s).read_text(encoding="utf-8")
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
