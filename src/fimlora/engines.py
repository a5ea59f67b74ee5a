"""How each serving engine serves a saved PEFT adapter: one record per engine, each read from the engine's source.

PEFT adds s_m * B_m A_m x to module m's output, with A_m (r_m, d_in), B_m (d_out, r_m) and s_m = alpha_m / r_m
(alpha_m / sqrt(r_m) with use_rslora), alpha_m and r_m from alpha_pattern / rank_pattern (first matching key),
else lora_alpha and r (:func:`fimlora.adapter_files.module_rank_alpha`). An engine either refuses the adapter (it
will not load it) or multiplies B_m A_m x by its own scale sigma_m, which can differ from s_m.

An :class:`Engine` record holds what fimlora knows of one engine: the name reports print, the version its rules
were read from, its scale rule sigma(cfg, ranks), what it refuses (each reason naming the field and the value),
the ``fimlora export --for`` target that makes it compute s_m, and where in its source the rules are. The
registry :data:`ENGINES` (key -> record; its keys are :data:`SERVE_ENGINES`) is the one place an engine's rule is
written; each record's comment states its rule. :func:`served_scales`, :func:`engine_refusals` and
:func:`serving_verdict` look engines up there.

Every engine but PEFT loads the adapter onto the original base model, so each refuses an adapter whose
``init_lora_weights`` made PEFT rewrite the base weights (:data:`BASE_CHANGING_INITS`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .adapter_files import config_rank_alpha, module_rank_alpha
from .allocation import lora_scaling
from .config import VLLM_MAX_LORA_RANKS, check_choice

__all__ = ["Engine", "ENGINES", "SERVE_ENGINES", "ServingVerdict", "served_scales", "engine_refusals",
           "serving_verdict", "SCALE_RTOL", "BASE_CHANGING_INITS", "changes_base_weights", "VLLM_HEADS",
           "only_classifier_heads", "vllm_max_lora_rank", "vllm_rank_needed"]

# init_lora_weights values with which PEFT (0.21.2, ``LoraLayer.update_layer``) rewrites the base weights while it
# creates the adapter: pissa_init, corda_init, olora_init, loftq_init and lora_ga_init all assign
# base_layer.weight.data. Such an adapter is right only on that rewritten base, so an engine that loads it onto the
# original base serves it wrongly (tests/lib/test_check.py checks this table against the pinned PEFT). The value
# says whether PEFT matches the name as a prefix ("pissa_niter_4", "corda_...") or exactly.
BASE_CHANGING_INITS = {"pissa": "prefix", "corda": "prefix", "olora": "exact", "loftq": "exact", "lora_ga": "exact"}
# Relative difference below which two scales are the same number written two ways (alpha*r'/r / r' vs alpha/r).
SCALE_RTOL = 1e-6
# modules_to_save entries vLLM >= 0.31 loads (the heads of classification models); any other entry is refused.
VLLM_HEADS = ("classifier", "score")

Scales = Callable[[dict, Mapping[str, int]], "dict[str, float]"]
Refusals = Callable[[dict, Mapping[str, int]], "list[str]"]


def changes_base_weights(init) -> bool:
    """Whether PEFT rewrites the base weights for ``init_lora_weights=init`` (:data:`BASE_CHANGING_INITS`)."""
    if not isinstance(init, str):
        return False
    init = init.lower()
    return any(init == name or (how == "prefix" and init.startswith(name))
               for name, how in BASE_CHANGING_INITS.items())


def only_classifier_heads(saved) -> bool:
    """Whether ``modules_to_save`` is non-empty and holds only heads vLLM >= 0.31 loads (classifier, score)."""
    return bool(saved) and all(str(m).split(".")[-1] in VLLM_HEADS for m in saved)


def vllm_max_lora_rank(max_rank: int) -> int | None:
    """The smallest vLLM ``--max-lora-rank`` choice >= ``max_rank``; None when ``max_rank`` exceeds them all."""
    return next((v for v in VLLM_MAX_LORA_RANKS if v >= max_rank), None)


def vllm_rank_needed(cfg: dict, ranks: Mapping[str, int]) -> int:
    """The rank vLLM's --max-lora-rank must cover: the largest module rank, and the config's r.

    vLLM <= 0.31 validates only the config's r against --max-lora-rank, >= 0.32 max(r, rank_pattern values); both
    pad every module to it.
    """
    return max(max(ranks.values(), default=0), config_rank_alpha(cfg)[0])


@dataclass
class ServingVerdict:
    """How one engine serves an adapter: refusals (it will not load it) and modules it scales otherwise than PEFT.

    ``mis_scaled`` maps module -> (the engine's scale, PEFT's scale s_m), for every module where they differ.
    """

    engine: str
    refusals: list[str] = field(default_factory=list)
    mis_scaled: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.refusals and not self.mis_scaled

    def describe(self, path: str | None = None) -> str:
        """One line: what the engine does with the adapter and, if it serves it wrongly, what to run."""
        engine = ENGINES[self.engine]
        if self.ok:
            return f"{engine.name}: serves it as PEFT computes it"
        parts = []
        if self.refusals:
            parts.append("refuses it: " + "; ".join(self.refusals))
        if self.mis_scaled:
            module, (served, peft) = next(iter(self.mis_scaled.items()))
            parts.append(f"scales {len(self.mis_scaled)} module(s) otherwise than PEFT (e.g. {module}: {served:g} "
                         f"instead of {peft:g})")
        # Scales are fixed by folding them into lora_B; a refusal (DoRA, a saved head) only by merging.
        fix = "merged" if self.refusals else engine.export_for
        how = f"; run `fimlora export {path or 'ADAPTER'} --for {fix} --out DIR"
        how += " --base-model BASE`" if fix == "merged" else "`"
        if fix == "merged" and engine.after_merge:
            how += f", then {engine.after_merge}"
        return f"{engine.name}: {', and '.join(parts)}{how}"


def _no_notes(cfg: dict, verdict: ServingVerdict) -> list[str]:
    return []


@dataclass(frozen=True)
class Engine:
    """One serving engine: how reports name it, the version its rules were read from, its scale rule
    ``scales(cfg, ranks)`` -> module -> sigma_m (``ranks``: module -> r_m, the rank of its tensors), what it refuses
    ``refuses(cfg, ranks)`` -> reasons ([] when it loads the adapter), the ``fimlora export --for`` target that
    folds PEFT's scales into an adapter it serves, and ``source``, where in the engine the rules are.

    ``after_merge``: what to run on a merged export before this engine serves it; ``notes(cfg, verdict)``: what
    ``fimlora check`` adds about this engine beyond its verdict.
    """

    name: str
    version: str
    scales: Scales
    refuses: Refusals
    export_for: str
    source: str
    after_merge: str = ""
    notes: Callable[[dict, ServingVerdict], list[str]] = _no_notes


# ----------------------------------------------------------------------------- scale rules


def _peft_scales(cfg: dict, ranks: Mapping[str, int]) -> dict[str, float]:
    """s_m = alpha_m / r'_m, or alpha_m / sqrt(r'_m) with use_rslora, r'_m and alpha_m from the patterns."""
    rslora = bool(cfg.get("use_rslora", False))
    scales = {}
    for n in ranks:
        r, alpha = module_rank_alpha(cfg, n)
        scales[n] = lora_scaling(alpha, r, rslora)
    return scales


