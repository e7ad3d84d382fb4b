"""Where INT8 time goes in a staged early-exit program (``cifar10_int8.py --overheads``; also alone
on torchvision ResNet-50 at 224 px with random weights: time does not depend on the weights).

Measured in ONNX Runtime, one process, batch 1:
- ``call_ms``: the fixed cost of one session call (a program that passes one number through);
- ``driver``: one run of the staged program split into the session calls and the rest (the
  driver's numpy work: feeds, the ``leave`` read, bookkeeping);
- from profiles of every stage and head (``profile_onnx``, FP32 and INT8): each head's time
  (with its decision and its call) against its stage's, the no-exit tail of an exit set and each
  exit's added time, as fractions of that precision's backbone.

    python benchmarks/int8_overheads.py --resnet50 [--threads 1] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pteenet.exits.chain import computed_branches
from pteenet.export.driver import StagedModel, onnx_runner
from pteenet.runtime.onnx import ort_session
from pteenet.runtime.ort_quant import quantize_parts
from pteenet.runtime.ort_timing import profile_onnx


def call_ms(threads: int, n: int = 2000) -> float:
    """Median time of one call of a program that passes one number through."""
    from onnx import TensorProto, helper

    io_ = [helper.make_tensor_value_info(k, TensorProto.FLOAT, [1]) for k in ("a", "b")]
    graph = helper.make_graph([helper.make_node("Identity", ["a"], ["b"])], "empty", io_[:1], io_[1:])
    s = ort_session(helper.make_model(graph).SerializeToString(), threads)
    one = np.zeros(1, dtype=np.float32)
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        s.run(None, {"a": one})
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def driver_split(folder: Path, images: torch.Tensor, threads: int, thresholds: list[float] | None = None) -> dict[str, Any]:
    """Per image (batch 1): the whole run, the session calls in it, and the rest (the driver's work)."""
    spent: list[float] = []
    make = onnx_runner(threads)

    def timed_runner(path: Path, piece: dict[str, Any]) -> Any:
        call = make(path, piece)

        def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            t0 = time.perf_counter()
            out = call(feeds)
            spent.append(time.perf_counter() - t0)
            return out
        return run

    model = StagedModel(folder, timed_runner)
    total, calls, n_calls = [], [], []
    for x in images.split(1):
        model.run(x.numpy(), thresholds)  # warm
    for x in images.split(1):
        spent.clear()
        t0 = time.perf_counter()
        model.run(x.numpy(), thresholds)
        total.append(time.perf_counter() - t0)
        calls.append(sum(spent))
        n_calls.append(len(spent))
    return {"run_ms": 1e3 * statistics.median(total), "calls_ms": 1e3 * statistics.median(calls),
            "driver_ms": 1e3 * statistics.median(np.subtract(total, calls)), "calls_per_image": float(np.mean(n_calls))}


def profile_shares(prof: Any, active: list[bool]) -> dict[str, Any]:
    """From a profile: each computed head against its stage, the no-exit tail of ``active`` and each
    exit's added time, as fractions of the backbone (stage sums)."""
    total = sum(prof.stage_ms)
    heads = [(k, h) for k, h in enumerate(prof.branch_ms) if h > 0]
    return {"backbone_ms": prof.backbone_ms, "stages_ms": total,
            "head_vs_stage_median": statistics.median(h / max(prof.stage_ms[k], 1e-9) for k, h in heads) if heads else None,
            "exit_added_time_median": statistics.median(h / total for _, h in heads) if heads else None,
            "no_exit_tail": float(prof.costs(computed_branches(active, False))[-1]),
            "n_active": sum(active)}


def overheads(model: Any, setting: dict[str, Any], exits_images: torch.Tensor, quant: torch.Tensor, work: Path,
              threads: int) -> dict[str, Any]:
    """All of the above for ``model`` at the chosen ``setting`` (its exits), FP32 and INT8."""
    from pteenet.export.quantize import INT8_FOLDER, quantize_staged
    from pteenet.export.staged import export_pieces

    model.set_thresholds(setting["thresholds"], setting["policy"])
    model.set_active(None)
    x1 = exits_images[:1]
    parts = quantize_parts(model, quant, work / "parts")
    prof8 = profile_onnx(model, x1, repeats=7, warmup=2, threads=threads, parts=parts)
    prof32 = profile_onnx(model, x1, repeats=7, warmup=2, threads=threads)
    model.set_active(setting["active_exits"])
    export_pieces(model, work / "ov_fp32", onnx=True)
    quantize_staged(model, work / "ov_fp32", work / "ov" / INT8_FOLDER, quant, {"images": len(quant)}, parts=parts)
    never = [2.0 if setting["policy"] != "entropy" else -1.0] * model.num_exits
    return {"call_ms": call_ms(threads),
            "driver_fp32_chosen": driver_split(work / "ov_fp32", exits_images, threads),
            "driver_int8_chosen": driver_split(work / "ov" / INT8_FOLDER, exits_images, threads),
            "driver_int8_no_exit": driver_split(work / "ov" / INT8_FOLDER, exits_images, threads, never),
            "fp32": profile_shares(prof32, setting["active_exits"]), "int8": profile_shares(prof8, setting["active_exits"]),
            "active_exits": setting["active_exits"]}


def resnet50(threads: int, n_exits: int = 4) -> dict[str, Any]:
    """torchvision ResNet-50 (random weights) at 224 px with ``n_exits`` pooled-MLP exits, every exit
    deciding: the same measurements, to see how the overheads scale with the model."""
    import pteenet

    torch.manual_seed(0)
    model = pteenet.attach(pteenet.AttachConfig(backbone="torchvision:resnet50", input_size=(3, 224, 224), exits=n_exits)).eval()
    x = torch.randn(16, 3, 224, 224)
    policy = model.policy
    setting = {"thresholds": [0.5] * model.num_exits, "policy": policy, "active_exits": [True] * model.num_exits}
    with tempfile.TemporaryDirectory(prefix="int8-ov-") as tmp:
        return {"model": f"torchvision resnet50, random weights, 224 px, {n_exits} exits",
                **overheads(model, setting, x[:8], x, Path(tmp), threads)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resnet50", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    doc = {"resnet50": resnet50(args.threads) if args.resnet50 else None, "load_average": [load, os.getloadavg()]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "int8_overheads.json").write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    sys.exit(main())
