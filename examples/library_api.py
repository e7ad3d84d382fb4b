"""The demo's pipeline through the library instead of the CLI, on a model held in memory from attach
to export: nothing is read back from disk, and only the export folder (and the sweep's files) is
written. Only ``import pteenet`` names are used.

    python examples/library_api.py [--out runs/library] [--epochs 2] [--limit 5000] [--data fashion-mnist]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pteenet

ASSETS = Path(__file__).parent / "assets"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("runs/library"))
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--limit", type=int, default=5000, help="images per split")
    ap.add_argument("--data", default="fashion-mnist", help="the backbone was trained on fashion-mnist; "
                    "'synthetic' only checks that the pipeline runs")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    # As in demo.sh: the shipped Fashion-MNIST ResNet-20, a pooled MLP head after every block.
    model = pteenet.attach(pteenet.AttachConfig(
        backbone="cifar-resnet20", weights=str(ASSETS / "fashion_resnet20.safetensors"), input_size=(1, 28, 28),
        mean=(0.2860,), std=(0.3530,)))

    # Trains the branches in place and records the split in model.meta, so the sweep below tunes on
    # the held-out calibration images.
    data = pteenet.DataConfig(spec=args.data, limit=args.limit, augment=False)
    history = pteenet.train_exits(model, data, pteenet.TrainConfig(epochs=args.epochs, lr=2e-3, cache_features=True))
    print(f"trained {history['final']['epochs_done']} epochs in {history['final']['seconds']:.0f} s")

    # Chooses thresholds (and which exits decide) on the calibration split and sets them on the model.
    doc = pteenet.sweep_model(model, data, pteenet.SweepConfig(outdir=str(args.out / "sweep"), max_drop=1.0,
                                                               select_exits=True))
    chosen = doc["chosen"]
    test = chosen.get("test") or {}
    print(f"chosen on calibration: {chosen['policy']} T={chosen['threshold']} -> cost {chosen['cost']:.3f}"
          + (f"; on test: accuracy {100 * test['accuracy']:.2f}% at cost {test['cost']:.3f}" if test else ""))

    pteenet.export_model(model, pteenet.ExportConfig(output=args.out / "export", force=True))
    tuned = pteenet.load(str(args.out / "export" / "model.safetensors"))
    print(f"exported {args.out / 'export'}: {tuned.num_exits} exits, {sum(tuned.active)} deciding, "
          f"{tuned.policy} thresholds {[round(t, 3) for t in tuned.thresholds]}")


if __name__ == "__main__":
    main()