def _one_scale(cfg: dict, ranks: Mapping[str, int], reads_rslora: bool) -> dict[str, float]:
    """s = lora_alpha / r for every module (lora_alpha / sqrt(r) with use_rslora, if the engine reads it)."""
    r, alpha = config_rank_alpha(cfg)
    return dict.fromkeys(ranks, lora_scaling(alpha, r, reads_rslora and bool(cfg.get("use_rslora", False))))


def _own_rank_scales(cfg: dict, ranks: Mapping[str, int]) -> dict[str, float]:
    """sigma_m = lora_alpha / r_m with the tensor's own rank; lora_alpha = 0 means sigma_m = 1."""
    alpha = config_rank_alpha(cfg)[1]
    return {n: lora_scaling(alpha, r, False) if alpha else 1.0 for n, r in ranks.items()}


# ----------------------------------------------------------------------------- refusals (each names field and value)


def _refuses_nothing(cfg: dict, ranks: Mapping[str, int]) -> list[str]:
    return []


def _dora(cfg: dict, why: str = "") -> list[str]:
    return ["use_dora=True (DoRA)" + why] if cfg.get("use_dora") else []


def _lora_bias(cfg: dict) -> list[str]:
    return ["lora_bias=True (LoRA bias)"] if cfg.get("lora_bias") else []


