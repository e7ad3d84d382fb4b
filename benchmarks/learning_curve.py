"""How much training data the exits need: MAC reduction at <= 1 point on CIFAR-10 against the
number of training images the branches see (issue 18, item 3).

For each size, ``cifar10_resnet.py`` runs one configuration (``r56-default``: the defaults on the
fine-tuned ResNet-56, or ``r20-default``) with ``--train-limit SIZE``; the calibration split (10% of
train) and the test split are the same for every size, so only the training images change. Each
run's protocol-B point (one global threshold chosen on one half of test, reported on the other;
``cifar10_resnet.best_b``) is collected, one line a size, into ``results/learning_curve{TAG}.json``
with the setup and the load average.

    python benchmarks/learning_curve.py --data DIR --backbones DIR [--config r56-default]
        [--sizes 1000 2000 5000 10000 20000 45000] [--epochs 20] [--tag ""]

On 2 CPU cores the full curve on ResNet-56 takes many hours (the backbone pass over 45,000 images
alone is about an hour); ``--config r20-default`` with small ``--sizes`` and ``--epochs`` is a
cheaper look, and the results file records which was run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from cifar10_resnet import best_b  # noqa: E402  (the benchmark's own reading of its results)


def one_size(size: int, args: argparse.Namespace) -> dict[str, Any]:
    tag = f"-lc{size}{args.tag}"
    cmd = [sys.executable, str(HERE / "cifar10_resnet.py"), "--data", str(args.data), "--backbones", str(args.backbones),
           "--only", args.config, "--train-limit", str(size), "--epochs", str(args.epochs), "--tag", tag,
           "--out", str(args.work / "runs"), "--work", str(args.work / f"work{size}"), "--threads", str(args.threads)]
    load_before, t0 = os.getloadavg(), time.perf_counter()
    subprocess.run(cmd, check=True)
    doc = json.loads((args.work / "runs" / f"cifar10_resnet{tag}.json").read_text())
    run = next(r for r in doc["configs"] if r["name"] == args.config)
    b = best_b(run)
    return {"train_images": size, "epochs": args.epochs, "seconds": time.perf_counter() - t0,
            "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "mac_reduction_at_1pt": None if b is None else b[1]["test_cost_reduction"],
            "drop_points": None if b is None else b[1]["test_drop_points"],
            "with_exit_selection": None if b is None else b[0] == "drop1_select"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="unpacked cifar10-jpeg-q75 folder (train/, test/)")
    ap.add_argument("--backbones", type=Path, required=True, help="folder with resnet*_cifar10jpeg.safetensors")
    ap.add_argument("--config", default="r56-default", help="a configuration of cifar10_resnet.py's grid")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 5000, 10000, 20000, 45000])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache/pteenet/learning-curve")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    result = args.out / f"learning_curve{args.tag}.json"
    doc = {"setup": {k: str(v) for k, v in vars(args).items()}, "protocol": "B (cifar10_resnet.best_b)", "rows": []}
    for size in args.sizes:
        doc["rows"].append(one_size(size, args))
        result.write_text(json.dumps(doc, indent=1))  # one line a size, kept as each finishes
        row = doc["rows"][-1]
        print(f"{size:>6} images: MAC reduction {row['mac_reduction_at_1pt']} at drop {row['drop_points']} pt")


if __name__ == "__main__":
    main()
