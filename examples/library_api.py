"""The demo's pipeline through the library API instead of the CLI (attach, train, sweep, export).

    python examples/library_api.py [--out runs/library] [--epochs 2] [--limit 5000]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pteenet
from pteenet.data import DataConfig, DataRequest
from pteenet.export import ExportConfig, export
from pteenet.loss import LossConfig
from pteenet.sweep import SweepConfig, sweep_threshold
from pteenet.train import TrainConfig, train_branches

ASSETS = Path(__file__).parent / "assets"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("runs/library"))
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--limit", type=int, default=5000, help="training images (the calibration split is kept whole)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    model = pteenet.attach(pteenet.AttachConfig(
        "cifar-resnet20", weights=str(ASSETS / "fashion_resnet20.safetensors"), input_size=(1, 28, 28),
        mean=(0.2860,), std=(0.3530,), at=["layer1.2", "layer2.2"], branch="conv1"))  # as in demo.sh
    pteenet.save_checkpoint(args.out / "attached.safetensors", model)

    data = DataConfig("fashion-mnist", limit=args.limit, augment=False)
    train_branches(args.out / "attached.safetensors", args.out / "trained.safetensors", data,
                   TrainConfig(epochs=args.epochs, lr=2e-3, cache_features=True, loss=LossConfig(lam=0.9)))

    doc = sweep_threshold(args.out / "trained.safetensors", DataRequest(),
                          SweepConfig(outdir=str(args.out / "sweep"), max_drop=1.0,
                                      write=str(args.out / "tuned.safetensors")))
    export(args.out / "tuned.safetensors", ExportConfig(args.out / "export", force=True))

    tuned = pteenet.load(str(args.out / "export" / "model.safetensors"))
    chosen = doc["chosen"]
    print(f"chosen on calibration: {chosen['policy']} T={chosen['threshold']} -> cost {chosen['cost']:.3f}; "
          f"exported model has {tuned.num_exits} exits, thresholds {tuned.thresholds}")


if __name__ == "__main__":
    main()
