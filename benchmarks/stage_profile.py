"""Why the wall clock does not follow the MACs: the allocator, time vs. MAC share per stage and per
branch, the traced graph against eager, and the per-exit overhead at batch 1.

    python benchmarks/stage_profile.py CHECKPOINT [--batch 256] [--threads 2] [--repeats 8]

Writes ``benchmarks/results/stage_profile.json``. Eager and traced runs are interleaved and medians
reported, so slow drifts of a shared machine hit both alike.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any, Callable

import torch

from common import arguments, start
from pteenet.bench.run import tune_allocator
from pteenet.tracing.graph import trace
from pteenet.exits.policies import never_exit_threshold


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each function, run in alternating order after one warm-up each."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()
    for i in range(repeats):
        for k in (list(fns) if i % 2 else list(reversed(fns))):
            start = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - start)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = arguments(__doc__, "stage_profile.json", repeats=8, threads=2, positional=True)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    model, load = start(args)  # the allocator is tuned half-way, on purpose
    cost = model.cost
    assert cost is not None
    size = model.info.preprocess.input_size
    gm = trace(model.backbone, size).gm
    x = torch.randn(args.batch, *size)
    whole_fns = {"eager": lambda: model.backbone(x), "traced": lambda: gm(x), "staged": lambda: model.backbone_taps(x)}
    with torch.inference_mode():
        # First with glibc's default allocator, then with the setting `pteenet bench` applies.
        whole_default = interleaved(whole_fns, args.repeats)
        allocator = tune_allocator()
        whole = interleaved(whole_fns, args.repeats)
        stage_fns, state = {}, (x,)
        for k, stage in enumerate(model.stages.modules):
            stage_fns[f"stage{k}"] = lambda s=stage, st=state: s(*st)
            out = stage(*state)
            state = out[:-1] if k < model.num_exits else state
        taps, _ = model.backbone_taps(x)
        branch_fns = {f"branch{k}": lambda b=b, t=t: b(t) for k, (b, t) in enumerate(zip(model.branches, taps))}
        parts = interleaved({**stage_fns, **branch_fns}, args.repeats)
        one = x[:1]
        model.set_thresholds(never_exit_threshold("max-softmax"), "max-softmax")
        batch1 = interleaved({"backbone": lambda: model.backbone(one), "all_exits": lambda: model.forward_all(one),
                              "early_exit_no_exit_taken": lambda: model.predict(one)}, 50 * args.repeats)
    prefixes = [e.prefix_macs for e in cost.exits] + [cost.backbone_macs]
    stage_macs = [b - a for a, b in zip([0] + prefixes[:-1], prefixes)]
    total_stage_ms = sum(parts[f"stage{k}"] for k in range(len(stage_macs)))
    doc = {
        "checkpoint": str(args.model), "batch": args.batch, "threads": args.threads, "torch": torch.__version__,
        "whole_backbone_ms_default_allocator": whole_default,
        "traced_over_eager_default_allocator": whole_default["traced"] / whole_default["eager"],
        "allocator": allocator, "whole_backbone_ms": whole, "traced_over_eager": whole["traced"] / whole["eager"],
        "stages": [{"stage": k, "mac_share": m / cost.backbone_macs, "time_share": parts[f"stage{k}"] / total_stage_ms}
                   for k, m in enumerate(stage_macs)],
        "branches": [{"exit": e.name, "mac_share": e.branch_macs / cost.backbone_macs,
                      "time_share": parts[f"branch{k}"] / total_stage_ms} for k, e in enumerate(cost.exits)],
        "batch1_ms": batch1,
        "batch1_ratios": {"all_exits": batch1["all_exits"] / batch1["backbone"],
                          "early_exit_no_exit_taken": batch1["early_exit_no_exit_taken"] / batch1["backbone"],
                          "mac_all_exits": cost.final_cost},
        "load_average": {**load, "after": os.getloadavg()},
    }
    args.out.write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
