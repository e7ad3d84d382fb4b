"""Where the early-exit model's time goes, head by head, against the backbone.

For a trained checkpoint: the backbone's time at batch 256 and 1, every head on its tap (all exits
computed, as the sweep does) at both batch sizes, the heads' pooling alone with PyTorch's adaptive
kernels and with ``GridPool``'s equal-window path, and the heads' share of the MACs. Medians of
``--repeats`` timed runs after warm-up, ``--threads`` threads, glibc allocator tuned (as ``pteenet
bench``). Writes ``benchmarks/results/head_cost.json``.

    python benchmarks/head_cost.py CHECKPOINT [--threads 2] [--repeats 7]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

import pteenet
from pteenet.bench import tune_allocator


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def adaptive_pools(model: pteenet.EarlyExitModel, taps: list[torch.Tensor]) -> None:
    for b, t in zip(model.branches, taps):
        size = b.stem.avg.output_size
        F.adaptive_avg_pool2d(t, size), F.adaptive_max_pool2d(t, size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "head_cost.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    allocator = tune_allocator()
    model = pteenet.load(args.checkpoint)
    assert model.cost is not None
    doc: dict[str, Any] = {"checkpoint": args.checkpoint, "threads": args.threads, "repeats": args.repeats,
                           "allocator": allocator, "branch": model.branch_config.to_dict(),
                           "exits": model.num_exits, "ensemble": model.ensemble is not None,
                           "heads_mac_share": sum(e.branch_macs for e in model.cost.exits) / model.cost.backbone_macs}
    with torch.no_grad():
        for bs in (256, 1):
            x = torch.randn(bs, *model.info.preprocess.input_size, generator=torch.Generator().manual_seed(0))
            taps, final = model.backbone_taps(x)
            row = {"backbone_ms": median_ms(lambda: model.backbone(x), args.repeats),
                   "all_heads_ms": median_ms(lambda: model.branch_outputs(taps, final), args.repeats),
                   "stems_ms": median_ms(lambda: [b.stem(t) for b, t in zip(model.branches, taps)], args.repeats)}
            if model.branch_config.cacheable_stem:
                row["stems_adaptive_kernels_ms"] = median_ms(lambda: adaptive_pools(model, taps), args.repeats)
            row["per_head_ms"] = row["all_heads_ms"] / model.num_exits
            row["heads_time_share"] = row["all_heads_ms"] / row["backbone_ms"]
            doc[f"batch_{bs}"] = row
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
