"""Fit the recommended-learning-rate rules' constants on the fair protocol's choices, and judge them.

    python benchmarks/fit_lr_rule.py --fit configs/fair_encoder.yaml --judge configs/fair_encoder_sst2.yaml \
        --results results/fair_encoder --out docs/lr_rule_fit.json --write

Constants are per model family (``fimlora.lr.model_family``: a causal LM or not; ``lr_rule.json`` holds one per rule
and family): every cell of a fit must be of one family, and ``--write`` writes that family's constants only.

For every decided cell (task, method, rank) of the ``--fit`` config (``fimlora.bench.lr_protocol``: each method's
learning rate chosen on validation data) the cell's adapter is prepared exactly as its runs trained it (first
seed; ``fimlora.bench.sweep.prepare_run``) and each rule's statistic is measured on it
(``fimlora.lr.compute_lr_recommendation``: lambda_max of the LoRA Hessian, or the range test's rate). A rule's
constant is the geometric mean over the fit cells of what each cell needs: c_cell = lr*_cell /
learning_rate_from_statistic(rule, statistic, 1), so the constant is the one formula's only free number.

How well a rule predicts is judged two ways, both in log10 of the learning rate (one grid step is log10 3.16 = 0.5):

* leave-one-out over the fit cells (each cell predicted with the constant fitted on the others), against the
  rule-free baseline "always the geometric mean of the other cells' chosen rates";
* on the ``--judge`` config's cells (another task, never used in the fit): the predicted rate against the chosen one.

The rule with the smaller leave-one-out error is reported as kept; ``--set-default`` also makes it ``default_rule``
(one for every family: it is FimConfig's default). ``--methods`` restricts the cells (fit and judge).
``--judge-only`` skips the fit and judges the shipped constants (``lr_rule.json``, each cell's family's) on
``--judge``'s cells:

    python benchmarks/fit_lr_rule.py --judge-only --judge configs/fair_decoder.yaml --methods lora fim \
        --rules hessian --results results/fair_decoder --out docs/lr_rule_judge_decoder.json
 ``--write`` writes both constants into
``src/fimlora/lr_rule.json``; training at the recommendation is then a harness run (``lr_rule:`` in a config), and
``docs/results.md`` compares its test accuracy with the grid's best.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RULES = ("hessian", "range")


def cell_statistics(cfg, results_dir: Path, rules=RULES, methods=None) -> list[dict]:
    """One record per decided cell of ``cfg`` (of ``methods`` only, when given): its chosen rate and curve, and each
    rule's statistic and cost."""
    from fimlora.bench.config import RunSpec
    from fimlora.bench.lr_protocol import choices_by_cell
    from fimlora.bench.results import load_results
    from fimlora.bench.sweep import prepare_run
    from fimlora.lr import compute_lr_recommendation

    runs = [r for r in load_results(results_dir) if r["experiment"] == cfg.name]
    records = []
    for cell, choice in sorted(choices_by_cell(runs).items(), key=lambda kv: str(kv[0])):
        if choice is None:
            continue
        _, task, method, r, variant = cell
        if methods is not None and method not in methods:
            continue
        run = RunSpec(task, method, r, cfg.seeds[0], variant, choice.learning_rate)
        t = time.perf_counter()
        prepared = prepare_run(cfg, run)
        record = {"task": task, "method": method, "r": r, "variant": dict(variant), "model": cfg.model,
                  "chosen_lr": choice.learning_rate, "curve": {str(k): v for k, v in choice.curve.items()},
                  "prepare_seconds": time.perf_counter() - t, "rules": {}}
        for rule in rules:
            rec = compute_lr_recommendation(prepared.model, prepared.calibration_batches(), rule=rule, seed=run.seed)
            record["rules"][rule] = {"statistic": rec.statistic, "passes": rec.passes, "seconds": rec.seconds}
            record["family"] = rec.family
        print(f"{task} {method} r={r}: chosen {choice.learning_rate:g}; "
              + ", ".join(f"{k} {v['statistic']:.4g}" for k, v in record["rules"].items()), file=sys.stderr)
        records.append(record)
        del prepared
    return records


