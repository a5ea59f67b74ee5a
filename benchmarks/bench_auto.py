"""Calibration that stops when the rank map is settled, against N = 8 and against EVA's own stopping rule.

    .venv/bin/python benchmarks/bench_auto.py                          # 9 min at load 2-4, 19 at 4-7 (2 cores)
    .venv/bin/python benchmarks/bench_auto.py --smoke --out /tmp/b.md  # about a minute; used by the tests

Per setup (the experiment suites' own model, data, batch size and LoRA config, r = 8) and seed:

1. How the rank map converges with N. One calibration of N = 32 batches keeps every batch's unit scores U
   (``FisherResult.unit_scores``, batches x modules); the map at N is the allocator on the column means of U's
   first N rows, which is exactly what a calibration of N batches gives (a batch's scores do not depend on
   the batches after it), at 1/8 of the cost of recalibrating for every N. Each N's map is compared with the
   N = 32 map: the share of modules within one rank, and the L1 distance of the rank vectors as a share of
   the budget. N = 32 is itself an estimate, so these agreements are a floor on the agreement with the
   limit.
2. The stop rules replayed on the same U: after each batch k >= 2, ``fimlora.api.stable_enough`` (the very
   function ``n_batches="auto"`` calls) on U[:k], for ``auto_rule="exact"`` (every module's rank exact in
   90% of 200 resamples, for 90% of the modules) and ``"within_one"`` (in 90% of the resamples, 90% of the
   modules within one rank of the map); also ``"within_one"`` with examples as units
   (``estimator="per_example"``, calibrated separately on the first batches), compared with the batch
   estimator's N = 32 map.
3. Timed on the same calibration batches, each prepared as the sweep prepares it
   (fimlora.bench.methods.prepare_method): FIM-LoRA with N = 8, FIM-LoRA with ``n_batches="auto"``
   (the library default rule), and PEFT's EVA (rho 2) with its own rule (it replays the batches until its SVD
   components converge; forward passes counted on the model). Times are ratios within one setup and seed.

Accuracy after training with "auto" is in docs/results.md (the *_beyond experiments); this script trains
nothing.

The section is written between marker lines into --out (docs/benchmarks.md) before its "## GPU" section;
bench_calibration.py keeps it when it regenerates the other sections.
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT), str(HERE)]

from sections import section_script_main, wrap  # noqa: E402

NAME = "bench_auto.py"
# (label, config, task label or None for the config's mixture, seeds)
SETUPS = {
    "full": [("MiniLM / SST-2", "configs/small_encoder.yaml", "sst2", [42, 1337, 2024]),
             ("MiniLM / TREC-6", "configs/small_encoder.yaml", "trec6", [42, 1337, 2024]),
             # One SmolLM2 seed: its 32-batch calibration and EVA take ~10 of the run's minutes on a shared core.
             ("SmolLM2 / commonsense mixture", "configs/small_decoder.yaml", None, [42])],
    "smoke": [("MiniLM (1 layer) / SST-2", "configs/small_encoder.yaml", "sst2", [42])],
}
RANK = 8
# The smoke run shrinks the setup: one layer, a small training split (6 batches of 16).
SMOKE_OVERRIDES = {"n_layers": 1, "data": {"max_train": 96, "max_test": 16, "data_seed": 0}}
METHODS = (("FIM-LoRA, N = 8", "fim", {}), ("FIM-LoRA, auto", "fim", {"n_batches": "auto"}), ("EVA", "eva", None))
REFERENCE_N = {"full": 32, "smoke": 6}  # the smoke split has only 6 batches
PREFIX_NS = (1, 2, 3, 4, 6, 8, 16, 32)
PER_EXAMPLE_BATCHES = 4  # auto with examples as units is expected to stop within these (issue 23)
RULES = ("exact", "within_one")
# Targets of issue 23.
TARGET_BATCHES, TARGET_WITHIN_ONE, TARGET_EVA_RATIO = 4, 0.9, 20


def _unit_scores(spec, base, batches, estimator: str, n_batches: int) -> dict:
    """Calibrate ``n_batches`` on the uniform adapter the sweep would build; U, the allocator and the budget."""
    import torch

    from fimlora.api import _allocator, _bounds
    from fimlora.bench.methods import _uniform_lora
    from fimlora.config import FimConfig
    from fimlora.fisher import compute_fisher

    torch.manual_seed(spec.seed)  # LoRA's A, on which dL/dB depends, is drawn as prepare_method draws it
    model = _uniform_lora(spec, base)
    cfg = FimConfig(**{**spec.fim, "n_batches": n_batches, "estimator": estimator, "seed": spec.seed,
                       "progress": False})
    start = time.perf_counter()
    fisher = compute_fisher(model, batches(), cfg)
    seconds = time.perf_counter() - start
    bounds = _bounds(model, cfg)
    return {"u": fisher.unit_scores, "allocate": _allocator(bounds), "budget": bounds.budget, "config": cfg,
            "seconds": seconds, "batches": fisher.n_batches}


def _compare(ranks: list[int], reference: list[int], budget: int) -> dict:
    """Share of modules within one rank of ``reference``, share exactly equal, L1 distance / budget."""
    d = [abs(a - b) for a, b in zip(ranks, reference)]
    return {"within_one": sum(x <= 1 for x in d) / len(d), "exact": sum(x == 0 for x in d) / len(d),
            "l1_share": sum(d) / budget}


def _replay(run: dict, rule: str, rows_per_batch: int, max_k: int) -> tuple[int | None, list[int]]:
    """The first k >= 2 batches after which ``stable_enough`` with ``rule`` stops (None: not within max_k), and
    the map of those k batches (of max_k when it never stops)."""
    from dataclasses import replace

    from fimlora.api import stable_enough

    cfg = replace(run["config"], n_batches="auto", auto_rule=rule)
    u, allocate = run["u"], run["allocate"]
    for k in range(2, max_k + 1):
        if stable_enough(u[: k * rows_per_batch], allocate, cfg) is not None:
            return k, allocate(u[: k * rows_per_batch].mean(dim=0).tolist())
    return None, allocate(u[: max_k * rows_per_batch].mean(dim=0).tolist())


def converge_setup(cfg, train_task, spec, settings, batches, seed: int, n_ref: int) -> dict:
    """Sections 1 and 2: prefix maps of one N = n_ref calibration, and the stop rules replayed on it."""
    from fimlora.app.builders import build_base_model
    from fimlora.bench.sweep import causal_lm_dtype

    def base():
        return build_base_model(cfg.model, train_task, cfg.n_layers, seed, causal_lm_dtype(settings.precision))

    run = _unit_scores(spec, base(), batches, "batch", n_ref)
    if run["batches"] != n_ref:
        raise RuntimeError(f"the calibration loader gave {run['batches']} batches, need {n_ref}")
    u, allocate, budget = run["u"], run["allocate"], run["budget"]
    reference = allocate(u.mean(dim=0).tolist())
    # str keys: what the JSON file gives back
    prefix = {str(n): _compare(allocate(u[:n].mean(dim=0).tolist()), reference, budget)
              for n in PREFIX_NS if n <= n_ref}
    rules = {}
    for rule in RULES:
        k, ranks = _replay(run, rule, 1, n_ref)
        rules[rule] = {"batches": k, **_compare(ranks, reference, budget)}
    examples = _unit_scores(spec, base(), batches, "per_example", PER_EXAMPLE_BATCHES)
    per_batch = settings.batch_size
    if examples["u"] is None or examples["u"].shape[0] != PER_EXAMPLE_BATCHES * per_batch:
        raise RuntimeError("per_example: expected one unit per example of full batches")
    k, ranks = _replay(examples, "within_one", per_batch, PER_EXAMPLE_BATCHES)
    rules["within_one, examples"] = {"batches": k, **_compare(ranks, reference, budget)}
    return {"modules": len(reference), "budget": budget, "reference_n": n_ref, "reference_seconds": run["seconds"],
            "prefix": prefix, "rules": rules}


def measure_setup(config_path: str, task: str | None, seed: int, smoke: bool) -> dict:
    """One setup and seed: the convergence (sections 1-2) and every method's calibration as the sweep prepares
    it (section 3), all on the same batches."""
    from dataclasses import asdict, replace

    from fimlora.app.builders import build_base_model, build_calibration_loader, build_tokenizer
    from fimlora.app.train import TrainSettings
    from fimlora.bench.config import ExperimentConfig, RunSpec, load_config
    from fimlora.bench.methods import prepare_method
    from fimlora.bench.sweep import _load_tasks, _method_spec, causal_lm_dtype

    cfg = load_config(ROOT / config_path)
    if smoke:
        cfg = ExperimentConfig(**{**asdict(cfg), **SMOKE_OVERRIDES})
    label = task or cfg.task_labels[0]
    settings = TrainSettings(**{**cfg.train, "seed": seed, "progress": False})
    train_task, _ = _load_tasks(cfg, RunSpec(label, "fim", RANK, seed))
    tok = build_tokenizer(cfg.model)
    batches = functools.partial(build_calibration_loader, train_task, tok, settings.batch_size, settings.max_length,
                                seed)
    fim_spec = _method_spec(cfg, RunSpec(label, "fim", RANK, seed), train_task.kind, len(train_task.train), settings)
    convergence = converge_setup(cfg, train_task, fim_spec, settings, batches, seed,
                                 REFERENCE_N["smoke" if smoke else "full"])
    out = {}
    for name, method, fim in METHODS:
        spec = _method_spec(cfg, RunSpec(label, method, RANK, seed), train_task.kind, len(train_task.train), settings)
        if fim is not None:
            spec = replace(spec, fim={**spec.fim, **fim})
        base = build_base_model(cfg.model, train_task, cfg.n_layers, seed, causal_lm_dtype(settings.precision))
        start = time.perf_counter()
        _, info, _ = prepare_method(spec, base, batches)
        out[name] = {"seconds": time.perf_counter() - start, "calibration_seconds": info["calibration_seconds"],
                     "batches": info.get("n_batches_used"), "forward_passes": info.get("eva_forward_passes"),
                     "stop_reason": info.get("stop_reason"), "stable_share": info.get("stable_share")}
    return {"convergence": convergence, "methods": out}


def measure(size: str) -> dict:
    from fimlora.config import FimConfig
    from fimlora.io import package_versions

    rows = []
    for label, config, task, seeds in SETUPS[size]:
        for seed in seeds:
            print(f"{label}, seed {seed}", flush=True)
            rows.append({"setup": label, "config": config, "task": task, "seed": seed,
                         **measure_setup(config, task, seed, size == "smoke")})
    return {"date": time.strftime("%Y-%m-%d"), "rank": RANK, "size": size, "versions": package_versions(),
            "default_rule": FimConfig().auto_rule, "rows": rows}


def _spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}–{max(xs):.2f})"


def _pct(x: float) -> str:
    return f"{100 * x:.0f}"


def _batches(k: int | None, cap: int) -> str:
    return str(k) if k is not None else f">{cap}"


def summary(data: dict) -> dict:
    """Per rule: batches at stop (mean over seeds, then over setups; a rule that never stopped counts its cap),
    agreement with the N = 32 map (mean and min over runs), and the timed auto run's ratios to EVA."""
    setups = list(dict.fromkeys(r["setup"] for r in data["rows"]))
    out = {}
    for rule in (*RULES, "within_one, examples"):
        cap = PER_EXAMPLE_BATCHES if rule.endswith("examples") else None
        per_setup, within = [], []
        for setup in setups:
            runs = [r["convergence"] for r in data["rows"] if r["setup"] == setup]
            per_setup.append(statistics.mean(c["rules"][rule]["batches"] or cap or c["reference_n"] for c in runs))
            within += [c["rules"][rule]["within_one"] for c in runs]
        out[rule] = {"batches": statistics.mean(per_setup), "within_one_mean": statistics.mean(within),
                     "within_one_min": min(within),
                     "stopped": all(r["convergence"]["rules"][rule]["batches"] for r in data["rows"])}
    timed = [r["methods"] for r in data["rows"]]
    out["eva_over_auto_time"] = [m["EVA"]["calibration_seconds"] / m["FIM-LoRA, auto"]["calibration_seconds"]
                                 for m in timed]
    out["eva_passes_over_auto_batches"] = [m["EVA"]["forward_passes"] / m["FIM-LoRA, auto"]["batches"] for m in timed]
    out["auto_batches"] = statistics.mean(
        statistics.mean(r["methods"]["FIM-LoRA, auto"]["batches"] for r in data["rows"] if r["setup"] == s)
        for s in setups)
    return out


