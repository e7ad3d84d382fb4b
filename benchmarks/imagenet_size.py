"""A 224-pixel, 1,000-class torchvision model through the whole pipeline: what ImageNet-sized taps cost.

torchvision's ResNet-18 (or ``--arch``) with random weights (no download), synthetic 224x224 images,
the defaults of ``pteenet attach`` (a pooled head after every block, cascade) and of training with
cached features; then the sweep, an ONNX export and ``bench`` at batch 1 and 8. It records what a
user on ImageNet-sized inputs needs to know and what tests at 16x16 never exercise: the size of a
tap and of the cached (pooled) features an image, the branches' share of the MACs, and the time each
step took. Random weights mean the exits learn little; the accuracy figures are not the point.

    python benchmarks/imagenet_size.py [--arch resnet18] [--images 96] [--out benchmarks/results]

The test ``tests/test_imagenet_size.py`` runs the same pipeline on a handful of images.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import pteenet
from pteenet.bench.run import BenchConfig, bench


def run(arch: str, images: int, epochs: int, work: Path, formats: tuple[str, ...] = ("onnx",),
        batch_sizes: tuple[int, ...] = (1, 8), repeats: int = 3) -> dict[str, Any]:
    """attach -> train -> sweep -> export -> bench on synthetic 224x224 images; one record of it."""
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    model = pteenet.attach(pteenet.AttachConfig(backbone=f"torchvision:{arch}", input_size=(3, 224, 224)))
    seconds["attach"] = time.perf_counter() - t
    data = pteenet.DataConfig(spec="synthetic", limit=images, augment=False)
    t = time.perf_counter()
    history = pteenet.train_exits(model, data, pteenet.TrainConfig(epochs=epochs, batch_size=16, lr=1e-3,
                                                                   cache_features=True, device="cpu"))
    seconds["train"] = time.perf_counter() - t
    t = time.perf_counter()
    swept = pteenet.sweep_model(model, data, pteenet.SweepConfig(thresholds="0:1:0.1", max_drop=100.0,
                                                                 device="cpu", plots=False))
    seconds["sweep"] = time.perf_counter() - t
    t = time.perf_counter()
    exported = pteenet.export_model(model, pteenet.ExportConfig(output=work / "export", formats=("safetensors", *formats)))
    seconds["export"] = time.perf_counter() - t
    x = torch.rand(max(batch_sizes) * 2, 3, 224, 224)
    t = time.perf_counter()
    timing = bench(model, x, BenchConfig(batch_sizes=batch_sizes, repeats=repeats, warmup=1))
    seconds["bench"] = time.perf_counter() - t
    cost = model.cost
    with torch.no_grad():  # what a feature cache holds an image: each branch's stem output (float16)
        stems = [b.stem(torch.zeros(1, *s)).shape[1:].numel() for b, s in zip(model.branches, model.tap_shapes)]
    taps = [torch.Size(s).numel() for s in model.tap_shapes]
    return {"arch": arch, "input_size": [3, 224, 224], "num_classes": model.info.num_classes, "images": images,
            "epochs": epochs, "exits": [e.name for e in cost.exits], "backbone_macs": cost.backbone_macs,
            "branch_macs_share": sum(e.branch_macs for e in cost.exits) / cost.backbone_macs,
            "tap_shapes": [list(s) for s in model.tap_shapes],
            "tap_bytes_per_image_float16": 2 * sum(taps), "cached_bytes_per_image_float16": 2 * sum(stems),
            "final": history["final"], "chosen": swept.get("chosen"),
            "export_files": sorted(p.name for p in (work / "export").iterdir()),
            "export": {k: v for k, v in exported.items() if k in ("formats", "threshold", "policy")},
            "bench": timing, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        record = run(args.arch, args.images, args.epochs, Path(tmp))
    record["machine"] = {"cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
                         "python": platform.python_version(), "load_average_after": list(os.getloadavg())}
    path = args.out / f"imagenet_size-{args.arch}.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
