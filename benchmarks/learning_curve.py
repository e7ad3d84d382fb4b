"""How much training data the exits need: MAC reduction at <= 1 point on CIFAR-10 against the
number of training images the branches see.

For each size, ``cifar10_resnet.py`` runs one configuration (``r56-default``: the defaults on the
fine-tuned ResNet-56, or ``r20-default``) with ``--train-limit SIZE``; the calibration split (10% of
train) and the test split are the same for every size, so only the training images change. Each
run's protocol-B point (one global threshold chosen on one half of test, reported on the other;
``common.best_b``) is collected, one line a size, into ``results/learning_curve{TAG}.json``
with the setup and the load average.

    python benchmarks/learning_curve.py --data DIR --backbones DIR [--config r56-default]
        [--sizes 1000 2000 5000 10000 20000 45000] [--epochs auto] [--compare-epochs 10 --compare-sizes 1000 2000 5000]
        [--plain-from results/cifar10_resnet-chained.json] [--tag ""]

``--epochs auto`` (the default) is what ``train-branches`` does without ``--epochs``: with the
feature cache, 10 epochs for 45,000 images and more for smaller sets (``auto_epochs``).
``--compare-epochs N --compare-sizes ...`` adds a row at a fixed N epochs for those sizes, so the
file shows what the sized default buys. ``--plain-from`` skips re-evaluating the plain ResNets; runs
skip the wall-clock timing (``--bench-images 0``). On 2 CPU cores a size of 20,000 takes about 20
minutes; the results file records what was run.
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

from common import best_b  # noqa: E402  (cifar10_resnet.py's reading of its own results)


def row_of(run: dict[str, Any], size: int, epochs: str) -> dict[str, Any]:
    """One line of the curve from a configuration's results in ``cifar10_resnet.py``'s file."""
    b = best_b(run)
    return {"train_images": size, "epochs": epochs, "epochs_run": (run.get("training") or {}).get("config", {}).get("epochs"),
            "mac_reduction_at_1pt": None if b is None else b[1]["test_cost_reduction"],
            "drop_points": None if b is None else b[1]["test_drop_points"],
            "with_exit_selection": None if b is None else b[0] == "drop1_select"}


def from_results(spec: str, config: str) -> dict[str, Any]:
    """``SIZE=FILE``: a line from a run made earlier by ``cifar10_resnet.py`` (e.g. the full training split)."""
    size, path = spec.split("=", 1)
    doc = json.loads(Path(path).read_text())
    run = next(r for r in doc["configs"] if r["name"] == config)
    return {**row_of(run, int(size), doc["setup"]["epochs"]), "from": path, "seconds": run.get("seconds")}


def one_size(size: int, epochs: str, args: argparse.Namespace) -> dict[str, Any]:
    tag = f"-lc{size}-e{epochs}{args.tag}"
    cmd = [sys.executable, str(HERE / "cifar10_resnet.py"), "--data", str(args.data), "--backbones", str(args.backbones),
           "--only", args.config, "--train-limit", str(size), "--epochs", epochs, f"--tag={tag}",
           "--out", str(args.work / "runs"), "--work", str(args.work / f"work{size}"), "--threads", str(args.threads),
           "--bench-images", "0"] + (["--plain-from", str(args.plain_from)] if args.plain_from else [])
    load_before, t0 = os.getloadavg(), time.perf_counter()
    subprocess.run(cmd, check=True)
    doc = json.loads((args.work / "runs" / f"cifar10_resnet{tag}.json").read_text())
    run = next(r for r in doc["configs"] if r["name"] == args.config)
    return {**row_of(run, size, epochs), "seconds": time.perf_counter() - t0,
            "load_average_before": load_before, "load_average_after": os.getloadavg()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="unpacked cifar10-jpeg-q75 folder (train/, test/)")
    ap.add_argument("--backbones", type=Path, required=True, help="folder with resnet*_cifar10jpeg.safetensors")
    ap.add_argument("--config", default="r56-default", help="a configuration of cifar10_resnet.py's grid")
    ap.add_argument("--sizes", type=int, nargs="*", default=[1000, 2000, 5000, 10000, 20000, 45000])
    ap.add_argument("--epochs", default="auto", help="N, or auto (train-branches without --epochs)")
    ap.add_argument("--compare-epochs", help="also run these sizes at this fixed number of epochs")
    ap.add_argument("--compare-sizes", type=int, nargs="*", default=[])
    ap.add_argument("--from-results", nargs="*", default=[], metavar="SIZE=FILE",
                    help="lines from earlier cifar10_resnet.py results files instead of running those sizes")
    ap.add_argument("--plain-from", type=Path, help="cifar10_resnet.py results with the plain models' points")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache/pteenet/learning-curve")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    result = args.out / f"learning_curve{args.tag}.json"
    doc = {"setup": {k: str(v) for k, v in vars(args).items()}, "protocol": "B (common.best_b)", "rows": []}
    doc["rows"] += [from_results(spec, args.config) for spec in args.from_results]
    runs = [(size, args.epochs) for size in args.sizes] + [(size, args.compare_epochs) for size in args.compare_sizes]
    for size, epochs in runs:
        doc["rows"].append(one_size(size, epochs, args))
        result.write_text(json.dumps(doc, indent=1))  # one line a run, kept as each finishes
        row = doc["rows"][-1]
        print(f"{size:>6} images, {row['epochs_run']} epochs: MAC reduction {row['mac_reduction_at_1pt']} "
              f"at drop {row['drop_points']} pt", flush=True)


if __name__ == "__main__":
    main()