def needed_constant(rule: str, statistic: float, lr: float) -> float:
    """The constant that makes ``rule`` recommend ``lr`` from ``statistic`` (the formula is linear in it)."""
    from fimlora.lr import learning_rate_from_statistic

    return lr / learning_rate_from_statistic(rule, statistic, 1.0)


def geometric_mean(values: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


def fit(records: list[dict], rule: str) -> dict:
    """The rule's constant over ``records`` and its leave-one-out log10 errors, beside the rule-free baseline's."""
    from fimlora.lr import learning_rate_from_statistic

    needs = [needed_constant(rule, rec["rules"][rule]["statistic"], rec["chosen_lr"]) for rec in records]
    constant = geometric_mean(needs)
    loo, baseline = [], []
    for i, rec in enumerate(records):
        others = [n for j, n in enumerate(needs) if j != i]
        other_lrs = [x["chosen_lr"] for j, x in enumerate(records) if j != i]
        if not others:
            continue
        predicted = learning_rate_from_statistic(rule, rec["rules"][rule]["statistic"], geometric_mean(others))
        loo.append(math.log10(predicted / rec["chosen_lr"]))
        baseline.append(math.log10(geometric_mean(other_lrs) / rec["chosen_lr"]))
    return {"constant": constant, "loo_log10_errors": loo, "loo_mean_abs": _mean_abs(loo),
            "baseline_loo_log10_errors": baseline, "baseline_mean_abs": _mean_abs(baseline),
            "within_one_grid_step": sum(abs(e) <= 0.5 + 1e-9 for e in loo), "cells": len(loo)}


def _mean_abs(errors: list[float]) -> float | None:
    return statistics.fmean(abs(e) for e in errors) if errors else None


def family_of(records: list[dict], what: str) -> str:
    """The one model family of ``records`` (a constant is fitted and judged within one family)."""
    families = sorted({rec["family"] for rec in records})
    if len(families) != 1:
        raise SystemExit(f"{what}: the cells must be of one model family (lr_rule.json holds a constant per family), "
                         f"got {families}")
    return families[0]


def judge(records: list[dict], rule: str, constant: float) -> list[dict]:
    """Each judged cell's recommendation with ``constant`` (its family's), against the rate its grid chose."""
    from fimlora.lr import learning_rate_from_statistic

    out = []
    for rec in records:
        lr = learning_rate_from_statistic(rule, rec["rules"][rule]["statistic"], constant)
        out.append({"task": rec["task"], "method": rec["method"], "r": rec["r"], "recommended_lr": lr,
                    "chosen_lr": rec["chosen_lr"], "log10_error": math.log10(lr / rec["chosen_lr"])})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fit", help="the lr_grid config whose cells fit the constants")
    parser.add_argument("--judge", help="an lr_grid config on other tasks, never used in the fit")
    parser.add_argument("--results", required=True, help="the results folder of both configs")
    parser.add_argument("--out", required=True, help="where the fit's JSON record goes")
    parser.add_argument("--write", action="store_true", help="write the constants into src/fimlora/lr_rule.json")
    parser.add_argument("--judge-only", action="store_true",
                        help="no fit: judge lr_rule.json's constants on --judge's cells")
    parser.add_argument("--methods", nargs="+", help="fit and judge only these methods' cells")
    parser.add_argument("--set-default", action="store_true",
                        help="with --write, also make the kept rule lr_rule.json's default_rule")
    parser.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES), help="the rules to measure")
    args = parser.parse_args(argv)
    if args.set_default and not args.write:
        parser.error("--set-default needs --write")
    if args.judge_only:
        if not args.judge or args.fit or args.write:
            parser.error("--judge-only needs --judge, and takes neither --fit nor --write")
        return judge_shipped(args)
    if not args.fit:
        parser.error("--fit is required (or --judge-only)")

    from fimlora.bench.config import load_config
    from fimlora.config import LR_RULE_FILE
    from fimlora.io import atomic_write_text, package_versions

    fit_cfg = load_config(args.fit)
    fit_records = cell_statistics(fit_cfg, Path(args.results), methods=args.methods)
    if len(fit_records) < 2:
        raise SystemExit(f"fit: {args.fit} has {len(fit_records)} decided cell(s) in {args.results}; need 2 or more")
    family = family_of(fit_records, "fit")
    fits = {rule: fit(fit_records, rule) for rule in RULES}
    best = min(RULES, key=lambda rule: fits[rule]["loo_mean_abs"])
    out = {"fit_config": args.fit, "family": family, "fit_cells": fit_records, "fits": fits, "kept": best,
           "versions": package_versions(), "date": time.strftime("%Y-%m-%d")}
    if args.judge:
        judge_cfg = load_config(args.judge)
        judge_records = cell_statistics(judge_cfg, Path(args.results), methods=args.methods)
        if family_of(judge_records, "judge") != family:
            raise SystemExit(f"judge: {args.judge}'s cells are not {family} models like the fit's")
        out.update(judge_config=args.judge, judge_cells=judge_records,
                   judged={rule: judge(judge_records, rule, fits[rule]["constant"]) for rule in RULES})
    atomic_write_text(Path(args.out), json.dumps(out, indent=2) + "\n")
    for rule in RULES:
        f = fits[rule]
        print(f"{rule}: constant {f['constant']:.4g}; leave-one-out mean |log10 error| {f['loo_mean_abs']:.3f} "
              f"({f['within_one_grid_step']}/{f['cells']} within one grid step); rule-free baseline "
              f"{f['baseline_mean_abs']:.3f}")
    print(f"kept: {best} ({family} models)")
    if args.write:
        table = json.loads(LR_RULE_FILE.read_text(encoding="utf-8"))
        tasks = ", ".join(sorted({r["task"] for r in fit_records}))
        where = f"{fit_cfg.name} ({fit_cfg.model}; {len(fit_records)} cells: {tasks})"
        for rule in RULES:
            # A judgement's warning stays with the family until someone judges the new constant and edits it.
            kept_warning = table["rules"][rule][family].get("warning")
            table["rules"][rule][family] = {"constant": float(f"{fits[rule]['constant']:.4g}"), "fitted_on": where,
                                            "script": "benchmarks/fit_lr_rule.py",
                                            **({"warning": kept_warning} if kept_warning else {})}
        if args.set_default:
            table["default_rule"] = best
        atomic_write_text(LR_RULE_FILE, json.dumps(table, indent=2) + "\n")
        print(f"wrote {LR_RULE_FILE}")
    return 0


