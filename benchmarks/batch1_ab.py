"""What the batch-1 decision from Python floats, the lean exit step and the flat stages buy, each
measured against the code before it.

For the batch-1 setting of a ``cifar10_time.json`` (policy, thresholds, exits that decide),
four builds of the same checkpoint take turns image by image with the plain backbone (a seeded
random order for every image, 1 thread, medians of per-image times over repeats): ``current`` (flat
stages, ``exits/lean.py``'s step, ``Policy.leaves_one``'s decision), ``tensor_decision`` (the same,
deciding through the tensor score as before ``leaves_one``), ``exit_step`` (flat stages, every head
through ``exit_step``, as before the lean step) and ``nested`` (stages built as
``fx.GraphModule(root, graph)`` with nested targets, and ``exit_step``: the code before the three
changes). Each is timed at the chosen thresholds (the mean over report-half images) and with nothing
leaving (the no-exit tail), as ratios to the plain backbone in the same run. All four give the same
exits (checked).

    python benchmarks/batch1_ab.py --model r56-default.safetensors --data /tmp/cifar \\
        [--summary benchmarks/results/cifar10_time.json] [--out benchmarks/results/batch1_ab.json]
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx

sys.path.insert(0, str(Path(__file__).parent))
from common import arguments, chosen_setting, report_images  # noqa: E402

from pteenet import load_checkpoint  # noqa: E402
from pteenet.exits import policies as pol  # noqa: E402
from pteenet.exits.chain import exit_step  # noqa: E402
from pteenet.tracing import graph  # noqa: E402


def build(path: Path, setting: dict[str, Any], variant: str) -> Any:
    """The checkpoint with the setting applied, in one of the three builds."""
    flat = graph._flat_module
    if variant == "nested":  # the stages as fx builds them from the backbone's nested module paths
        graph._flat_module = lambda root, g, name: fx.GraphModule(root, g, class_name=name)  # type: ignore[assignment]
    try:
        model = load_checkpoint(path).model.eval()
    finally:
        graph._flat_module = flat  # type: ignore[assignment]
    model.set_active(setting["active_exits"])
    policy = setting["policy"]
    if variant != "current":  # the same policy deciding through its tensor score (no ``host``)
        policy = f"{policy} (tensor decision)"
        pol.POLICIES[policy] = dataclasses.replace(pol.get(setting["policy"]), name=policy, host=None)
    model.set_thresholds(setting["thresholds"], policy)
    if variant not in ("current", "tensor_decision"):  # every head through exit_step, as before exits/lean.py
        def step_one(k: int, tap: torch.Tensor, carry: Any, context: Any) -> Any:
            _, logits, conf, carry = exit_step(model.branches[k], model.ensemble, k, tap, carry)
            return logits, conf, carry
        model.step_one = step_one
    return model


def main() -> None:
    ap = arguments(__doc__, "batch1_ab.json", repeats=4, data=True, summary=True)
    ap.add_argument("--images", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    setting = chosen_setting(args.summary, "eager_b1")
    models = {v: build(args.model, setting, v) for v in ("current", "tensor_decision", "exit_step", "nested")}
    first = models["current"]
    images = list(report_images(args.data, first.info, args.images).split(1))
    never = [pol.never_exit_threshold(setting["policy"])] * first.num_exits
    runs: dict[str, Callable[[torch.Tensor], Any]] = {"backbone": first.backbone}
    for v, m in models.items():
        runs[v] = m.predict
        runs[f"{v}_no_exit"] = lambda x, m=m: m.predict(x, never)
    with torch.inference_mode():
        exits = {v: [int(m.predict(x).exit_index) for x in images] for v, m in models.items()}
        assert all(e == exits["current"] for e in exits.values()), "the builds took different exits"
        times: dict[str, list[float]] = {k: [] for k in runs}
        rng = np.random.default_rng(0)
        for x in images[:8]:  # warm-up
            for fn in runs.values():
                fn(x)
        for _ in range(args.repeats):
            for x in images:
                for name in rng.permutation(list(runs)):
                    t0 = time.perf_counter()
                    runs[name](x)
                    times[name].append(time.perf_counter() - t0)
    total = {k: float(np.sum(v)) for k, v in times.items()}
    ratio = {k: total[k] / total["backbone"] for k in runs}
    p50 = {k: statistics.median(v) / statistics.median(times["backbone"]) for k, v in times.items()}
    doc = {"setup": {"model": str(args.model), "summary": str(args.summary), "images": len(images), "repeats": args.repeats,
                     "threads": args.threads, "torch": torch.__version__, "policy": setting["policy"],
                     "active_exits": sum(setting["active_exits"])},
           "mean_time_ratio": ratio, "p50_ratio": p50, "backbone_ms_mean": 1e3 * total["backbone"] / len(times["backbone"]),
           "exit_fractions": (np.bincount(exits["current"], minlength=first.num_exits + 1) / len(images)).tolist(),
           "load_average": {"before": load_before, "after": os.getloadavg()}}
    args.out.write_text(json.dumps(doc, indent=1))
    print(json.dumps({"mean_time_ratio": ratio, "p50_ratio": p50}, indent=1))


if __name__ == "__main__":
    main()