def _base_changing(cfg: dict) -> list[str]:
    # Every engine here loads the adapter onto the original base; the adapter is right only on PEFT's rewritten
    # one (PEFT itself converts it with path_initial_model_for_weight_conversion on save).
    init = cfg.get("init_lora_weights")
    return [f"init_lora_weights={init!r} changes the base weights"] if changes_base_weights(init) else []


def _vllm_refusals(cfg: dict, ranks: Mapping[str, int]) -> list[str]:
    saved = cfg.get("modules_to_save") or []
    reasons = _dora(cfg)
    if saved and not only_classifier_heads(saved):
        reasons.append(f"modules_to_save={list(saved)} (vLLM <= 0.30 refuses any; >= 0.31 accepts only "
                       f"{'/'.join(VLLM_HEADS)} of classification models)")
    reasons += _lora_bias(cfg)
    needed = vllm_rank_needed(cfg, ranks)
    if vllm_max_lora_rank(needed) is None:
        reasons.append(f"rank {needed} exceeds vLLM's largest --max-lora-rank {VLLM_MAX_LORA_RANKS[-1]}")
    return reasons + _base_changing(cfg)


def _vllm_notes(cfg: dict, verdict: ServingVerdict) -> list[str]:
    # A classifier/score head alone is no refusal (0.31 and later load it, for classification models).
    notes = []
    if only_classifier_heads(cfg.get("modules_to_save")):
        notes.append(f"vLLM: modules_to_save={list(cfg['modules_to_save'])} are classification heads: vLLM >= 0.31 "
                     "loads them, for a classification model only; vLLM <= 0.30 refuses any modules_to_save")
    if verdict.mis_scaled:
        notes.append("vLLM >= 0.32 reads rank_pattern/alpha_pattern per module like PEFT; "
                     "`fimlora export --for vllm` gives an adapter every vLLM version serves alike")
    return notes


def _llamacpp_refusals(cfg: dict, ranks: Mapping[str, int]) -> list[str]:
    saved = cfg.get("modules_to_save") or []
    reasons = _dora(cfg, ": the converter stops at lora_magnitude_vector")
    if saved:
        reasons.append(f"modules_to_save={list(saved)} (whole modules in the adapter; the converter stops at "
                       "their tensors)")
    return reasons + _lora_bias(cfg) + _base_changing(cfg)


def _sglang_refusals(cfg: dict, ranks: Mapping[str, int]) -> list[str]:
    r = config_rank_alpha(cfg)[0]
    other = sorted({m for m in ranks.values() if m != r})
    mixed = [f"modules of rank {other} other than the config's r={r}: every module is loaded at r"] if other else []
    return _dora(cfg) + _base_changing(cfg) + mixed


# ----------------------------------------------------------------------------- the registry

