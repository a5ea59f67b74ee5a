"""``fimlora check``: the things that break rank_pattern adapters in practice, and how each engine serves them.

Reads ``adapter_config.json`` and the safetensors file of a saved PEFT adapter
and reports: unreadable or invalid files and config values; pattern keys that are
not valid regexes, match no module or carry the ``base_model.model.`` prefix; modules
matched by several keys (resolved in sorted order after a reload; a key that matches
several modules, like ``{"q_proj": 2}``, is ordinary PEFT usage); ranks that disagree
with the tensor shapes; LoRA shapes that disagree with the base model's modules (an
adapter made for another model size); DoRA magnitude vectors missing, of the wrong
length or without use_dora; NaN/inf values; inconsistent scaling; the smallest vLLM
``max_lora_rank`` that serves it and the padded serving size (every module at that rank)
against the real size; and, per serving engine, whether it refuses the adapter or
multiplies some module's B_m A_m x by another scale than PEFT does.

Each engine's scale rule and refusals, read from its source, are records in :mod:`fimlora.engines`; the adapter
files (names, tensor keys, PEFT's defaults) are read by :mod:`fimlora.adapter_files`. Both modules' public names
used with the checks are re-exported here.

``check_adapter`` runs one step per group of rules; each step returns a list of
problems (or notes), so a broken file is reported rather than raised.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .adapter_files import (
    CONFIG_NAME,
    PEFT_DEFAULT_ALPHA,
    PEFT_DEFAULT_R,
    WEIGHTS_NAME,
    BaseShapes,
    LoraShapes,
    UnreadableAdapter,
    config_rank_alpha,
    first_pattern_key,
    module_rank_alpha,
    module_shapes,
    read_adapter_config,
    read_lora_tensors,
)
from .allocation import lora_scaling
from .config import VLLM_MAX_LORA_RANKS, check_choice, check_int, check_number
from .engines import (
    BASE_CHANGING_INITS,
    ENGINES,
    SERVE_ENGINES,
    ServingVerdict,
    changes_base_weights,
    engine_refusals,
    only_classifier_heads,
    served_scales,
    serving_verdict,
    vllm_max_lora_rank,
    vllm_rank_needed,
)
from .modules import check_pattern_keys, pattern_key_error

__all__ = ["CheckReport", "ServingVerdict", "SERVE_ENGINES", "BASE_CHANGING_INITS", "changes_base_weights",
           "check_adapter", "served_scales", "serving_verdict", "VLLM_MAX_LORA_RANKS", "vllm_max_lora_rank",
           # adapter-file and engine names re-exported: callers imported them from here before the split
           "CONFIG_NAME", "WEIGHTS_NAME", "UnreadableAdapter", "engine_refusals", "module_rank_alpha",
           "module_shapes", "only_classifier_heads", "read_adapter_config", "read_lora_tensors"]

_PATTERNS = ("rank_pattern", "alpha_pattern")


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
    # engine -> how it serves the adapter (filled once the ranks are known)
    serving: dict[str, ServingVerdict] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [f"adapter: {self.path}"]
        if self.ranks or self.ok:  # an adapter that could not be read has no module count to give
            lines.append(f"modules: {len(self.ranks)}")
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


def _problem(check, *args) -> list[str]:
    """The config.py validators raise ValueError("field: rule, got value"); here that message is a problem."""
    try:
        check(*args)
    except ValueError as e:
        return [str(e)]
    return []


# ----------------------------------------------------------------------------- step 1: the files (adapter_files)


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
    problems += _problem(check_int, "r", cfg.get("r", PEFT_DEFAULT_R), 1)
    # alpha 0 is valid PEFT (scale 0: the adapter changes nothing); engines read it otherwise (llama.cpp: scale 1).
    problems += _problem(check_number, "lora_alpha", cfg.get("lora_alpha", PEFT_DEFAULT_ALPHA), 0, False)
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
                problems += _problem(check_number, f"alpha_pattern[{key!r}]", value, 0, False)
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


def _is_leaf(name: str, names: set[str]) -> bool:
    return not any(other.startswith(name + ".") for other in names)


def _peft_internal(name: str) -> bool:
    """A name inside a PEFT-wrapped model (lora_A, base_layer, ...), not a module of the base model."""
    return any(part.startswith("lora_") or part in ("base_layer", "modules_to_save", "original_module")
               for part in name.split("."))


def _names_peft_matched(base: BaseShapes, adapted: set[str]) -> set[str]:
    """The base model's names in the form PEFT matched the adapter's targeting against.

    PEFT matched the names of one model, the one the adapter was made on, and the adapter's names are some of
    them. A base given in two forms (bare, and with the task model's prefix) holds a second name for each body
    module, which exclude_modules or a regex written for the adapter's form need not match: of the two, only the
    one under the adapter's own top-level modules is PEFT's. A name without a twin (a head such as lm_head) stays.
    """
    roots = {a.split(".")[0] for a in adapted}
    tails = {n.split(".", 1)[1] for n in base if "." in n}

    def has_twin(n: str) -> bool:
        return n in tails or ("." in n and n.split(".", 1)[1] in base)

    return {n for n in base if n and not _peft_internal(n) and (n.split(".")[0] in roots or not has_twin(n))}


def untargeted_problems(cfg: dict, shapes: LoraShapes, base: BaseShapes) -> list[str]:
    """Base modules the config's targeting selects (PEFT's own rule) for which the adapter has no LoRA tensors.

    PEFT's from_pretrained adds a fresh adapter (B = 0) to each, so the adapter still loads but those modules are
    un-adapted: the usual cause is an adapter made on a model cut to fewer layers, loaded onto the full model.
    Modules dropped at rank 0 are not in target_modules after the drop, so they are not reported.
    """
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    fields = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save")
    if not cfg.get("target_modules"):
        return []
    try:
        config = LoraConfig(**{k: cfg[k] for k in fields if cfg.get(k) is not None})
    except (TypeError, ValueError):  # a config PEFT itself refuses; nothing to compare with
        return []
    adapted = set(shapes)
    names = _names_peft_matched(base, adapted)
    missing = [name for name in sorted(names - adapted)
               if _is_leaf(name, names) and check_target_module_exists(config, name)]
    if not missing:
        return []
    return [f"{len(missing)} base module(s) match target_modules but have no LoRA tensors in the adapter (e.g. "
            f"{missing[0]}): PEFT would add fresh zero adapters there; was the adapter made on a model cut to fewer "
            "layers (calibrate --n-layers N)? give the same --n-layers N with the base"]


# ----------------------------------------------------------------------------- step 4: ranks and scales


def rank_and_scale_problems(cfg: dict, shapes: LoraShapes, report: CheckReport) -> list[str]:
    """Config rank (rank_pattern, else r) against the tensors; fills ``report.ranks`` and ``report.scalings``.

    Scaling per module is PEFT's alpha_m / r_m (alpha_m / sqrt(r_m) with rsLoRA), from the config.
    """
    problems = []
    rank_pattern = cfg.get("rank_pattern") or {}
    for name, ab in shapes.items():
        a_shape, b_shape = ab.get("A"), ab.get("B")
        if a_shape is None or b_shape is None or 0 in a_shape or 0 in b_shape:
            continue  # reported by tensor_problems
        key, r = first_pattern_key(rank_pattern, name), module_rank_alpha(cfg, name)[0]
        if a_shape[0] != r or b_shape[1] != r:
            problems.append(
                f"{name}: config gives rank {r} (key {key!r}) but tensors are A{list(a_shape)}, B{list(b_shape)}; "
                "loading fails with a size mismatch"
            )
        report.ranks[name] = int(a_shape[0])
    report.scalings.update(served_scales(cfg, report.ranks, "peft"))
    return problems


def scaling_notes(cfg: dict, report: CheckReport) -> list[str]:
    """Whether every module has one scale (what vLLM applies), and pattern entries without an alpha."""
    r0, alpha0 = config_rank_alpha(cfg)
    base_scaling = lora_scaling(alpha0, r0, bool(cfg.get("use_rslora", False)))
    notes = []
    distinct = sorted({round(s, 9) for s in report.scalings.values()})
    if len(distinct) == 1:
        notes.append(f"scaling {distinct[0]:g} on every module (base alpha/r = {base_scaling:g})")
    elif distinct:
        notes.append(f"scaling varies over modules: {distinct[0]:g} .. {distinct[-1]:g} "
                     f"(base alpha/r = {base_scaling:g}; expected with scale='fixed_alpha', and after export --for "
                     "llama.cpp, which folds each module's scale into lora_B)")
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    changed = [n for n in report.ranks if first_pattern_key(rank_pattern, n) is not None
               and first_pattern_key(alpha_pattern, n) is None and report.ranks[n] != r0]
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


def vllm_sizes(cfg: dict, shapes: LoraShapes, report: CheckReport) -> None:
    """Set ``report.vllm_max_lora_rank`` and the serving sizes (None when no vLLM --max-lora-rank covers the
    adapter: a refusal of vLLM's, :func:`engine_refusals`, and no problem for the other engines).

    vLLM pads every module to --max-lora-rank K, and K must cover the config's r as well as every module's rank
    (:func:`fimlora.engines.vllm_rank_needed`).
    """
    if report.ranks:
        report.vllm_max_lora_rank = vllm_max_lora_rank(vllm_rank_needed(cfg, report.ranks))
        if report.vllm_max_lora_rank is not None:
            report.real_params, report.serving_params = serving_sizes(shapes, report.ranks,
                                                                      report.vllm_max_lora_rank)


def serving_findings(cfg: dict, report: CheckReport, serve: str | None) -> tuple[list[str], list[str]]:
    """(problems, notes) per engine; fills ``report.serving``.

    Without ``serve`` every engine that refuses or mis-scales the adapter gets a note. With ``serve`` only that
    engine is judged, and serving it wrongly is a problem (``fimlora check --serve ENGINE`` exits 1).
    """
    problems, notes = [], []
    engines = [serve] if serve else [e for e in SERVE_ENGINES if e != "peft"]
    for engine in engines:
        verdict = report.serving[engine] = serving_verdict(cfg, report.ranks, engine)
        line = verdict.describe(report.path)
        if verdict.ok:
            if serve:
                notes.append(line)
        elif serve:
            problems.append(line)
        else:
            notes.append(f"WARNING: served wrongly by {line}")
    for engine in engines:
        notes += ENGINES[engine].notes(cfg, report.serving[engine])
    if not serve and all(report.serving[e].ok for e in engines):
        notes.append("served as PEFT computes it by " + ", ".join(ENGINES[e].name for e in engines))
    return problems, notes


# ----------------------------------------------------------------------------- the check


def check_adapter(path: str | Path, base_modules: BaseShapes | Iterable[str] | None = None,
                  serve: str | None = None) -> CheckReport:
    """Check a saved adapter folder; problems are reported in the returned CheckReport, not raised.

    ``base_modules`` (optional) describes the base model: a dict of every module name ->
    (d_in, d_out) for linear-like modules or None for others (as ``base_module_shapes`` gives),
    or just the names. It sharpens the pattern-key checks, and with shapes each LoRA module's
    A (r, d_in) and B (d_out, r) are compared with its base module.

    ``serve`` (one of ``SERVE_ENGINES``): judge only that engine, and count serving it wrongly (a refusal, or a
    module scaled otherwise than PEFT scales it) as a problem. Without it, every engine that would serve the
    adapter wrongly is named in a note.
    """
    if serve is not None:
        check_choice("serve", serve, SERVE_ENGINES)
    path = Path(path)
    report = CheckReport(str(path))
    if not path.exists():
        report.problems.append(f"{path}: does not exist")
        return report
    if not path.is_dir():
        report.problems.append(f"{path}: is not a folder (a PEFT adapter is a folder with {CONFIG_NAME} and "
                               f"{WEIGHTS_NAME})")
        return report
    try:
        cfg = read_adapter_config(path / CONFIG_NAME)
        shapes, non_finite = read_lora_tensors(path / WEIGHTS_NAME)
    except UnreadableAdapter as e:
        report.problems.append(str(e))
        return report
    report.problems += non_finite
    base = _as_base_shapes(base_modules)
    report.problems += tensor_problems(shapes, base)
    if base is not None:
        report.problems += untargeted_problems(cfg, shapes, base)
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
    vllm_sizes(cfg, shapes, report)
    serve_problems, serve_notes = serving_findings(cfg, report, serve)
    report.problems += serve_problems
    report.notes += serve_notes
    return report
