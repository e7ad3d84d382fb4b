"""Do the exits a shipped model takes equal the ones the sweep simulated? Every test image, every path.

On the CIFAR-10 default ResNet-56 (``benchmarks/cifar10_resnet.py --only r56-default``): operating
points are chosen through the library on the calibration split's exit cache (``-val.npz``; without
one, on protocol B's calibration half of test): per policy, the cheapest global threshold within 1
point of the backbone, and the per-exit thresholds at that point's cost. Then, on the 10,000 test images, each point's exit for every image from

- the sweep's simulation: ``build_cache`` (``forward_all`` at batch 256) and ``exit_indices``;
- ``pteenet.load(...).predict`` at batch 256 (rows that leave drop out of the batch) and at batch 1
  (the latency path: ``_predict_one`` and the lean steps), batch 1 for the first point only
  unless ``--batch1-all`` (10,000 single-image passes a point);
- the ``staged-onnx`` export run by its driver in ONNX Runtime at batch 256 (``--ort-batch1``:
  also at batch 1).

Counted: images whose exit differs from the simulation, and among the rest how many answer with
logits bit-identical to batch 256's; the closest any simulated decision came to its threshold.
One thread (the machine is shared). Writes ``benchmarks/results/cifar10_decisions_exact.json``.

    python benchmarks/cifar10_decisions_exact.py --model WORK/r56-default.safetensors --data /work/cache/cifar10
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import eval_data, report_half

import pteenet
from pteenet.data import load_splits
from pteenet.export.driver import StagedModel, onnx_runner
from pteenet.export.run import ExportConfig, export_model
from pteenet.exits.policies import POLICIES
from pteenet.evaluation import ExitCache, backbone_point, exit_indices, search_per_exit, select, sweep_global
from pteenet.sweep import build_cache

GRID = np.round(np.linspace(0, 1, 1001), 4)


def settings(cal: ExitCache) -> list[dict[str, Any]]:
    """Per policy: the cheapest global threshold within 1 point of the backbone on ``cal``; for the
    confidence policy also the per-exit thresholds at that cost."""
    out = []
    bb = backbone_point(cal)
    for policy in POLICIES:
        best = select(sweep_global(cal, policy, GRID), bb, max_drop=1.0)
        if best is None or best.thresholds is None:
            continue
        out.append({"name": f"{policy}-global", "policy": policy, "thresholds": list(best.thresholds)})
        if policy == "confidence":
            per = search_per_exit(cal, policy, [best.cost], GRID)
            if per and per[0].thresholds is not None:
                out.append({"name": f"{policy}-per-exit", "policy": policy, "thresholds": list(per[0].thresholds)})
    return out


def closest_gap(cache: ExitCache, policy: str, ts: list[float], exits: np.ndarray) -> float:
    """The smallest |score - threshold| over the decisions the simulation took (each image, each
    exit up to the one it left at): how far float rounding would have to move a score to flip one."""
    s = cache.scores[policy].astype(np.float64)
    reached = np.arange(cache.num_exits)[:, None] <= exits[None, :]
    gap = np.abs(s - np.asarray(ts, dtype=np.float32).astype(np.float64)[:, None])
    return float(gap[reached].min())


def predict(model: Any, x: torch.Tensor, s: dict[str, Any], bs: int) -> tuple[np.ndarray, torch.Tensor]:
    idx, logits = [], []
    for i in range(0, len(x), bs):
        p = model.predict(x[i:i + bs], s["thresholds"], s["policy"])
        idx.append(p.exit_index)
        logits.append(p.logits)
    return torch.cat(idx).numpy(), torch.cat(logits)


def staged_onnx(model: Any, x: torch.Tensor, s: dict[str, Any], folder: Path, bs: int) -> tuple[np.ndarray, np.ndarray]:
    staged = StagedModel(folder, onnx_runner(threads=1))
    assert staged.policy == s["policy"], "the staged export's policy is built in"
    xs = x.numpy()
    out = [staged.run(xs[i:i + bs], s["thresholds"]) for i in range(0, len(xs), bs)]
    return np.concatenate([o[1] for o in out]), np.concatenate([o[0] for o in out])


def compare(sim: np.ndarray, got: np.ndarray) -> dict[str, Any]:
    diff = np.flatnonzero(sim != got)
    return {"differ": int(diff.size), "examples": [{"image": int(i), "simulated": int(sim[i]), "got": int(got[i])}
                                                   for i in diff[:10]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("/work/cache/bench-cifar10/r56-default.safetensors"))
    ap.add_argument("--calibration-cache", type=Path, default=None, help="default: MODEL with -val.npz")
    ap.add_argument("--data", type=Path, default=Path("/work/cache/cifar10"))
    ap.add_argument("--limit", type=int, default=None, help="test images (default: all)")
    ap.add_argument("--batch1-all", action="store_true")
    ap.add_argument("--ort-batch1", action="store_true")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cifar10_decisions_exact.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    model = pteenet.load(str(args.model))
    cal_path = args.calibration_cache or args.model.with_name(args.model.stem + "-val.npz")
    test = load_splits(eval_data(argparse.Namespace(data=args.data, eval_limit=None)), model.info.preprocess,
                       model.info.num_classes).test
    n = len(test) if args.limit is None else min(args.limit, len(test))
    items = [test[i] for i in range(n)]
    x, y = torch.stack([it[0] for it in items]), torch.as_tensor([int(it[1]) for it in items])
    trained = model.meta.get("training", {})
    doc: dict[str, Any] = {"model": str(args.model), "images": n, "threads": 1, "torch": torch.__version__,
                           "model_training": {k: trained.get(k) for k in ("epochs_done", "complete")},
                           "cpu": platform.processor() or platform.machine(),
                           "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                           "loadavg_start": os.getloadavg(), "points": []}
    t = time.time()
    sim_cache = build_cache(model, torch.utils.data.TensorDataset(x, y), batch_size=256)
    stored = args.model.with_name(args.model.stem + "-test.npz")
    old = ExitCache.load(stored) if stored.exists() and args.limit is None else None
    doc["seconds_cache"] = time.time() - t
    if cal_path.exists():
        cal, doc["thresholds_chosen_on"] = ExitCache.load(cal_path), str(cal_path)
    else:
        cal, doc["thresholds_chosen_on"] = sim_cache.take(report_half(n, 0)), "protocol B's calibration half of test"
    points = settings(cal)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.time()
        folders = {}
        for policy in {s["policy"] for s in points}:
            model.set_thresholds(next(s["thresholds"] for s in points if s["policy"] == policy), policy)
            export_model(model, ExportConfig(output=Path(tmp) / policy, formats=("staged-onnx",)))
            folders[policy] = Path(tmp) / policy / "staged_onnx"
        doc["seconds_exports"] = time.time() - t
        for j, s in enumerate(points):
            t = time.time()
            sim = exit_indices(sim_cache, s["policy"], s["thresholds"])
            row: dict[str, Any] = {**s, "exit_fractions": np.bincount(sim, minlength=model.num_exits + 1).tolist(),
                                   "closest_gap_to_threshold": closest_gap(sim_cache, s["policy"], s["thresholds"], sim)}
            if old is not None:
                row["vs_cache_stored_at_training"] = compare(sim, exit_indices(old, s["policy"], s["thresholds"]))
            with torch.no_grad():
                e256, z256 = predict(model, x, s, 256)
            row["eager_batch_256"] = compare(sim, e256)
            if j == 0 or args.batch1_all:
                with torch.no_grad():
                    e1, z1 = predict(model, x, s, 1)
                row["eager_batch_1"] = compare(sim, e1)
                same = e1 == e256
                row["eager_batch_1"]["logits_bit_identical_to_batch_256"] = int(
                    sum(torch.equal(z1[i], z256[i]) for i in np.flatnonzero(same)))
            eo, zo = staged_onnx(model, x, s, folders[s["policy"]], 256)
            row["staged_onnx_batch_256"] = compare(sim, eo)
            row["staged_onnx_batch_256"]["max_abs_logit_diff_vs_eager"] = float(
                np.abs(zo[eo == e256] - z256.numpy()[eo == e256]).max())
            if args.ort_batch1 and j == 0:
                row["staged_onnx_batch_1"] = compare(sim, staged_onnx(model, x, s, folders[s["policy"]], 1)[0])
            row["seconds"] = time.time() - t
            doc["points"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "thresholds"}), flush=True)
    doc["loadavg_end"] = os.getloadavg()
    doc["seconds"] = time.time() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
