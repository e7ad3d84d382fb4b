"""What compiling the stages would buy at batch 256: each stage with and without its exit's pooling,
eager and compiled with ``torch.compile`` (inductor, CPU), beside the plain backbone both ways.

For the batch-256 setting of a ``cifar10_time.json`` (the exits that decide), on one batch of
report-half test images, 1 thread, glibc's allocator tuned: every stage of ``run_plan`` timed four
ways in turns (rounds of all calls, medians): eager stage; eager stage then the exit's pooled
features (``GridPool``, what a head reads first); the stage compiled alone; the stage and the pooling
compiled as one function (inductor may fuse the pooling into the pass that writes the map); and the
whole backbone eager and compiled. Written: ms per call, the pooling's share each way, the compile
seconds and how far the compiled pooled features are from eager's (compiled kernels round
differently, so a compiled runtime would not match the sweep's eager simulation to the bit).
Nothing in pteenet compiles; this measures whether a compiled runtime would be worth building.

    python benchmarks/compiled_stages.py --model r56-default.safetensors --data /tmp/cifar \\
        [--summary benchmarks/results/cifar10_time.json] [--out benchmarks/results/compiled_stages.json]
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import arguments, chosen_setting, report_images, start  # noqa: E402



def rounds(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median ms of each call, the calls taking turns (one warm-up round first)."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    for r in range(repeats + 1):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            if r:
                times[name].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = arguments(__doc__, "compiled_stages.json", repeats=7, data=True, summary=True)
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()
    model, load = start(args, allocator=True)
    setting = chosen_setting(args.summary, "eager_b256")
    model.set_active(setting["active_exits"])
    x = report_images(args.data, model.info, args.batch_size)
    exits, stages = model.run_plan()
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        t0 = time.perf_counter()
        backbone_c = torch.compile(model.backbone, dynamic=False)
        backbone_c(x)
        whole = {"compile_s": time.perf_counter() - t0,
                 **rounds({"eager_ms": lambda: model.backbone(x), "compiled_ms": lambda: backbone_c(x)}, args.repeats)}
        state: tuple[Any, ...] = (x,)
        for k, stage in zip(exits, stages.modules[:-1]):
            stem = model.branches[k].stem
            inputs = state

            def with_pool(*s: Any, stage: Any = stage, stem: Any = stem) -> tuple[Any, torch.Tensor]:
                out = stage(*s)
                return out, stem(out[-1])
            t0 = time.perf_counter()
            stage_c = torch.compile(stage, dynamic=False)
            with_pool_c = torch.compile(with_pool, dynamic=False)
            stage_c(*inputs)
            fused = with_pool_c(*inputs)[1]
            compile_s = time.perf_counter() - t0
            ms = rounds({"eager_stage_ms": lambda: stage(*inputs), "eager_stage_and_pool_ms": lambda: with_pool(*inputs),
                         "compiled_stage_ms": lambda: stage_c(*inputs),
                         "compiled_stage_and_pool_ms": lambda: with_pool_c(*inputs)}, args.repeats)
            out = stage(*inputs)
            rows.append({"exit": k, "tap_shape": list(out[-1].shape), "compile_s": compile_s, **ms,
                         "pooled_max_abs_diff": float((stem(out[-1]) - fused).abs().max())})
            state = out[:-1]
    doc = {"setup": {"model": str(args.model), "summary": str(args.summary), "batch_size": args.batch_size,
                     "repeats": args.repeats, "threads": args.threads, "torch": torch.__version__,
                     "exits": exits},
           "backbone": whole, "stages": rows,
           "sum": {key: sum(r[key] for r in rows) for key in ("eager_stage_ms", "eager_stage_and_pool_ms",
                                                              "compiled_stage_ms", "compiled_stage_and_pool_ms")}}
    load["after"] = os.getloadavg()
    doc["load_average"] = load
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({"backbone": whole, "sum": doc["sum"]}, indent=1))


if __name__ == "__main__":
    main()
