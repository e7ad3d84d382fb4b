"""Where a batch-1 early-exit pass spends its time, at the setting ``cifar10_time.py`` chose.

For the batch-1 setting of a ``cifar10_time.json`` (policy, thresholds, exits that decide),
on the first report-half test images at batch 1, 1 thread: the plain backbone, ``model.predict``
and an instrumented copy of its loop (``EarlyExitModel._predict_one``: the stages of ``run_plan``,
each computed head, each decision) take turns image by image, in every order in turn. Written:
each one's time as a ratio to the backbone's, the instrumented loop split into stages, heads and
decisions, the ``TimeProfile`` prediction for the same images, where the images left, and each
computed head timed alone twice: called repeatedly, and right after a pass of the plain backbone,
alone, with the runtime's decision (``Policy.leaves_one``: Python floats) and with the tensor
score's decision it replaced. Also: the share of the report half's decisions (every computed exit,
every image) close enough to the threshold for ``leaves_one`` to hand them to the tensor ops. This
tells what limits the batch-1 mean: the stages the samples run through, or what the exits add.

    python benchmarks/batch1_breakdown.py --model r56-default.safetensors --data /tmp/cifar \\
        [--summary benchmarks/results/cifar10_time.json] [--out benchmarks/results/batch1_breakdown.json]
"""
from __future__ import annotations

import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import arguments, chosen_setting, report_images, start  # noqa: E402

from pteenet.exits import policies as pol  # noqa: E402
from pteenet.exits import lean  # noqa: E402
from pteenet.exits.chain import Carry  # noqa: E402
from pteenet.runtime.timing import profile  # noqa: E402

PARTS = ("stages", "heads", "decisions")


def instrumented(model: Any, policy: str, ts: list[float], parts: dict[str, float]) -> Callable[[torch.Tensor], int]:
    """``_predict_one``'s loop with a clock around each part; returns the exit taken."""
    idx, stages = model.run_plan()
    rule = pol.get(policy)

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
            leave = model.active[k] and rule.leaves_one(logits, conf, ts[k])  # as _predict_one decides
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


def head_times(model: Any, x: torch.Tensor, repeats: int = 50) -> dict[str, Any]:
    """Per computed exit, ms for its head on one tap: called again and again (its weights stay in
    the CPU's caches) and right after a pass of the plain backbone (as in a run): its parts (each
    pooling kernel, the folded layers), the whole head, and the head with either decision."""
    taps, _ = model.backbone_taps(x)
    rule, ts = pol.get(model.policy), model.thresholds
    tiny = torch.zeros(1, 10)

    def head(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return model.step_one(k, taps[k], Carry(), lean.context())[:2]
    pooled = {k: model.branches[k].stem(taps[k]) for k in model.run_plan()[0]}
    folded = {k: model.branches[k].folded() for k in pooled}

    def mlp(k: int) -> torch.Tensor:  # the folded layers after the pooling, on that pooling's output
        z, f = pooled[k], folded[k]
        for op in f.body:
            z = op(z)
        return F.linear(z, f.head_w, f.head_b)
    ways: dict[str, Callable[[int], Any]] = {
        # the head's parts: its two pooling kernels (the plain ones the batch-1 plan uses) and the rest
        "avg_pool": lambda k: F.avg_pool2d(taps[k], model.branches[k].stem.windows),
        "max_pool": lambda k: F.max_pool2d(taps[k], model.branches[k].stem.windows),
        "folded_layers": mlp,
        "head": head,
        "head_and_decision": lambda k: rule.leaves_one(*head(k), ts[k]),
        "head_and_tensor_decision": lambda k: bool(rule.passes(rule.score(*head(k)), ts[k]))}
    out: dict[str, Any] = {"exit": [], "warm_ms": [], **{f"after_backbone_{w}_ms": [] for w in ways}}
    # "add": one elementwise op on 10 numbers, timed the same two ways: what the CPU's cold state
    # after the convolutions costs any small op, whatever weights it reads.
    for k in [*model.run_plan()[0], "add"]:
        def call(way: str, k: Any = k) -> None:
            if k == "add":
                tiny.add(1.0)
            else:
                ways[way](k)
        warm = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            call("head_and_decision")
            warm.append(time.perf_counter() - t0)
        out["exit"].append(k)
        out["warm_ms"].append(1e3 * float(np.median(warm)))
        for way in ways:
            cold = []
            for _ in range(repeats):
                model.backbone(x)
                t0 = time.perf_counter()
                call(way)
                cold.append(time.perf_counter() - t0)
            out[f"after_backbone_{way}_ms"].append(1e3 * float(np.median(cold)))
    return out


def handed_back(model: Any, images: torch.Tensor) -> dict[str, Any]:
    """How many of the decisions the computed exits take on ``images`` ``leaves_one`` leaves to the
    tensor ops (its float64 score within ``_margin`` of the threshold)."""
    rule, ts = pol.get(model.policy), model.thresholds
    close = total = 0
    for xb in images.split(256):
        outs = model.forward_all(xb)
        for k, c in enumerate(model.computed_branches()):
            if not c or rule.host is None:
                continue
            for z, h in zip(outs.exit_logits[k].tolist(), outs.exit_conf[k].tolist()):
                total += 1
                score, size = rule.host(z, h)
                close += abs(score - ts[k]) <= pol._margin(len(z), size)
    return {"decisions": total, "to_tensor_ops": close, "share": close / max(total, 1)}


def main() -> None:
    ap = arguments(__doc__, "batch1_breakdown.json", repeats=4, data=True, summary=True)
    ap.add_argument("--images", type=int, default=256)
    args = ap.parse_args()
    model, load = start(args)
    setting = chosen_setting(args.summary, "eager_b1")
    policy, ts = setting["policy"], list(setting["thresholds"])
    model.set_active(setting["active_exits"])
    model.set_thresholds(ts, policy)
    report = report_images(args.data, model.info)  # the whole half: ``handed_back`` reads every image
    images = report[: args.images]
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
        back = handed_back(model, report)
    bb = totals["backbone"]
    costs = prof.costs(model.computed_branches())
    doc = {"setup": {"model": str(args.model), "summary": str(args.summary), "images": args.images,
                     "repeats": args.repeats, "threads": args.threads, "torch": torch.__version__,
                     "policy": policy, "active_exits": setting["active_exits"], "run_plan_exits": model.run_plan()[0]},
           "time_ratio": {name: t / bb for name, t in totals.items()},
           "instrumented_parts_ratio": {k: v / bb for k, v in parts.items()},
           "predicted_time_ratio": float(np.mean([costs[k] for k in exits])),
           "heads": heads, "decisions_to_tensor_ops": back, "profile": prof.to_dict(),
           "exit_fractions": (np.bincount(exits, minlength=model.num_exits + 1) / len(exits)).tolist(),
           "backbone_ms": 1e3 * bb / (args.repeats * args.images)}
    load["after"] = os.getloadavg()
    doc["load_average"] = load
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({k: doc[k] for k in ("time_ratio", "instrumented_parts_ratio", "predicted_time_ratio", "heads",
                                          "decisions_to_tensor_ops")}, indent=1))


if __name__ == "__main__":
    main()
