"""The defaults as a new user meets them: ResNet-56 on CIFAR-10 with 10,000 training images and 3
epochs, then the sweep with no option but ``--policy all``, then the README's ``--max-drop 1``.

Every step is the CLI (``python -m pteenet``) with the README's flags; only ``--data``, ``--limit`` and
``--epochs`` are added. Recorded in ``benchmarks/results/new_user.json``:

- ``sweep_no_criterion``: what ``sweep-threshold --policy all`` shows: no exit selection (it needs a
  criterion), every branch priced in predicted time at batch 1; the cheapest point of its calibration
  curve within 1 point of the backbone (what a user reading the curve would take), uncertified;
- ``sweep_max_drop_1``: what ``sweep-threshold --max-drop 1`` chooses (exit selection on by default
  where the cost is time; certified at 0.9), measured on the test split.

    python benchmarks/new_user.py --data /work/cache/cifar10 \\
        --weights /work/shared/data/backbones/cifar10-jpeg/resnet56_cifar10jpeg.safetensors [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from common import cli

from pteenet.evaluation.engine import Point, select


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="unpacked cifar10-jpeg-q75 folder (train/, test/)")
    ap.add_argument("--weights", type=Path, required=True, help="resnet56_cifar10jpeg.safetensors")
    ap.add_argument("--limit", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache/pteenet/new-user")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results/new_user.json")
    args = ap.parse_args()
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    cli("attach", "cifar-resnet56", "--weights", str(args.weights), "-o", str(w / "attached.safetensors"))
    train = cli("train-branches", str(w / "attached.safetensors"), "-o", str(w / "trained.safetensors"),
                "--data", f"imagefolder:{args.data}", "--no-augment", "--cache-features", "--limit", str(args.limit),
                "--epochs", str(args.epochs))
    plain = cli("sweep-threshold", str(w / "trained.safetensors"), "-o", str(w / "sweep-all"), "--policy", "all")
    readme = cli("sweep-threshold", str(w / "trained.safetensors"), "-o", str(w / "sweep-max-drop-1"), "--max-drop", "1")
    # The cheapest point of the curve within 1 pt of the backbone on the calibration split, as the
    # sweep's own select() reads a curve (no guarantee: what a user reading the curve would take).
    n = plain["exits"]
    points = [Point.from_dict(p, n) for p in plain["points"]]
    backbone = Point.from_dict({**plain["backbone"], "cost_paper": 1.0, "exit_fractions": [0.0] * n + [1.0]}, n)
    chosen_point = select(points, backbone, max_drop=1.0)
    pick = None if chosen_point is None else plain["points"][points.index(chosen_point)]
    chosen = readme.get("chosen") or {}
    doc = {
        "setup": {"data": str(args.data), "weights": str(args.weights), "limit": args.limit, "epochs": args.epochs,
                  "commands": ["attach cifar-resnet56 --weights W", "train-branches --data imagefolder:DATA --no-augment "
                               f"--cache-features --limit {args.limit} --epochs {args.epochs}",
                               "sweep-threshold --policy all", "sweep-threshold --max-drop 1"],
                  "loadavg_start": load0, "loadavg_end": os.getloadavg(), "cpu_count": os.cpu_count()},
        "train_seconds": train["_seconds"],
        "sweep_no_criterion": {
            "cost_model": plain["cost_model"].get("kind"), "batch_size": plain["cost_model"].get("batch_size"),
            "exits_priced": plain["exits"], "backbone_calibration": plain["backbone"],
            "cheapest_within_1pt": None if pick is None else {k: pick[k] for k in ("policy", "threshold", "accuracy", "cost")},
            "time_saved": None if pick is None else 1 - pick["cost"], "seconds": plain["_seconds"]},
        "sweep_max_drop_1": {
            "chosen": {k: chosen.get(k) for k in ("policy", "threshold", "accuracy", "agreement", "cost", "time_cost", "mac_cost")},
            "exits_deciding": sum(chosen["active_exits"]) if chosen.get("active_exits") else None,
            "test": {k: (chosen.get("test") or {}).get(k) for k in ("accuracy", "agreement", "time_cost", "mac_cost", "backbone")},
            "guarantee": readme.get("guarantee"), "time_saved": None if not chosen else 1 - chosen["cost"],
            "nothing_pays": readme.get("nothing_pays"), "seconds": readme["_seconds"]},
    }
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({k: doc[k] for k in ("sweep_no_criterion", "sweep_max_drop_1")}, indent=1))


if __name__ == "__main__":
    main()
