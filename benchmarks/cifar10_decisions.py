"""Which exit decision saves most at a certified 1 point? Every decision the tool has, side by side.

For each model (an exit cache of the 10,000 CIFAR-10 test images and its checkpoint: the default
ResNet-56 of ``cifar10_resnet.py``, its cascaded and ensembled configuration, or any other model
with a cache), each of ``--splits`` seeded random halvings (the protocol of ``cifar10_guarantee.py``)
certifies each decision on one half (``--max-drop`` points, ``--confidence``) and measures it on the
other:

- ``share_over``: the share of halvings whose unseen half dropped more than the target;
- ``reduction_mean``: the mean MAC reduction there (1 - mean cumulative MACs; every exit decides);
- ``time_b1`` / ``time_b256``: the mean predicted time, as a fraction of the backbone's, with exits
  selected by that time (the certification's structure part chooses them, priced by a committed
  ``TimeProfile`` of that batch size), on ``--time-splits`` halvings (exit selection is slow);
- ``oracle_share``: the mean MAC reduction over the agreement oracle's (each sample leaves at the
  first exit that agrees with the backbone).

Decisions: one global threshold of each scored policy (max-softmax, entropy, confidence), patience
(run lengths), per-class max-softmax thresholds, and EENet's learned scheduler where the test cache
keeps each exit's logits (``cifar10_resnet.py`` and ``test_cache`` here build it so). Everything is
numpy over the cached exits: no model runs. A survivor-trained model (``train-branches --survivors``)
is one more ``--model``.

    python benchmarks/cifar10_decisions.py \\
        --model unchained=/work/cache/bench-cifar10/r56-default \\
        --profile unchained=benchmarks/results/cifar10_time.json [--splits 300] [--time-splits 10]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import numpy as np

from pteenet.exits import policies as pol
from pteenet.runtime.checkpoint import load_checkpoint
from pteenet.runtime.timing import TimeProfile, read_profile
from pteenet.sweep import ExitCache, backbone_point, certify, oracle_point, parse_range, per_class, restrict
from pteenet.sweep import eenet as ee
from pteenet.evaluation.engine import exit_indices

GRID = parse_range("0:1:0.01")  # the CLI's default grid
# A decision: (calibration half, time profile or None, chained) -> (the exits that decide or None,
# a function giving where each sample of a cache leaves), or None when nothing is certified.
Rule = Callable[[ExitCache, Any, bool], tuple[list[bool] | None, Callable[[ExitCache], np.ndarray]] | None]


def global_rule(policy: str, max_drop: float, confidence: float, select: bool = True) -> Rule:
    """One global threshold; ``select`` False: every exit decides even where the cost is time."""
    def rule(cal: ExitCache, cost: Any, chained: bool) -> Any:
        c = certify(cal, [policy], GRID, max_drop, confidence, cost=cost if select else None, chained=chained)
        if c.point is None:
            return None
        ts = c.point.thresholds or []
        return c.active, lambda cache: exit_indices(cache, policy, ts)
    return rule


def per_class_rule(max_drop: float, confidence: float) -> Rule:
    def rule(cal: ExitCache, cost: Any, chained: bool) -> Any:
        c, _ = per_class.certify_per_class(cal, ["max-softmax"], GRID, max_drop, confidence, cost=cost, chained=chained,
                                           num_classes=10)
        if c.point is None:
            return None
        table = np.asarray(c.point.class_thresholds)
        return c.active, lambda cache: per_class.exit_indices(cache, "max-softmax", table)
    return rule


def eenet_rule(max_drop: float, confidence: float) -> Rule:
    """EENet's scheduler as ``sweep-threshold --policy eenet --max-drop P`` certifies it: fitted on the
    structure share of the calibration half, a budget sequence certified on the rest; every exit decides."""
    def rule(cal: ExitCache, cost: Any, chained: bool) -> Any:
        c = ee.certify_eenet(cal, max_drop, confidence)
        if c.setting is None:
            return None
        setting = c.setting
        return None, lambda cache: ee.exit_indices(cache, setting)
    return rule


def rows(max_drop: float, confidence: float, cached: Collection[str], logits: bool) -> dict[str, Rule]:
    """Every decision the tool has: each registered policy certified with one global threshold,
    per-class thresholds, and, where the cache keeps the exits' logits, EENet's learned scheduler.
    ``--only`` runs some rows alone and the results file keeps the other rows."""
    out: dict[str, Rule] = {p: global_rule(p, max_drop, confidence) for p in pol.POLICIES if p in cached}
    out["per-class max-softmax"] = per_class_rule(max_drop, confidence)
    if logits:
        out["eenet"] = eenet_rule(max_drop, confidence)
    # What exit selection is worth where the cost is time: the same rule with every exit deciding.
    out["max-softmax, every exit decides"] = global_rule("max-softmax", max_drop, confidence, select=False)
    return out


def _view(cache: ExitCache, active: list[bool] | None, cost: Any, chained: bool) -> ExitCache:
    return cache if active is None else restrict(cache, active, cost, chained)


def halves(n: int, s: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(1000 + s).permutation(n)
    return np.sort(perm[: n // 2]), np.sort(perm[n // 2:])


def study(test: ExitCache, model: Any, profiles: dict[int, TimeProfile], decisions: dict[str, Rule],
          splits: int, time_splits: int, max_drop: float) -> dict[str, Any]:
    n, out = test.num_samples, {}
    oracle = []
    for s in range(splits):
        _, rep = halves(n, s)
        half = test.take(rep)  # the agreement oracle: labels removed, it sends each sample to the first exit agreeing
        oracle.append(1 - oracle_point(ExitCache(half.preds, half.scores, None, half.costs, half.costs_paper)).cost)
    for name, rule in decisions.items():
        t0, drops, reds, none = time.time(), [], [], 0
        for s in range(splits):
            cal_i, rep_i = halves(n, s)
            cal, rep = test.take(cal_i), test.take(rep_i)
            got = rule(cal, None, model.chained)
            none += got is None
            if got is None:
                drops.append(0.0)
                reds.append(0.0)
                continue
            exits = got[1](rep)
            answer = rep.preds[exits, np.arange(rep.num_samples)]
            drops.append(100 * (backbone_point(rep).metric - float((answer == rep.labels).mean())))
            reds.append(1 - float(rep.costs[exits].mean()))
        row = {"share_over": float((np.asarray(drops) > max_drop + 1e-9).mean()), "reduction_mean": float(np.mean(reds)),
               "oracle_share": float(np.mean(reds) / np.mean(oracle)), "drop_mean": float(np.mean(drops)),
               "drop_p90": float(np.percentile(drops, 90)), "nothing_certified": none, "splits": splits}
        for b, prof in profiles.items():
            timed, tnone = [], 0
            priced = restrict(test, [True] * test.num_exits, prof, model.chained)
            for s in range(time_splits):
                cal_i, rep_i = halves(n, s)
                got = rule(priced.take(cal_i), prof, model.chained)
                if got is None:
                    tnone += 1
                    timed.append(1.0)
                    continue
                view = _view(priced.take(rep_i), got[0], prof, model.chained)
                timed.append(float(view.costs[got[1](view)].mean()))
            row[f"time_b{b}"] = float(np.mean(timed))
            row[f"time_b{b}_nothing_certified"] = tnone
        row["time_splits"] = time_splits
        row["seconds"] = time.time() - t0
        out[name] = row
        print(name, json.dumps(row), flush=True)
    out["oracle"] = {"reduction_mean": float(np.mean(oracle))}
    return out


def features_cache(prefix: str, features: Path) -> ExitCache:
    """The exit cache of a split held in a training feature cache (``train-branches --cache-dir``:
    labels, the backbone's logits and each branch's stem output per image): only the heads run."""
    import torch

    from pteenet.sweep import ExitCacheBuilder
    from pteenet.training import feature_cache as store
    from pteenet.training.batches import Autocast

    model = load_checkpoint(f"{prefix}.safetensors").model.eval()
    key = features.stem.removeprefix("features-")
    fc = store.load(features.parent, key, batch_size=500, shuffle=False, stems=True)
    if fc is None:
        raise SystemExit(f"cannot read the feature cache {features}")
    builder = ExitCacheBuilder()
    with torch.no_grad():
        for out, y in fc.batches(model, torch.device("cpu"), torch.Generator(), Autocast(torch.device("cpu"), False)):
            builder.add_outputs(out, y)
    return builder.build_for(model)


def test_cache(prefix: str) -> ExitCache:
    """PREFIX-test.npz, or, where it is missing (the Fashion-MNIST demo model), the test split's
    exit cache built once from the checkpoint's recorded data and saved there."""
    path = Path(f"{prefix}-test.npz")
    if path.exists():
        return ExitCache.load(path)
    from pteenet.data import DataRequest, load_splits, resolve_data
    from pteenet.sweep import build_cache

    model = load_checkpoint(f"{prefix}.safetensors").model
    cfg, _ = resolve_data(DataRequest(), model.meta.get("data"))
    splits = load_splits(cfg, model.info.preprocess, model.info.num_classes)
    cache = build_cache(model, splits.test, logits=True)
    cache.save(path)
    return cache


