"""Where a batch-1 early-exit pass spends its time, at the setting ``cifar10_time.py`` chose.

For the batch-1 setting of a ``cifar10_time_summary.json`` (policy, thresholds, exits that decide),
on the first report-half test images at batch 1, 1 thread: the plain backbone, ``model.predict``
and an instrumented copy of its loop (``EarlyExitModel._predict_one``: the stages of ``run_plan``,
each computed head, each decision) take turns image by image, in every order in turn. Written:
each one's time as a ratio to the backbone's, the instrumented loop split into stages, heads and
decisions, the ``TimeProfile`` prediction for the same images, where the images left, and each
computed head timed alone twice: called repeatedly, and right after a pass of the plain backbone. This
tells what limits the batch-1 mean: the stages the samples run through, or what the exits add.

    python benchmarks/batch1_breakdown.py --model r56-default.safetensors --data /tmp/cifar \\
        [--summary benchmarks/results/cifar10_time_summary.json] [--out benchmarks/results/batch1_breakdown.json]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from cifar10_resnet import eval_data, report_half  # noqa: E402

from pteenet import load_checkpoint  # noqa: E402
from pteenet.data import load_splits  # noqa: E402
from pteenet.exits import policies as pol  # noqa: E402
from pteenet.exits import lean  # noqa: E402
from pteenet.exits.chain import Carry  # noqa: E402
from pteenet.runtime.timing import profile  # noqa: E402

PARTS = ("stages", "heads", "decisions")


def instrumented(model: Any, policy: str, ts: list[float], parts: dict[str, float]) -> Callable[[torch.Tensor], int]:
    """``_predict_one``'s loop with a clock around each part; returns the exit taken."""
    idx, stages = model.run_plan()

    def run(x: torch.Tensor) -> int:
        state: tuple[Any, ...] = (x,)
        carry = Carry()
        context = lean.context()
        for k, stage in zip(idx, stages.modules[:-1]):
            a = time.perf_counter()
            out = stage(*state)
            b = time.perf_counter()
            state = out[:-1]
            logits, conf, carry = model.step_one(k, out[-1], carry, context)  # as _predict_one runs it
            c = time.perf_counter()
            leave = model.active[k] and bool(pol.passes(policy, pol.score(policy, logits, conf), ts[k]))
            d = time.perf_counter()
            parts["stages"] += b - a
            parts["heads"] += c - b
            parts["decisions"] += d - c
            if leave:
                return k
        a = time.perf_counter()
        stages.modules[-1](*state)
        parts["stages"] += time.perf_counter() - a
        return model.num_exits
    return run


def head_times(model: Any, x: torch.Tensor, repeats: int = 50) -> dict[str, list[float]]:
    """Per computed exit, ms for its head and decision on one tap: called again and again (its
    weights stay in the CPU's caches) and right after a pass of the plain backbone (as in a run)."""
    taps, _ = model.backbone_taps(x)
    out: dict[str, list[Any]] = {"exit": [], "warm_ms": [], "after_backbone_ms": []}
    policy, ts = model.policy, model.thresholds
    tiny = torch.zeros(1, 10)
    # "add": one elementwise op on 10 numbers, timed the same two ways: what the CPU's cold state
    # after the convolutions costs any small op, whatever weights it reads.
    for k in [*model.run_plan()[0], "add"]:
        def head(k: Any = k) -> None:
            if k == "add":
                tiny.add(1.0)
                return
            z, c, _ = model.step_one(k, taps[k], Carry(), lean.context())
            bool(pol.passes(policy, pol.score(policy, z, c), ts[k]))
        warm, cold = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            head()
            warm.append(time.perf_counter() - t0)
        for _ in range(repeats):
            model.backbone(x)
            t0 = time.perf_counter()
            head()
            cold.append(time.perf_counter() - t0)
        out["exit"].append(k)
        out["warm_ms"].append(1e3 * float(np.median(warm)))
        out["after_backbone_ms"].append(1e3 * float(np.median(cold)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="unpacked CIFAR-10 JPEG folder (train/, test/)")
    ap.add_argument("--summary", type=Path, default=Path(__file__).parent / "results" / "cifar10_time_summary.json")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "batch1_breakdown.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = {"before": os.getloadavg()}
    model = load_checkpoint(args.model).model.eval()
    setting = json.loads(args.summary.read_text())["settings"]["eager_b1"]
    policy, ts = setting["policy"], list(setting["thresholds"])
    model.set_active(setting["active_exits"])
    model.set_thresholds(ts, policy)
    splits = load_splits(eval_data(argparse.Namespace(data=args.data, eval_limit=None)), model.info.preprocess,
                         model.info.num_classes)
    idx = report_half(len(splits.test), 1)[: args.images]
    images = torch.stack([splits.test[int(i)][0] for i in idx])
    prof = profile(model, images[:1], repeats=7, warmup=2)
    parts = dict.fromkeys(PARTS, 0.0)
    runs: dict[str, Callable[[torch.Tensor], Any]] = {
        "backbone": model.backbone, "predict": model.predict, "instrumented": instrumented(model, policy, ts, parts)}
    totals = dict.fromkeys(runs, 0.0)
    exits: list[int] = []
    with torch.inference_mode():
        for x in images[:8].split(1):  # warm-up
            for fn in runs.values():
                fn(x)
        # Every order of the three in turn, image by image: each run follows each other run equally
        # often (what ran before decides which weights are still in the CPU's caches).
        orders = list(itertools.permutations(runs))
        for r in range(args.repeats):
            for i, x in enumerate(images.split(1)):
                for name in orders[(r * len(images) + i) % len(orders)]:
                    t0 = time.perf_counter()
                    out = runs[name](x)
                    totals[name] += time.perf_counter() - t0
                    if name == "instrumented" and r == 0:
                        exits.append(int(out))
        heads = head_times(model, images[:1])
    bb = totals["backbone"]
    costs = prof.costs(model.computed_branches())
    doc = {"setup": {"model": str(args.model), "summary": str(args.summary), "images": args.images,
                     "repeats": args.repeats, "threads": args.threads, "torch": torch.__version__,
                     "policy": policy, "active_exits": setting["active_exits"], "run_plan_exits": model.run_plan()[0]},
           "time_ratio": {name: t / bb for name, t in totals.items()},
           "instrumented_parts_ratio": {k: v / bb for k, v in parts.items()},
           "predicted_time_ratio": float(np.mean([costs[k] for k in exits])),
           "heads": heads, "profile": prof.to_dict(),
           "exit_fractions": (np.bincount(exits, minlength=model.num_exits + 1) / len(exits)).tolist(),
           "backbone_ms": 1e3 * bb / (args.repeats * args.images)}
    load["after"] = os.getloadavg()
    doc["load_average"] = load
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({k: doc[k] for k in ("time_ratio", "instrumented_parts_ratio", "predicted_time_ratio", "heads")}, indent=1))


if __name__ == "__main__":
    main()
