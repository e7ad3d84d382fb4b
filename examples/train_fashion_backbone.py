"""Train the small pretrained backbone that the Fashion-MNIST demo ships with.

A CIFAR ResNet-20 on 1x28x28 Fashion-MNIST (all 60k training images), SGD + Nesterov with a one-cycle
schedule. Writes the weights as safetensors plus a JSON record of how they were made and how well they do.

    python examples/train_fashion_backbone.py --epochs 4    # with pteenet installed (pip install -e .)
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader

from pteenet.backbones.cifar_resnet import cifar_resnet
from pteenet.backbones.specs import Preprocess
from pteenet.data import DataConfig, load_splits, make_loader

MEAN, STD, INPUT_SIZE = (0.2860,), (0.3530,), (1, 28, 28)
console = Console()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None, help="dataset root (default ~/.cache/pteenet/data)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--out", default="examples/assets/fashion_resnet20.safetensors")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def evaluate(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / total


def train_epoch(model: nn.Module, loader: DataLoader, opt: torch.optim.Optimizer,
                sched: torch.optim.lr_scheduler.LRScheduler, epoch: int, epochs: int) -> tuple[float, float]:
    model.train()
    loss_sum = correct = seen = 0.0
    columns = (TextColumn(f"epoch {epoch}/{epochs}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("train", total=len(loader), stats="")
        for x, y in loader:
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            progress.update(task, advance=1, stats=f"loss {loss_sum / seen:.3f} acc {correct / seen:.3f}")
    return loss_sum / seen, correct / seen


def save_atomic(model: nn.Module, out: Path, record: dict) -> None:
    """Write to temporary names first so that an interrupted run never leaves a half-written file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, out)
    meta = out.with_suffix(".json")
    tmp_meta = meta.with_name(meta.name + ".tmp")
    tmp_meta.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp_meta, meta)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    pre = Preprocess(INPUT_SIZE, MEAN, STD)
    # No calibration split here: the backbone sees all 60k training images, as a published model would.
    cfg = DataConfig(spec="fashion-mnist", data_dir=args.data_dir, val_split=0.0, seed=args.seed, crop_padding=2)
    splits = load_splits(cfg, pre, num_classes=10)
    train_loader = make_loader(splits.train, args.batch_size, shuffle=True, seed=args.seed, drop_last=True)
    test_loader = make_loader(splits.test, 512, shuffle=False)

    model = cifar_resnet("cifar-resnet20", num_classes=10, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, epochs=args.epochs,
                                                steps_per_epoch=len(train_loader), pct_start=0.25)
    start = time.time()
    for epoch in range(1, args.epochs + 1):
        loss, acc = train_epoch(model, train_loader, opt, sched, epoch, args.epochs)
        console.print(f"epoch {epoch}: train loss {loss:.4f} acc {acc:.4f} ({time.time() - start:.0f} s so far)")
    train_seconds = time.time() - start
    test_acc = evaluate(model, test_loader)
    console.print(f"test accuracy {test_acc:.4f} after {args.epochs} epochs in {train_seconds:.0f} s")

    record = {
        "test_accuracy": round(test_acc, 4),
        "epochs": args.epochs,
        "command": shlex.join(["python", *sys.argv]),
        "seconds": round(train_seconds, 1),
        "torch": torch.__version__,
        "mean": list(MEAN),
        "std": list(STD),
        "input_size": list(INPUT_SIZE),
    }
    out = Path(args.out)
    save_atomic(model, out, record)
    console.print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
