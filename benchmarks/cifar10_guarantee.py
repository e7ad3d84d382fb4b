"""Does ``--max-drop`` keep its promise on unseen data? Protocol B over many random splits.

From ONE exit cache of the 10,000 CIFAR-10 test images (the default ResNet-56 model of
``cifar10_resnet.py``: ``r56-default-test.npz``), each of ``--splits`` seeded random halvings
calibrates on one half and measures the chosen setting on the other. For each search mode it
records, for the ``--no-guarantee`` rule (the cheapest setting within the target on the calibration half) and the
certified one (``pteenet.sweep.certify`` at ``--confidence``): the realised drop on the unseen half
(accuracy points below the backbone; for the agreement target, disagreement with the backbone with
the calibration labels removed), its mean, median, 90th and 95th percentiles, maximum, the share
of splits above the target (on the unseen half, and on the whole 10,000 images the halves are drawn from:
the population the guarantee speaks of), the mean reduction (1 - mean cumulative cost on the unseen half:
MACs, or predicted time from a ``TimeProfile`` with ``--profile``, exit selection then priced the same way),
and how often nothing could be certified (then the backbone runs: reduction 0, drop 0).

Modes: one global threshold of one policy (max-softmax, entropy); every policy (the policy chosen
on 30% of the calibration half); exit selection of max-softmax exits (chosen on 30%); per-exit
thresholds. Exit selection and per-exit searches are slow (seconds per split on 2 cores), so they
run on fewer splits (``--select-splits``, ``--per-exit-splits``). ``bound_study`` also certifies the global max-softmax threshold with
two other valid bounds in place of the exact one, to measure which is tighter: Bonferroni over two
Clopper-Pearson bounds and Waudby-Smith-Ramdas betting (hedged capital, Ville's inequality).

    python benchmarks/cifar10_guarantee.py --cache /work/cache/bench-cifar10/r56-default-test.npz \\
        --model /work/cache/bench-cifar10/r56-default.safetensors [--splits 300] [--out benchmarks/results/cifar10_guarantee.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
from scipy import stats

from pteenet.errors import PteenetError
from pteenet.runtime.checkpoint import load_checkpoint
from pteenet.runtime.timing import TimeProfile
from pteenet.sweep import ExitCache, backbone_point, bounds, certify, evaluate, restrict, select, select_exits, sweep_global
from pteenet.sweep import search_per_exit, pareto, parse_range
from pteenet.evaluation import exit_indices
from pteenet.sweep import guarantee
from pteenet.sweep.guarantee import threshold_sequence

POLICIES = ("confidence", "max-softmax", "entropy")
GRID = parse_range("0:1:0.01")  # the CLI's default grid; --grid replaces it
MAX_TAIL: float | None = None  # exit selection's bound on the no-exit tail (--max-tail)


def old_rule(cal: ExitCache, mode: dict[str, Any], max_drop: float, model: Any) -> tuple[str, list[float], list[bool] | None] | None:
    """The --no-guarantee choice: the cheapest setting within max_drop on the calibration half."""
    bb = backbone_point(cal)
    if mode["select"]:
        sels = []
        for policy in mode["policies"]:
            try:
                sels.append(select_exits(cal, model.cost, model.chained, policy, GRID, max_drop=max_drop, max_tail=MAX_TAIL))
            except PteenetError:
                pass
        if not sels:
            return None
        s = min(sels, key=lambda s: (s.point.cost, -s.point.metric))
        return s.point.policy or "", s.point.thresholds or [], s.active
    points = [p for policy in mode["policies"] for p in sweep_global(cal, policy, GRID)]
    if mode["per_exit"]:
        for policy in mode["policies"]:
            front = pareto(sweep_global(cal, policy, GRID))
            picks = np.unique(np.linspace(0, len(front) - 1, min(8, len(front))).round().astype(int))
            points += search_per_exit(cal, policy, sorted({front[i].cost for i in picks}), GRID)
    p = select(points, bb, max_drop=max_drop)
    return None if p is None else (p.policy or "", p.thresholds or [], None)


def realised(rep: ExitCache, choice: tuple[str, list[float], list[bool] | None] | None, model: Any) -> tuple[float, float]:
    """(drop in points, MAC reduction) of a choice on the unseen half; the backbone when None."""
    if choice is None:
        return 0.0, 0.0
    policy, ts, active = choice
    view = rep if active is None else restrict(rep, active, model.cost, model.chained)
    p = evaluate(view, policy, ts)
    return 100 * (backbone_point(rep).metric - p.metric), 1 - p.cost


def summary(drops: list[float], reductions: list[float], target: float, none: int,
            whole: list[float] | None = None) -> dict[str, Any]:
    d = np.asarray(drops)
    extra = {} if whole is None else {"share_whole_above_target": float((np.asarray(whole) > target + 1e-9).mean())}
    return {"splits": len(d), "drop_mean": float(d.mean()), "drop_median": float(np.median(d)),
            "drop_p90": float(np.percentile(d, 90)), "drop_p95": float(np.percentile(d, 95)),
            "drop_max": float(d.max()), "share_above_target": float((d > target + 1e-9).mean()),
            "reduction_mean": float(np.mean(reductions)), "nothing_certified": none, **extra}


# --- the bound study: the same fixed sequence with other valid bounds of the drop -------------------

def cp_bonferroni_certifies(losses: np.ndarray, target: float, delta: float) -> bool:
    """Clopper-Pearson upper bound of P(+1) minus lower bound of P(-1), each at delta/2."""
    n, a, b = losses.size, int((losses > 0).sum()), int((losses < 0).sum())
    low_minus = 0.0 if b == 0 else float(stats.beta.ppf(delta / 2, b, n - b + 1))
    return bounds.binomial_upper(a, n, delta / 2) - low_minus <= target


def betting_certifies(losses: np.ndarray, target: float, delta: float, seed: int = 0) -> bool:
    """Waudby-Smith-Ramdas hedged capital against H0 "mean >= target" for losses in [-1, 1] rescaled
    to [0, 1], in one seeded random order; rejects when the capital ever reaches 1/delta."""
    x = (np.random.default_rng(seed).permutation(losses.astype(np.float64)) + 1) / 2
    m, n = (target + 1) / 2, x.size
    i = np.arange(1, n + 1)
    mu = (0.5 + np.concatenate([[0.0], np.cumsum(x)[:-1]])) / i  # predictable running mean and variance
    var = (0.25 + np.concatenate([[0.0], np.cumsum((x - mu) ** 2)[:-1]])) / i
    lam = np.minimum(np.sqrt(2 * math.log(1 / delta) / (n * var)), 0.5 / max(1 - m, 1e-12))
    return bool(np.max(np.cumsum(np.log1p(lam * (m - x)))) >= math.log(1 / delta))


def exact_certifies(losses: np.ndarray, target: float, delta: float) -> bool:
    counts = (int((losses > 0).sum()), int((losses < 0).sum()))
    return bounds.drop_pvalue(*counts, losses.size, target, delta) <= delta


BOUNDS: dict[str, Callable[[np.ndarray, float, float], bool]] = {
    "exact (Berger-Boos trinomial; the tool's)": exact_certifies,
    "Clopper-Pearson, Bonferroni": cp_bonferroni_certifies,
    "Waudby-Smith-Ramdas betting": betting_certifies,
}


def sequence_with(cal: ExitCache, policy: str, target: float, delta: float,
                  certifies: Callable[[np.ndarray, float, float], bool]) -> tuple[str, list[float], None] | None:
    """The fixed-sequence test over one policy's thresholds with another bound; the cheapest certified."""
    assert cal.labels is not None
    backbone_ok = (cal.preds[-1] == cal.labels).astype(np.int64)
    best = None
    for _, ts in threshold_sequence(policy, GRID, cal.num_exits):
        answer = cal.preds[exit_indices(cal, policy, ts), np.arange(cal.num_samples)]
        if not certifies(backbone_ok - (answer == cal.labels), target, delta):
            break
        best = (policy, ts, None)  # costs fall along the sequence: the last certified is the cheapest
    return best