ENGINES: dict[str, Engine] = {
    # PEFT: s_m = alpha_m / r_m (alpha_m / sqrt(r_m) with use_rslora), alpha_m and r_m from alpha_pattern /
    # rank_pattern (first matching key), else lora_alpha and r. The reference every other engine is judged by.
    "peft": Engine(
        name="PEFT", version="0.21.2", scales=_peft_scales, refuses=_refuses_nothing, export_for="peft",
        source="peft/tuners/lora/model.py: LoraModel._create_and_replace (r_m, alpha_m by get_pattern_key); "
               "peft/tuners/lora/layer.py: LoraLayer.update_layer (scaling = lora_alpha / r, / sqrt(r) with "
               "use_rslora)",
    ),
    # vLLM <= 0.31: one s = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora) for every module;
    # rank_pattern/alpha_pattern are not read. vLLM >= 0.32 resolves both patterns per module like PEFT. It refuses
    # DoRA, LoRA bias, base-changing inits, a rank above its largest --max-lora-rank and modules_to_save (<= 0.30:
    # any; >= 0.31: other than classifier/score). A classifier/score head alone is not counted as a refusal (0.31
    # and later load it, for classification models); a note says so.
    "vllm": Engine(
        name="vLLM <= 0.31", version="0.31", scales=lambda cfg, ranks: _one_scale(cfg, ranks, reads_rslora=True),
        refuses=_vllm_refusals, export_for="vllm", notes=_vllm_notes,
        source="vllm/lora/peft_helper.py: PEFTHelper.__post_init__ (<= 0.31 scale), PEFTHelper._validate_features "
               "(refusals); >= 0.32: PEFTHelper.get_rank_and_scaling, used by LoRALayerWeights.from_config in "
               "vllm/lora/lora_weights.py",
    ),
    # llama.cpp (and Ollama, LM Studio, which embed it): the converter writes one adapter.lora.alpha = lora_alpha and
    # reads neither alpha_pattern nor use_rslora; at run time each tensor gets s_m = alpha / r_m with r_m its own
    # rank (alpha 0 means scale 1). The converter stops on any tensor other than lora_A/lora_B (a DoRA magnitude,
    # a modules_to_save head, a LoRA bias).
    "llama.cpp": Engine(
        name="llama.cpp (Ollama, LM Studio)", version="as vendored in llama-cpp-python 0.3.36",
        scales=_own_rank_scales, refuses=_llamacpp_refusals, export_for="llama.cpp",
        after_merge="llama.cpp's convert_hf_to_gguf.py on DIR",
        source="convert_lora_to_gguf.py (adapter.lora.alpha); src/llama-adapter.h: "
               "llama_adapter_lora_weight::get_scale",
    ),
    # SGLang 0.5.23: one s = lora_alpha / r for every module, use_rslora and both patterns not read; every module is
    # copied into a buffer slice of the config's r (equal shapes asserted), so a module of another rank fails to
    # load, and mixed ranks are served only as a merged model. DoRA is refused.
    "sglang": Engine(
        name="SGLang 0.5.23", version="0.5.23", scales=lambda cfg, ranks: _one_scale(cfg, ranks, reads_rslora=False),
        refuses=_sglang_refusals, export_for="merged",
        source="sglang/srt/lora/lora.py: LoRAAdapter.__init__ (scale); mem_pool.py: "
               "LoRAMemoryPool.load_lora_weight_to_buffer (rank); LoRAManager.validate_new_adapter (DoRA)",
    ),
}
# Engines whose scale rule served_scales knows.
SERVE_ENGINES = tuple(ENGINES)


def served_scales(cfg: dict, ranks: Mapping[str, int], engine: str) -> dict[str, float]:
    """Scale each engine multiplies module m's B_m A_m x by, for the adapter config ``cfg``.

    ``ranks``: module -> r_m, the rank of its tensors (A (r_m, d_in), B (d_out, r_m)). With alpha = lora_alpha,
    r = the config's r and alpha_m, r'_m from the patterns (:func:`fimlora.adapter_files.module_rank_alpha`):

    * ``peft``:      s_m = alpha_m / r'_m, or alpha_m / sqrt(r'_m) with use_rslora (``lora_scaling``).
    * ``vllm``:      s = alpha / r, or alpha / sqrt(r) with use_rslora, for every module (vLLM <= 0.31).
    * ``llama.cpp``: s_m = alpha / r_m with the tensor's own rank; use_rslora and alpha_pattern are not read,
      and alpha = 0 means s_m = 1 (``get_scale``).
    * ``sglang``:    s = alpha / r for every module; use_rslora is not read (SGLang 0.5.23).
    """
    check_choice("engine", engine, SERVE_ENGINES)
    return ENGINES[engine].scales(cfg, ranks)


def engine_refusals(cfg: dict, ranks: Mapping[str, int], engine: str) -> list[str]:
    """Why ``engine`` will not load the adapter at all (each reason names the field and value); [] if it loads."""
    check_choice("engine", engine, SERVE_ENGINES)
    return ENGINES[engine].refuses(cfg, ranks)


def serving_verdict(cfg: dict, ranks: Mapping[str, int], engine: str) -> ServingVerdict:
    """How ``engine`` serves the adapter: its refusals and every module whose scale differs from PEFT's."""
    peft = served_scales(cfg, ranks, "peft")
    served = served_scales(cfg, ranks, engine)
    mis = {n: (served[n], peft[n]) for n in ranks
           if abs(served[n] - peft[n]) > SCALE_RTOL * max(abs(peft[n]), abs(served[n]))}
    return ServingVerdict(engine, engine_refusals(cfg, ranks, engine), mis)