def model_profiles(name: str, specs: list[str], num_exits: int) -> dict[int, TimeProfile]:
    """The batch-1 and batch-256 profiles given for model ``name``: ``NAME=FILE`` (a ``cifar10_time.py``
    summary, both batch sizes) or ``NAME@B=FILE`` (one batch size, e.g. a sweep's ``sweep.json``)."""
    out: dict[int, TimeProfile] = {}
    for spec in specs:
        key, path = spec.split("=", 1)
        who, _, b = key.partition("@")
        if who == name:
            for size in ([int(b)] if b else [1, 256]):
                out[size] = read_profile(path, num_exits, size)
    return out


def agreement(cache: ExitCache) -> dict[str, list[float]]:
    """Why patience saves what it saves: how often neighbouring exits agree with each other, and
    how often each exit agrees with the backbone."""
    p = cache.preds
    return {"neighbours": [float((p[k] == p[k + 1]).mean()) for k in range(cache.num_exits - 1)],
            "backbone": [float((p[k] == p[-1]).mean()) for k in range(cache.num_exits)]}


def table(doc: dict[str, Any]) -> str:
    """The results file as the markdown table of docs/how-it-works.md."""
    out = ["| model | decision | halvings | over 1 pt | MAC reduction | time b1 | time b256 | of the oracle's saving |",
           "|---|---|---|---|---|---|---|---|"]
    for cfg, m in doc["models"].items():
        for name, r in m["results"].items():
            if name == "oracle":
                continue
            t = [f"{r[k]:.3f}" if k in r else "-" for k in ("time_b1", "time_b256")]
            out.append(f"| {cfg} | {name} | {r['splits']} | {100 * r['share_over']:.1f}% | {100 * r['reduction_mean']:.1f}% | {t[0]} | "
                       f"{t[1]} | {100 * r['oracle_share']:.0f}% |")
        out.append(f"| {cfg} | agreement oracle | | | {100 * m['results']['oracle']['reduction_mean']:.1f}% | | | 100% |")
    return "\n".join(out)