def judge_shipped(args) -> int:
    """``--judge-only``: the shipped constants' recommendations on ``--judge``'s cells (each cell's family's
    constant), against the chosen rates."""
    from fimlora.bench.config import load_config
    from fimlora.config import lr_rule_entry
    from fimlora.io import atomic_write_text, package_versions

    cfg = load_config(args.judge)
    records = cell_statistics(cfg, Path(args.results), args.rules, args.methods)
    if not records:
        raise SystemExit(f"judge: {args.judge} has no decided cell in {args.results}")
    family = family_of(records, "judge")
    rules = [rule for rule in args.rules if lr_rule_entry(rule, family)["constant"] is not None]
    if not rules:
        raise SystemExit(f"judge: none of {args.rules} has a fitted {family} constant in lr_rule.json")
    judged = {rule: judge(records, rule, lr_rule_entry(rule, family)["constant"]) for rule in rules}
    out = {"judge_config": args.judge, "family": family,
           "constants": {rule: lr_rule_entry(rule, family) for rule in rules},
           "judge_cells": records, "judged": judged, "versions": package_versions(), "date": time.strftime("%Y-%m-%d")}
    atomic_write_text(Path(args.out), json.dumps(out, indent=2) + "\n")
    for rule in rules:
        for j in judged[rule]:
            print(f"{rule}: {j['task']} {j['method']} r={j['r']}: recommended {j['recommended_lr']:.3g}, chosen "
                  f"{j['chosen_lr']:g} (log10 error {j['log10_error']:+.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
