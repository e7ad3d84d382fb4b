"""EENet's learned scheduler against max-softmax at a certified 1-point drop, protocol B.

From ONE exit cache of the 10,000 CIFAR-10 test images of the default ResNet-56 model
(``cifar10_resnet.py``'s ``r56-default.safetensors``), rebuilt here with each exit's logits (the
scheduler reads the class probabilities, which ``r56-default-test.npz`` does not keep), each of
``--splits`` seeded random halvings (seed 1000 + i, as ``cifar10_guarantee.py``) calibrates on one
half and measures on the other. On each calibration half:

- eenet: ``pteenet.sweep.eenet.certify_eenet`` (fitted on 30% of the half, a budget sequence from the
  most conservative down certified on the other 70% by Learn-then-Test at ``--confidence``);
- max-softmax: ``pteenet.sweep.certify`` of its global threshold on the whole half (what
  ``sweep-threshold --policy max-softmax --max-drop 1`` does);
- max-softmax-70 (``--rows``): the same, certified on the 70% of the half that certifies eenet, the
  other 30% unused: how much of the gap between the two is the samples eenet spends on fitting.

Reported per policy, on the unseen halves: the share of halvings over the target, the mean drop, the
mean MAC reduction (1 - mean cumulative cost), and the share of the agreement oracle's saving
captured (reduction / the reduction of sending each sample out at the first exit that agrees with
the backbone, on the same half). Costs are MACs.

    python benchmarks/cifar10_eenet.py --model /work/cache/bench-cifar10/r56-default.safetensors \\
        --cache /tmp/eenet-work/r56-default-test-logits.npz [--splits 300]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from pteenet.data import DataConfig, load_splits
from pteenet.runtime.checkpoint import load_checkpoint
from pteenet.sweep import ExitCache, backbone_point, build_cache, certify, evaluate, oracle_point, parse_range
from pteenet.sweep import eenet as ee
from pteenet.sweep import guarantee

GRID = parse_range("0:1:0.01")


def test_cache(model_path: Path, cache_path: Path, data: Path) -> ExitCache:
    """The test split's exit cache with logits, built once and kept at ``cache_path``."""
    if cache_path.exists():
        return ExitCache.load(cache_path)
    model = load_checkpoint(model_path).model
    cfg = DataConfig(spec=f"imagefolder:{data}", augment=False, calibration_split=0.1, seed=0)  # cifar10_resnet.eval_data
    splits = load_splits(cfg, model.info.preprocess, model.info.num_classes)
    cache = build_cache(model, splits.test, batch_size=256, logits=True)
    cache.save(cache_path)
    return cache


def agreement_oracle_cost(cache: ExitCache) -> float:
    """Mean cost when each sample leaves at the first exit agreeing with the backbone."""
    return oracle_point(ExitCache(cache.preds, {}, None, cache.costs, cache.costs_paper)).cost  # no labels: vs the backbone


def halving(test: ExitCache, s: int) -> tuple[ExitCache, ExitCache]:
    n = test.num_samples
    perm = np.random.default_rng(1000 + s).permutation(n)
    return test.take(np.sort(perm[: n // 2])), test.take(np.sort(perm[n // 2:]))


def certify_70(cal: ExitCache, target: float, confidence: float) -> Any:
    """max-softmax certified on the samples ``certify_eenet`` certifies on (its seeded 70%)."""
    n = cal.num_samples
    perm = np.random.default_rng(guarantee.SPLIT_SEED).permutation(n)
    return certify(cal.take(np.sort(perm[int(round(guarantee.STRUCTURE_SHARE * n)):])), ["max-softmax"], GRID, target, confidence)


BUDGETS = ee.BUDGETS  # --budgets: the length of eenet's certified budget sequence
ROWS = {"eenet": lambda cal, t, c: ee.certify_eenet(cal, t, c, count=BUDGETS),
        "max-softmax": lambda cal, t, c: certify(cal, ["max-softmax"], GRID, t, c),
        "max-softmax-70": certify_70}


def realised_point(name: str, result: Any, rep: ExitCache) -> Any:
    if name == "eenet":
        return None if result.setting is None else ee.evaluate(rep, result.setting)
    return None if result.point is None else evaluate(rep, "max-softmax", result.point.thresholds or [])


def run(test: ExitCache, splits: int, target: float, confidence: float, out: Path, setup: dict[str, Any],
        names: list[str]) -> dict[str, Any]:
    rows: dict[str, dict[str, list[float]]] = {p: {"drop": [], "red": [], "oracle": [], "seconds": []} for p in names}
    none = {p: 0 for p in rows}
    doc: dict[str, Any] = {"setup": setup}
    for s in range(splits):
        cal, rep = halving(test, s)
        bb = backbone_point(rep)
        oracle_saving = 1 - agreement_oracle_cost(rep)
        for name in names:
            t0 = time.time()
            result = ROWS[name](cal, target, confidence)
            secs = time.time() - t0
            point = realised_point(name, result, rep)
            none[name] += point is None
            drop, red = (0.0, 0.0) if point is None else (100 * (bb.metric - point.metric), 1 - point.cost)
            r = rows[name]
            r["drop"].append(drop)
            r["red"].append(red)
            r["oracle"].append(red / oracle_saving if oracle_saving > 0 else 0.0)
            r["seconds"].append(secs)
        if (s + 1) % 10 == 0 or s + 1 == splits:
            doc["results"] = {name: summary(r, target, none[name]) for name, r in rows.items()}
            doc["setup"]["splits_done"] = s + 1
            doc["setup"]["loadavg_end"] = os.getloadavg()
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(doc, indent=1) + "\n")
            print(s + 1, json.dumps(doc["results"]), flush=True)
    return doc


def summary(r: dict[str, list[float]], target: float, none: int) -> dict[str, Any]:
    d = np.asarray(r["drop"])
    return {"splits": len(d), "share_over": float((d > target + 1e-9).mean()), "drop_mean": float(d.mean()),
            "drop_p90": float(np.percentile(d, 90)), "drop_max": float(d.max()),
            "reduction_mean": float(np.mean(r["red"])), "oracle_share": float(np.mean(r["oracle"])),
            "nothing_certified": none, "seconds_mean": float(np.mean(r["seconds"]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--cache", type=Path, required=True, help="the test cache with logits (built here if missing)")
    ap.add_argument("--data", type=Path, default=Path("/work/cache/cifar10"))
    ap.add_argument("--splits", type=int, default=300)
    ap.add_argument("--confidence", type=float, default=0.9)
    ap.add_argument("--max-drop", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/cifar10_eenet.json"))
    ap.add_argument("--rows", nargs="*", default=["eenet", "max-softmax"], choices=list(ROWS))
    ap.add_argument("--budgets", type=int, default=ee.BUDGETS, help="budgets in eenet's certified sequence")
    args = ap.parse_args()
    global BUDGETS
    BUDGETS = args.budgets
    t0 = time.time()
    test = test_cache(args.model, args.cache, args.data)
    setup = {"model": str(args.model), "samples": test.num_samples, "exits": test.num_exits, "splits": args.splits,
             "confidence": args.confidence, "max_drop": args.max_drop, "pricing": "macs",
             "backbone_accuracy": backbone_point(test).accuracy, "cache_seconds": time.time() - t0,
             "protocol": "B: seeded random halvings (seed 1000 + i) of the test cache; calibrate on the first half, "
                         "measure on the other", "budgets": args.budgets, "structure_share": 0.3,
             "loadavg_start": os.getloadavg()}
    run(test, args.splits, args.max_drop, args.confidence, args.out, setup, args.rows)


if __name__ == "__main__":
    main()
