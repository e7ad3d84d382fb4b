"""Where the early-exit model's time goes, branch by branch, against the backbone.

For a trained checkpoint: the backbone's time at batch 256 and 1, every branch on its tap (all exits
computed, as the sweep does) at both batch sizes, in the inference form (``pteenet/exits/fold.py``) and
as trained, the branches' pooling alone with PyTorch's adaptive kernels and with each of ``GridPool``'s
equal-window plans, the branches' share of the MACs, and the runtime's row compaction of the first
tap two ways (boolean mask, index_select). The price of exact pooling: per tap shape, every plan
(all give the same bits) against summing whole rows first (``rows_first``: fastest for large
windows, but it rounds averages differently, so it is not a plan); ``exact_pooling_cost_ms`` is
what the fastest exact plan costs over the fastest of all, summed over the exits. Medians of
``--repeats`` runs timed round-robin after warm-up, ``--threads`` threads, glibc allocator tuned (as
``pteenet bench``); the load average is recorded. Writes ``benchmarks/results/branch_cost.json``.

    python benchmarks/branch_cost.py CHECKPOINT [--threads 2] [--repeats 7]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

import pteenet
from pteenet.exits import branches, fold
from pteenet.bench.run import tune_allocator
from pteenet.exits.branches import POOL_PLANS


def interleaved_ms(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median ms of each function, timed round-robin so that other load on the machine hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def adaptive_pools(model: pteenet.EarlyExitModel, taps: list[torch.Tensor]) -> None:
    for b, t in zip(model.branches, taps):
        size = b.stem.avg.output_size
        F.adaptive_avg_pool2d(t, size), F.adaptive_max_pool2d(t, size)


def planned_pools(model: pteenet.EarlyExitModel, taps: list[torch.Tensor], plan: str) -> None:
    for b, t in zip(model.branches, taps):
        if b.stem.windows is not None and not b.stem.whole:
            POOL_PLANS[plan](t, b.stem.windows)


def rows_first(x: torch.Tensor, k: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the window's rows over whole image rows, then the columns: not a plan (other rounding)."""
    (kh, kw), (b, c, h, w) = k, x.shape
    rows = x.reshape(b, c, h // kh, kh, w)
    s = rows.sum(3).reshape(b, c, h // kh, w // kw, kw).sum(4) / (kh * kw)
    return s, rows.amax(3).reshape(b, c, h // kh, w // kw, kw).amax(4)


def pooling_by_shape(model: pteenet.EarlyExitModel, taps: list[torch.Tensor], repeats: int) -> dict[str, Any]:
    """Per tap shape: each plan's and rows_first's ms summed over the exits of that shape, and the
    exact-pooling cost (fastest plan minus fastest of all, summed over the shapes)."""
    groups: dict[tuple[Any, ...], list[torch.Tensor]] = {}
    for b, t in zip(model.branches, taps):
        if isinstance(b.stem, branches.GridPool) and b.stem.windows is not None and not b.stem.whole:
            groups.setdefault((tuple(t.shape[1:]), b.stem.windows), []).append(t)
    out: dict[str, Any] = {"shapes": {}}
    cost = 0.0
    for (shape, win), ts in groups.items():
        fns = {name: (lambda fn=fn: [fn(t, win) for t in ts]) for name, fn in {**POOL_PLANS, "rows_first": rows_first}.items()}
        ms = interleaved_ms(fns, repeats)
        exact = min(v for k, v in ms.items() if k in POOL_PLANS)
        cost += exact - min(exact, ms["rows_first"])
        out["shapes"][f"{shape} window {win} x{len(ts)}"] = ms
    out["exact_pooling_cost_ms"] = cost
    return out


def trained_layers(model: pteenet.EarlyExitModel, taps: list[torch.Tensor], final: torch.Tensor) -> None:
    """The branches as trained (BatchNorm run, two head matmuls), pooling as before the timed plans."""
    with fold.unfolded(), branches.pool_plan("nchw"):
        model.branch_outputs(taps, final)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "branch_cost.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    allocator = tune_allocator()
    model = pteenet.load(args.checkpoint)
    assert model.cost is not None
    doc: dict[str, Any] = {"checkpoint": args.checkpoint, "threads": args.threads, "repeats": args.repeats,
                           "loadavg_start": os.getloadavg(), "cpu_count": os.cpu_count(),
                           "allocator": allocator, "branch": model.branch_config.to_dict(),
                           "exits": model.num_exits, "ensemble": model.ensemble is not None,
                           "heads_mac_share": sum(e.branch_macs for e in model.cost.exits) / model.cost.backbone_macs}
    with torch.no_grad():
        for bs in (256, 1):
            x = torch.randn(bs, *model.info.preprocess.input_size, generator=torch.Generator().manual_seed(0))
            taps, final = model.backbone_taps(x)
            fns: dict[str, Callable[[], Any]] = {
                "backbone_ms": lambda: model.backbone(x),
                "all_heads_ms": lambda: model.branch_outputs(taps, final),
                "all_heads_trained_layers_ms": lambda: trained_layers(model, taps, final),
                "stems_ms": lambda: [b.stem(t) for b, t in zip(model.branches, taps)]}
            if model.branch_config.cacheable_stem:
                fns["stems_adaptive_kernels_ms"] = lambda: adaptive_pools(model, taps)
                if bs >= 16:
                    for plan in POOL_PLANS:
                        fns[f"stems_plan_{plan}_ms"] = lambda plan=plan: planned_pools(model, taps, plan)
            row: dict[str, Any] = interleaved_ms(fns, args.repeats)
            if bs >= 16 and model.branch_config.cacheable_stem:
                row["plans_chosen"] = sorted(set(branches.chosen_plans().values()))
                row["pooling_by_shape"] = pooling_by_shape(model, taps, args.repeats)
                row["exact_pooling_cost_share_of_backbone"] = (row["pooling_by_shape"]["exact_pooling_cost_ms"]
                                                               / row["backbone_ms"])
            if bs >= 16:
                # The runtime's row compaction when 5% of the rows leave at the first exit: gathering
                # the first stage's output with a boolean mask against index_select (model.py).
                state = taps[0]
                keep = torch.rand(bs, generator=torch.Generator().manual_seed(1)) > 0.05
                idx = keep.nonzero().squeeze(1)
                row.update(interleaved_ms({"compact_first_tap_boolean_mask_ms": lambda: state[keep],
                                           "compact_first_tap_index_select_ms": lambda: state.index_select(0, idx)},
                                          args.repeats))
            row["per_head_ms"] = row["all_heads_ms"] / model.num_exits
            row["heads_time_share"] = row["all_heads_ms"] / row["backbone_ms"]
            doc[f"batch_{bs}"] = row
    doc["loadavg_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