def plot(doc: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    configs = list(doc["models"])
    fig = Figure(figsize=(5 + 3 * len(configs), 4))
    for i, cfg in enumerate(configs):
        res = doc["models"][cfg]["results"]
        names = [k for k in res if k != "oracle"]
        ax = fig.add_subplot(1, len(configs), i + 1)
        y = np.arange(len(names))
        ax.barh(y - 0.2, [100 * res[k]["reduction_mean"] for k in names], 0.4, label="MAC reduction (%)")
        ax.barh(y + 0.2, [100 * (1 - res[k].get("time_b1", 1.0)) for k in names], 0.4, label="time saved, batch 1 (%)")
        ax.axvline(100 * res["oracle"]["reduction_mean"], color="k", ls="--", lw=1, label="agreement oracle (MACs)")
        ax.set_yticks(y, names)
        ax.set_title(f"{cfg}: certified <= {doc['setup']['max_drop']:g} pt", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
        if i == 0:
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    FigureCanvasAgg(fig).print_png(str(path))


def save(out: Path, name: str, entry: dict[str, Any], setup: dict[str, Any], rows_only: list[str] | None,
         partial: bool) -> dict[str, Any]:
    """Write model ``name``'s entry into ``out``, keeping the other models (one model per run is fine),
    read again just before writing so that runs of other models in parallel are kept. A partial run
    (``--only`` some rows, or ``--agreement-only``) adds to the entry there. The file keeps the setup
    of the run that created it; every later run is listed under ``row_runs``."""
    if not out.exists():
        doc: dict[str, Any] = {"setup": setup, "models": {}}
    else:
        doc = json.loads(out.read_text())
        run = {k: setup[k] for k in ("splits", "time_splits", "loadavg_start")}
        doc["setup"]["row_runs"] = [*doc["setup"].get("row_runs", []), {"model": name, "rows": rows_only or "all", **run}]
    old = doc["models"].get(name)
    if partial and old is not None:
        entry = {**old, **entry, "results": {**old.get("results", {}), **entry.get("results", {})}}
    doc["models"][name] = entry
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, out)
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], metavar="NAME=PREFIX",
                    help="PREFIX.safetensors (cost table) and PREFIX-test.npz (exit cache of the test split; "
                    "built from the checkpoint's recorded data where missing)")
    ap.add_argument("--profile", action="append", default=[], metavar="NAME[@B]=FILE",
                    help="NAME=FILE: a cifar10_time.py summary (its profiles at batch 1 and 256) for that model; "
                    "NAME@B=FILE: its profile at batch B alone, e.g. a sweep.json priced at --deploy-batch-size B")
    ap.add_argument("--features", action="append", default=[], metavar="NAME=FILE",
                    help="measure that model on a split held in a training feature cache (features-KEY.safetensors, "
                    "e.g. its calibration split) instead of PREFIX-test.npz: no backbone pass")
    ap.add_argument("--splits", type=int, default=300)
    ap.add_argument("--time-splits", type=int, default=10)
    ap.add_argument("--confidence", type=float, default=0.9)
    ap.add_argument("--max-drop", type=float, default=1.0)
    ap.add_argument("--only", nargs="*", help="run only these decisions")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/cifar10_decisions.json"))
    ap.add_argument("--agreement-only", action="store_true", help="only add the exits' agreement figures to --out")
    ap.add_argument("--table", action="store_true", help="print the results file --out as a markdown table and stop")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return
    features = dict(p.split("=", 1) for p in args.features)
    setup = {"splits": args.splits, "time_splits": args.time_splits, "confidence": args.confidence, "max_drop": args.max_drop,
             "grid": "0:1:0.01", "per_class_min_samples": per_class.MIN_SAMPLES,
             "protocol": "seeded random halvings (seed 1000 + i) of the test cache; certify on the first half, measure "
             "on the other", "loadavg_start": os.getloadavg()}
    doc: dict[str, Any] = {"setup": setup, "models": {}}
    for spec in args.model:
        name, prefix = spec.split("=", 1)
        source = features.get(name)
        test = test_cache(prefix) if source is None else features_cache(prefix, Path(source))
        model = load_checkpoint(f"{prefix}.safetensors").model
        if args.agreement_only:  # add the agreement figures to a finished run
            doc = save(args.out, name, {"agreement": agreement(test)}, setup, rows_only=None, partial=True)
            continue
        profs = model_profiles(name, args.profile, test.num_exits)
        decisions = {k: v for k, v in rows(args.max_drop, args.confidence, test.scores, test.logits is not None).items()
                     if not args.only or k in args.only}
        results = study(test, model, profs, decisions, args.splits, args.time_splits, args.max_drop)
        entry = {"cache": source or f"{prefix}-test.npz", "samples": test.num_samples, "model": f"{prefix}.safetensors",
                 "chained": model.chained,
                 "training": {k: (model.meta.get("training") or {}).get(k) for k in ("epochs_done", "complete")},
                 "exits": test.num_exits,
                 "time_profile": [s.split("=", 1)[1] for s in args.profile if s.split("=", 1)[0].partition("@")[0] == name] or None,
                 "backbone_accuracy": backbone_point(test).accuracy, "results": results, "agreement": agreement(test),
                 "loadavg_end": os.getloadavg()}
        doc = save(args.out, name, entry, setup, rows_only=args.only, partial=bool(args.only))
    try:
        plot(doc, args.out.with_suffix(".png"))
    except ImportError:
        print("matplotlib is not installed: no plot")


if __name__ == "__main__":
    main()
