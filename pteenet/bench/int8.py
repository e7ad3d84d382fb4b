"""``bench --runtime onnxruntime --quantize int8``: four programs timed in turn (FP32 backbone, FP32
early exit, INT8 backbone, INT8 early exit), each one's time against the FP32 backbone and the INT8
ones against the INT8 backbone, accuracy where the images have labels, and a plain sentence where
INT8 does not pay on this CPU (without VNNI or AMX it can be slower than FP32)."""
from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

BASELINE = {"backbone": None, "early_exit": "backbone", "backbone_int8": "backbone", "early_exit_int8": "backbone_int8"}


def _answers(out: Any) -> np.ndarray:
    logits = out.logits if hasattr(out, "logits") else out
    return torch.as_tensor(np.asarray(logits) if not isinstance(logits, torch.Tensor) else logits).argmax(1).numpy()


def programs(runs: dict[str, Callable[[torch.Tensor], Any]], batches: list[torch.Tensor], totals: dict[str, list[float]],
             per_batch: dict[str, list[float]], n: int, labels: torch.Tensor | None) -> dict[str, Any]:
    """Per program: throughput, latency (mean, p50, p95, p99), time ratio to the FP32 backbone and
    to its own baseline (the INT8 backbone for the INT8 early exit), accuracy (one untimed pass)."""
    out: dict[str, Any] = {}
    for name, fn in runs.items():
        t = statistics.median(totals[name])
        lat = sorted(per_batch[name])
        entry: dict[str, Any] = {
            "time_s": t, "images_per_s": n / t,
            "latency_ms": {"mean": 1e3 * statistics.fmean(lat), "p50": 1e3 * lat[len(lat) // 2],
                           "p99": 1e3 * lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))]},
            "time_ratio_vs_fp32_backbone": t / statistics.median(totals["backbone"])}
        base = BASELINE.get(name)
        if base is not None and base != "backbone":
            entry[f"time_ratio_vs_{base}"] = t / statistics.median(totals[base])
        if labels is not None:
            answers = np.concatenate([_answers(fn(b)) for b in batches])
            entry["accuracy"] = float((answers == labels.numpy()[:len(answers)]).mean())
        out[name] = entry
    return out


def int8_warnings(results: list[dict[str, Any]]) -> list[str]:
    """Where the INT8 backbone is not faster than the FP32 one, or the INT8 early exit not faster
    than the INT8 backbone, one plain sentence per batch size."""
    warnings = []
    for r in results:
        p = r.get("programs") or {}
        if "backbone_int8" not in p:
            continue
        ratio = p["backbone_int8"]["time_ratio_vs_fp32_backbone"]
        if ratio >= 1.0:
            warnings.append(f"batch {r['batch_size']}: the INT8 backbone is NOT faster than FP32 on this CPU "
                            f"({ratio:.2f}x its time): INT8 does not pay here")
        ee = p["early_exit_int8"]["time_ratio_vs_backbone_int8"]
        if ee >= 1.0:
            warnings.append(f"batch {r['batch_size']}: the INT8 early exit is NOT faster than the INT8 backbone ({ee:.2f}x its time)")
    return warnings