# --- the run -----------------------------------------------------------------------------------

def modes(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Each mode's policies and search, its number of splits (exit selection and per-exit
    thresholds are slow to search: fewer splits) and its agreement targets."""
    agree, sel = args.disagreement, args.select_splits
    m = {"global max-softmax": {"policies": ["max-softmax"], "select": False, "per_exit": False, "splits": args.splits,
                                "agreement": agree},
         "exit selection max-softmax": {"policies": ["max-softmax"], "select": True, "per_exit": False, "splits": sel,
                                        "agreement": agree[-1:]},
         "global entropy": {"policies": ["entropy"], "select": False, "per_exit": False, "splits": args.splits,
                            "agreement": agree},
         "global, every policy": {"policies": list(POLICIES), "select": False, "per_exit": False,
                                  "splits": args.splits, "agreement": agree},
         "per-exit max-softmax": {"policies": ["max-softmax"], "select": False, "per_exit": True,
                                  "splits": args.per_exit_splits, "agreement": []}}
    return m


def run_mode(test: ExitCache, mode: dict[str, Any], target: float, confidence: float, splits: int, model: Any,
             labelled: bool) -> dict[str, Any]:
    n, t0 = test.num_samples, time.time()
    res: dict[str, dict[str, list[float]]] = {r: {"drop": [], "red": [], "whole": []} for r in ("old", "certified")}
    full = test if labelled else ExitCache(test.preds, test.scores, None, test.costs, test.costs_paper)
    none = {"old": 0, "certified": 0}
    bounds_seen: list[float] = []
    for s in range(splits):
        perm = np.random.default_rng(1000 + s).permutation(n)
        cal, rep = test.take(np.sort(perm[: n // 2])), test.take(np.sort(perm[n // 2:]))
        if not labelled:
            cal = ExitCache(cal.preds, cal.scores, None, cal.costs, cal.costs_paper)
            rep = ExitCache(rep.preds, rep.scores, None, rep.costs, rep.costs_paper)
        c = certify(cal, mode["policies"], GRID, target, confidence, per_exit=mode["per_exit"],
                    cost=model.cost if mode["select"] else None, chained=model.chained, max_tail=MAX_TAIL)
        cert = None if c.point is None else (c.point.policy or "", c.point.thresholds or [], c.active)
        if c.guarantee.bound is not None:
            bounds_seen.append(100 * c.guarantee.bound)
        for rule, choice in (("old", old_rule(cal, mode, target, model)), ("certified", cert)):
            none[rule] += choice is None
            drop, red = realised(rep, choice, model)
            res[rule]["drop"].append(drop)
            res[rule]["red"].append(red)
            res[rule]["whole"].append(realised(full, choice, model)[0])
    out = {rule: summary(r["drop"], r["red"], target, none[rule], r["whole"]) for rule, r in res.items()}
    out["certified"]["bound_mean"] = float(np.mean(bounds_seen)) if bounds_seen else None
    out["seconds"] = time.time() - t0
    return out


def bound_study(test: ExitCache, target: float, confidence: float, splits: int) -> dict[str, Any]:
    n, out = test.num_samples, {}
    for name, fn in BOUNDS.items():
        drops, reds, none = [], [], 0
        for s in range(splits):
            perm = np.random.default_rng(1000 + s).permutation(n)
            cal, rep = test.take(np.sort(perm[: n // 2])), test.take(np.sort(perm[n // 2:]))
            choice = sequence_with(cal, "max-softmax", target / 100, 1 - confidence, fn)
            none += choice is None
            drop, red = realised(rep, choice, None)
            drops.append(drop)
            reds.append(red)
        out[name] = summary(drops, reds, target, none)
    return out


def table(doc: dict[str, Any]) -> str:
    """The results file as the markdown table of docs/guarantee.md."""
    pricing = doc.get("setup", {}).get("pricing") or {"kind": "macs"}
    unit = "MAC" if pricing["kind"] == "macs" else f"time (predicted, batch {pricing['batch_size']})"
    rows = [f"| risk, target | mode | rule | splits | drop mean | p90 | p95 | max | above target | whole set above | {unit} reduction | none certified |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for section, label in (("accuracy_drop", "accuracy drop"), ("disagreement", "disagreement")):
        for name, r in doc.get(section, {}).items():
            for rule in ("old", "certified"):
                x = r[rule]
                rows.append(f"| {label} <= {r['target']:g} pt | {name.split(' @ ')[0]} | "
                            f"{'--no-guarantee' if rule == 'old' else 'certified'} | {x['splits']} | "
                            f"{x['drop_mean']:.2f} | {x['drop_p90']:.2f} | {x['drop_p95']:.2f} | {x['drop_max']:.2f} | "
                            f"{100 * x['share_above_target']:.1f}% | {100 * x.get('share_whole_above_target', float('nan')):.1f}% | "
                            f"{100 * x['reduction_mean']:.1f}% | {x['nothing_certified']} |")
    study = doc.get("bound_study")
    if study:
        rows += ["", f"Bound study ({study['mode']}, accuracy drop <= {study['target']:g} pt):", "",
                 f"| bound | drop mean | p95 | above target | {unit} reduction |", "|---|---|---|---|---|"]
        rows += [f"| {k} | {v['drop_mean']:.2f} | {v['drop_p95']:.2f} | {100 * v['share_above_target']:.1f}% | "
                 f"{100 * v['reduction_mean']:.1f}% |" for k, v in study.items() if isinstance(v, dict)]
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, help="exit cache of the test split (.npz)")
    ap.add_argument("--model", type=Path, help="the trained checkpoint (its cost table prices exit selection)")
    ap.add_argument("--splits", type=int, default=300)
    ap.add_argument("--select-splits", type=int, default=60, help="splits for exit selection (slow)")
    ap.add_argument("--per-exit-splits", type=int, default=30, help="splits for per-exit thresholds (slow)")
    ap.add_argument("--confidence", type=float, default=0.9)
    ap.add_argument("--max-drop", type=float, default=1.0, help="accuracy points below the backbone")
    ap.add_argument("--disagreement", type=float, nargs="*", default=[1.0, 2.85],
                    help="agreement targets: points of disagreement with the backbone, labels removed (2.85: the "
                    "paper's 97.15%% agreement; exit selection runs the last one only)")
    ap.add_argument("--only", nargs="*", help="run only these modes")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/cifar10_guarantee.json"))
    ap.add_argument("--grid", default="0:1:0.01", help="threshold grid START:STOP:STEP (the CLI's --thresholds)")
    ap.add_argument("--table", action="store_true", help="print the results file --out as a markdown table and stop")
    ap.add_argument("--profile", type=Path, help="price in predicted time: a TimeProfile JSON, or a cifar10_time.py "
                    "summary (its profile at --deploy-batch-size); default: MACs")
    ap.add_argument("--deploy-batch-size", type=int, default=1)
    ap.add_argument("--max-tail", type=float, default=None, help="exit selection: bound the no-exit tail (the CLI's 1.2)")
    ap.add_argument("--structure-share", type=float, default=guarantee.STRUCTURE_SHARE,
                    help="share of the calibration half that chooses the structure (policy, exits)")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return
    global GRID, MAX_TAIL
    GRID, MAX_TAIL = parse_range(args.grid), args.max_tail
    guarantee.STRUCTURE_SHARE = args.structure_share  # read by certify at each call
    test, model = ExitCache.load(args.cache), load_checkpoint(args.model).model
    pricing: dict[str, Any] = {"kind": "macs"}
    if args.profile:  # every cost below (the cache's, exit selection's) becomes predicted time
        raw = json.loads(args.profile.read_text())
        prof = TimeProfile.from_dict(raw["profiles"][str(args.deploy_batch_size)] if "profiles" in raw else raw)
        model = SimpleNamespace(cost=prof, chained=model.chained)
        test = restrict(test, [True] * test.num_exits, prof, model.chained)
        pricing = {"kind": "time", "batch_size": prof.batch_size, "profile": str(args.profile),
                   "profile_dict": prof.to_dict()}  # the file may change: keep what priced this run
    doc: dict[str, Any] = {
        "setup": {"cache": str(args.cache), "model": str(args.model), "samples": test.num_samples,
                  "exits": test.num_exits, "splits": args.splits, "select_splits": args.select_splits,
                  "per_exit_splits": args.per_exit_splits, "confidence": args.confidence, "pricing": pricing,
                  "max_tail": args.max_tail, "structure_share": args.structure_share,
                  "grid": args.grid, "protocol": "B: seeded random halvings (seed 1000 + i) of the test cache; "
                  "calibrate on the first half, measure on the other", "loadavg": os.getloadavg()},
        "backbone_accuracy": backbone_point(test).accuracy, "accuracy_drop": {}, "disagreement": {}}
    # The headline modes first (global max-softmax, exit selection), then the bound study, then the
    # rest: the document is rewritten after each, so an interrupted run keeps what it finished.
    steps = list(modes(args).items())
    steps.insert(2, ("bounds", None))
    for name, mode in steps:
        if args.only and name not in args.only:
            continue
        if mode is None:
            doc["bound_study"] = {"mode": "global max-softmax", "target": args.max_drop,
                                  **bound_study(test, args.max_drop, args.confidence, args.splits)}
            print("bounds", json.dumps(doc["bound_study"]), flush=True)
        else:
            doc["accuracy_drop"][name] = {"target": args.max_drop, **run_mode(test, mode, args.max_drop, args.confidence,
                                                                              mode["splits"], model, True)}
            print(name, json.dumps(doc["accuracy_drop"][name]), flush=True)
            for target in mode["agreement"]:
                key = f"{name} @ {target:g}"
                doc["disagreement"][key] = {"target": target, **run_mode(test, mode, target, args.confidence,
                                                                         mode["splits"], model, False)}
                print(key, json.dumps(doc["disagreement"][key]), flush=True)
        args.out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