def render_section(data: dict, command: str, note: str) -> str:
    """Section 7 of docs/benchmarks.md from :func:`measure`'s output."""
    rows = data["rows"]
    setups = list(dict.fromkeys(r["setup"] for r in rows))
    n_ref = rows[0]["convergence"]["reference_n"]
    ns = [n for n in PREFIX_NS if n < n_ref]
    seeds = {s: [r["seed"] for r in rows if r["setup"] == s] for s in setups}
    lines = ["## 7. Calibrating until the rank map is settled (`n_batches=\"auto\"`) against N = 8 and EVA", "",
             f"Generated by `{command}` on {data['date']}; r = {data['rank']}; "
             + ", ".join(f"{k} {v}" for k, v in data["versions"].items()) + f".{' ' + note if note else ''} Seeds: "
             + "; ".join(f"{s} {', '.join(map(str, v))}" for s, v in seeds.items())
             + (" (fewer on the slowest setup, so the run fits about 20-25 minutes on 2 shared cores)."
                if len({len(v) for v in seeds.values()}) > 1 else "."), "",
             f"**How the map converges.** One calibration of N = {n_ref} batches per setup and seed keeps every "
             f"batch's unit scores (`FisherResult.unit_scores`); the map at N is the allocator on the means of "
             f"their first N rows, exactly what an N-batch calibration gives (a batch's scores do not depend on "
             f"later batches) at 1/8 of the cost of recalibrating per N. Cell: share of modules within one rank of "
             f"the N = {n_ref} map / L1 distance of the rank vectors as a share of the budget (%, mean over seeds). "
             f"N = {n_ref} is itself an estimate, so these are floors on the agreement with the limit.", "",
             "| setup | modules | " + " | ".join(f"N = {n}" for n in ns) + " |",
             "|---|---|" + "---|" * len(ns)]
    for setup in setups:
        conv = [r["convergence"] for r in rows if r["setup"] == setup]
        cells = []
        for n in ns:
            w = statistics.mean(c["prefix"][str(n)]["within_one"] for c in conv)
            l1 = statistics.mean(c["prefix"][str(n)]["l1_share"] for c in conv)
            cells.append(f"{_pct(w)} / {100 * l1:.1f}")
        lines.append(f"| {setup} | {conv[0]['modules']} | " + " | ".join(cells) + " |")
    lines += ["", "**The stop rules, replayed** on the same unit scores with `fimlora.api.stable_enough`, the "
              "function `n_batches=\"auto\"` calls after each batch from the 2nd on (200 resamples, "
              "`stable_threshold` 0.9, `auto_stable_share` 0.9): `exact`, at least 90% of the modules get their "
              "exact rank in at least 90% of the resamples (the rule before issue 23); `within_one`, in at least "
              "90% of the resamples at least 90% of the modules are within one rank of the map. "
              f"`within_one, examples`: the same rule with examples as units (`estimator=\"per_example\"`, "
              f"calibrated separately on the first {PER_EXAMPLE_BATCHES} batches), its map compared with the batch "
              f"estimator's N = {n_ref} map. Batches at stop per seed (`>k`: not stopped within k); the map where "
              f"it stopped against the N = {n_ref} map (within one rank, %; L1 / budget, %; mean over seeds; a run "
              f"that did not stop is compared at its cap, where `exact`'s map is the reference itself).", "",
              f"| rule | setup | batches at stop | within one of N = {n_ref} | L1 / budget |", "|---|---|---|---|---|"]
    for rule in (*RULES, "within_one, examples"):
        cap = PER_EXAMPLE_BATCHES if rule.endswith("examples") else n_ref
        for setup in setups:
            res = [r["convergence"]["rules"][rule] for r in rows if r["setup"] == setup]
            lines.append(f"| {rule} | {setup} | {', '.join(_batches(x['batches'], cap) for x in res)} | "
                         f"{_pct(statistics.mean(x['within_one'] for x in res))} | "
                         f"{100 * statistics.mean(x['l1_share'] for x in res):.1f} |")
    summ = summary(data)
    lines += ["", f"| rule | batches at stop, mean over setups | within one of N = {n_ref}: mean (min) |",
              "|---|---|---|"]
    for rule in (*RULES, "within_one, examples"):
        s = summ[rule]
        more = "" if s["stopped"] else " (a run that did not stop counts its cap)"
        lines.append(f"| {rule} | {s['batches']:.1f}{more} | {_pct(s['within_one_mean'])} "
                     f"({_pct(s['within_one_min'])}) |")
    lines += ["", f"**Timed** (the library default rule, `{data['default_rule']}`): batches used by FIM-LoRA with "
              "`n_batches=\"auto\"`, EVA's forward passes until its components converge (counted on the model: "
              "EVA replays its batches), and calibration seconds as ratios within one run (median, min–max). A "
              "FIM-LoRA batch is one forward and one backward pass; an EVA pass is a forward pass and an "
              "incremental SVD step. On a shared machine the seconds of two runs minutes apart can differ by 2x; "
              "passes do not.", "",
              "| setup | seeds | auto: batches used | auto: stopped because | auto / N = 8 time | "
              "EVA forward passes | EVA / N = 8 time | EVA / auto time |", "|---|---|---|---|---|---|---|---|"]
    for setup in setups:
        ms = [r["methods"] for r in rows if r["setup"] == setup]
        fixed = [m["FIM-LoRA, N = 8"]["calibration_seconds"] for m in ms]
        auto = [m["FIM-LoRA, auto"] for m in ms]
        eva = [m["EVA"] for m in ms]
        stops = sorted({a["stop_reason"].split(":")[0] for a in auto})
        lines.append(
            f"| {setup} | {len(ms)} | {', '.join(str(a['batches']) for a in auto)} | {', '.join(stops)} | "
            f"{_spread([a['calibration_seconds'] / f for a, f in zip(auto, fixed)])} | "
            f"{', '.join(str(e['forward_passes']) for e in eva)} | "
            f"{_spread([e['calibration_seconds'] / f for e, f in zip(eva, fixed)])} | "
            f"{_spread([e['calibration_seconds'] / a['calibration_seconds'] for e, a in zip(eva, auto)])} |")
    w = summ["within_one"]
    ratio = statistics.median(summ["eva_over_auto_time"])
    passes = statistics.median(summ["eva_passes_over_auto_batches"])
    lines += ["", "**Targets (issue 23)**, for `within_one` with the batch estimator (the suites' estimator):",
              f"* auto stops after at most {TARGET_BATCHES} batches on average over the setups: "
              f"{summ['auto_batches']:.1f} in the timed runs, {w['batches']:.1f} replayed: "
              + ("met." if max(summ["auto_batches"], w["batches"]) <= TARGET_BATCHES else "NOT met."),
              f"* its maps within one rank of N = {n_ref}'s for at least {_pct(TARGET_WITHIN_ONE)}% of the modules: "
              f"{_pct(w['within_one_mean'])}% on average, {_pct(w['within_one_min'])}% in the worst run: "
              + ("met." if w["within_one_min"] >= TARGET_WITHIN_ONE else
                 "met on average, not in every run." if w["within_one_mean"] >= TARGET_WITHIN_ONE else "NOT met."),
              f"* at least {TARGET_EVA_RATIO}x faster than EVA: EVA / auto time {ratio:.1f}x (median over runs, "
              f"{min(summ['eva_over_auto_time']):.1f}–{max(summ['eva_over_auto_time']):.1f}x); in passes, EVA's "
              f"forward passes / auto's batches {passes:.1f}x: "
              + ("met." if ratio >= TARGET_EVA_RATIO else f"NOT met in time ({ratio / TARGET_EVA_RATIO:.0%} of "
                 "the target)" + ("; met in passes." if passes >= TARGET_EVA_RATIO else "; not in passes either.")),
              f"* with examples as units (`estimator=\"per_example\"`), the same rule stops after "
              f"{summ['within_one, examples']['batches']:.1f} batches on average, its maps within one rank of the "
              f"batch estimator's N = {n_ref} map for {_pct(summ['within_one, examples']['within_one_mean'])}% of "
              f"the modules on average, {_pct(summ['within_one, examples']['within_one_min'])}% in the worst run.",
              "* accuracy tie with N = 8: not measured by this script (it trains nothing); "
              "`benchmarks/bench_auto_accuracy.py` measures it on MiniLM / SST-2 (section 7b, when it has run)."]
    return wrap(NAME, "\n".join(lines) + "\n")


def main(argv=None) -> int:
    return section_script_main(argv, __doc__, NAME, "auto", ROOT / "docs" / "benchmarks.md", measure,
                               render_section)


if __name__ == "__main__":
    sys.exit(main())
