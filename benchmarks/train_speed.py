"""How close a training batch of `pteenet train-branches` gets to its floor.

The floor is what no implementation can avoid: the backbone's forward pass under no_grad plus the
branches' forward and backward. The figure of merit is

    ratio = time per training batch / time of (backbone no_grad forward + branches forward/backward)

both measured in the same run, interleaved (so a noisy neighbour hits both alike). The headline
figures use the fastest of --batches repeats (the least disturbed one, as timeit advises; a shared
2-core machine makes single timings swing by 5x); ``ratio_median`` is there as a cross-check. The training batch is ``EarlyExitModel.forward_all`` + ``BranchTrainer.step``,
exactly what the training loop runs: the loss, Adam, the cosine schedule, the NaN check and the
per-batch T = 0.5 metrics. Also reported: the data pipeline per batch (augmented synthetic images at
the backbone's input size) and a step from the --cache-features cache, which skips the backbone.

    python benchmarks/train_speed.py [--batches 3] [--batch-size 128]

``--processes 1,2`` measures something else: images per second of the real command,
``torchrun --nproc_per_node N -m pteenet train-branches``, on the synthetic set (450 training +
50 calibration images a epoch) with the machine's CPU threads split between the N processes
(``OMP_NUM_THREADS`` = threads / N). The rate is (train + calibration images) / epoch seconds, from
the command's own per-epoch record, first epoch left out (warm-up); written to
``results/train_speed-processes.json``. With ``--device cuda`` each process takes one GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from pteenet import AttachConfig, load_checkpoint, save_checkpoint
from pteenet import attach
from pteenet.runtime.checkpoint import atomic_write
from pteenet.data import DataConfig, load_splits
from pteenet.training.batches import FeatureCache, ImageSource
from pteenet.training.run import TrainConfig
from pteenet.training.step import BranchTrainer

DEFAULT_OUT = Path(__file__).parent / "results" / "train_speed.json"


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def processes(counts: list[int], args: argparse.Namespace) -> None:
    """images/s of `pteenet train-branches` under torchrun for each process count."""
    threads = args.threads or os.cpu_count() or 1
    load = os.getloadavg()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        ck = Path(tmp) / "attached.safetensors"
        save_checkpoint(ck, attach(AttachConfig(backbone=args.backbone, exits=args.exits, placement=args.placement,
                                                branch=args.branch)))
        # Interleaved repeats (1, 2, 1, 2, ...): a noisy neighbour hits every count alike.
        for n in [n for _ in range(args.batches) for n in counts]:
            out = Path(tmp) / f"out{n}.safetensors"
            out.unlink(missing_ok=True)
            env = {**os.environ, "OMP_NUM_THREADS": str(max(threads // n, 1))}
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
                   str(29500 + n), "-m", "pteenet", "train-branches", str(ck), "-o", str(out), "--data", "synthetic",
                   "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--device", args.device,
                   "--no-ensemble", "--json"]
            start = time.perf_counter()
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            wall = time.perf_counter() - start
            if done.returncode:
                raise SystemExit(f"{n} processes failed:\n{done.stderr[-2000:]}")
            doc = json.loads(done.stdout)
            meta = load_checkpoint(out).model.meta["data"]["sizes"]
            images = meta["train"] // args.batch_size * args.batch_size + meta["val"]
            secs = [r["seconds"] for r in doc["epochs"][1:]]
            runs.append({"processes": n, "threads_per_process": max(threads // n, 1), "epoch_seconds": secs,
                         "images_per_epoch": images, "wall_seconds": wall})
            print(json.dumps(runs[-1]), flush=True)
    # The fastest epoch of each count (the least disturbed, as for the per-batch figures) and the median.
    rates = {n: sorted(r["images_per_epoch"] / t for r in runs if r["processes"] == n for t in r["epoch_seconds"])
             for n in counts}
    summary = {str(n): {"images_per_second": rates[n][-1], "images_per_second_median": statistics.median(rates[n])}
               for n in counts}
    result = {"backbone": args.backbone, "exits": args.exits, "placement": args.placement, "branch": args.branch,
              "batch_size": args.batch_size, "epochs": args.epochs, "device": args.device, "threads": threads,
              "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "load_average_before": load, "load_average_after": os.getloadavg(), "summary": summary, "runs": runs}
    out = args.out if args.out != DEFAULT_OUT else DEFAULT_OUT.with_name("train_speed-processes.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="cifar-resnet56")
    ap.add_argument("--exits", type=int, default=8)
    ap.add_argument("--placement", default="fine")
    ap.add_argument("--branch", default="conv2", help="branch type (the recorded results: conv2)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--batches", type=int, default=3, help="timed repeats of each measurement")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--processes", default=None, help="e.g. 1,2: images/s of the command under torchrun instead")
    ap.add_argument("--epochs", type=int, default=4, help="with --processes: epochs a run (the first is warm-up)")
    args = ap.parse_args()
    if args.processes:
        processes([int(n) for n in args.processes.split(",")], args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    # No cascade: the recorded figures (conv2 branches) predate it.
    model = attach(AttachConfig(backbone=args.backbone, exits=args.exits, placement=args.placement, branch=args.branch,
                                cascade=False)).to(device).train()
    cfg = TrainConfig(batch_size=args.batch_size, device=args.device)
    trainer = BranchTrainer(model, cfg, device, total_steps=10_000)
    pre, k = model.info.preprocess, model.info.num_classes
    x = torch.randn(args.batch_size, *pre.input_size, device=device)
    y = torch.randint(0, k, (args.batch_size,))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def floor() -> None:
        taps, final = model.backbone_taps(x)
        out = model.branch_outputs(taps, final)
        sum(lg.sum() + c.sum() for lg, c in zip(out.exit_logits, out.exit_conf)).backward()
        model.branches.zero_grad(set_to_none=True)
        sync()

    def step() -> None:
        trainer.step(model.forward_all(x), y)
        sync()

    def backbone_only() -> None:
        model.backbone_taps(x)
        sync()

    # The --cache-features path: float16 taps held on the CPU, gathered by index, no backbone.
    taps, final = model.backbone_taps(x)
    cache = FeatureCache([t.to("cpu", torch.float16) for t in taps], final.float().cpu(), y, args.batch_size, True)
    order = torch.Generator().manual_seed(0)

    def cached_step() -> None:
        for out, yb in cache.batches(model, device, order, trainer.autocast):
            trainer.step(out, yb)
        sync()

    splits = load_splits(DataConfig(spec="synthetic", augment=True), pre, k)
    source = ImageSource(splits.train, args.batch_size, 0, 0, shuffle=True)

    def data_batch() -> None:
        # One batch of the real loader: per-image crop/flip/normalise and collation.
        loader = iter(torch.utils.data.DataLoader(source.ds, batch_size=args.batch_size, shuffle=True))
        next(loader)

    measures = {"floor": floor, "step": step, "backbone_forward": backbone_only, "cached_step": cached_step,
                "data": data_batch}
    for _ in range(args.warmup):
        for fn in measures.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(args.batches):
        for name, fn in measures.items():
            times[name].append(timed(fn))
    best = {name: min(ts) for name, ts in times.items()}
    med = {name: statistics.median(ts) for name, ts in times.items()}
    result = {
        "backbone": args.backbone, "exits": [p.name for p in model.exit_points], "batch_size": args.batch_size,
        "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "repeats": args.batches,
        "seconds_per_batch": best, "median_seconds_per_batch": med, "all_seconds": times,
        "ratio": best["step"] / best["floor"],
        "ratio_median": med["step"] / med["floor"],
        "ratio_with_data": (best["step"] + best["data"]) / best["floor"],
        "ratio_cached": best["cached_step"] / best["floor"],
        "branches_share_of_floor": 1 - best["backbone_forward"] / best["floor"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    print(json.dumps({k: v for k, v in result.items() if k != "all_seconds"}, indent=2))


if __name__ == "__main__":
    main()
