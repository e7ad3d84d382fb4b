"""A learned exit gate against max-softmax, on the exit caches the CIFAR-10 benchmark wrote.

The gate: per exit, a logistic regression that reads the exit's scores (top
probability, normalised entropy, confidence head h), whether its prediction agrees with the previous
exit's, and predicts whether the exit agrees with the backbone. It is fitted on the calibration half
of the test split (protocol B), and its probability is swept like any policy's score (a sample
leaves at the first exit whose gate probability passes T). Both policies choose their threshold on
the calibration half (cheapest within 1 point of the backbone) and are measured on the other half.
We ship the gate only if it wins.

    python benchmarks/gate_study.py --work ~/.cache/pteenet/bench-cifar10 [--config r56-default]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import report_half
from pteenet.sweep import ExitCache, backbone_point, evaluate, pareto, select, sweep_global

GRID = np.round(np.linspace(0, 1, 201), 4)


def features(cache: ExitCache) -> np.ndarray:
    """[E, N, F]: the scores of each exit and agreement with the previous exit's prediction."""
    e = cache.num_exits
    prev = np.vstack([np.full((1, cache.num_samples), -1), cache.preds[: e - 1]])
    agree_prev = (cache.preds[:e] == prev).astype(np.float32)
    return np.stack([cache.scores["max-softmax"], cache.scores["entropy"], cache.scores["confidence"], agree_prev,
                     np.ones_like(agree_prev)], -1)


def fit_gate(cache: ExitCache, steps: int = 500) -> torch.Tensor:
    """Per-exit logistic regression weights [E, F] for P(exit agrees with the backbone)."""
    x = torch.from_numpy(features(cache))
    y = torch.from_numpy((cache.preds[:-1] == cache.preds[-1]).astype(np.float32))
    w = torch.zeros(x.shape[0], x.shape[2], requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits((x * w[:, None]).sum(-1), y)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def with_gate(cache: ExitCache, w: torch.Tensor) -> ExitCache:
    """The cache with the gate's probability as the score of a policy whose rule is 'score > T'
    (the confidence rule), so the sweep engine evaluates it unchanged."""
    p = torch.sigmoid((torch.from_numpy(features(cache)) * w[:, None]).sum(-1)).numpy()
    return ExitCache(cache.preds, {"confidence": p.astype(np.float32)}, cache.labels, cache.costs, cache.costs_paper)


def chosen(cal: ExitCache, rep: ExitCache, policy: str) -> dict[str, Any]:
    p = select(sweep_global(cal, policy, GRID), backbone_point(cal), max_drop=1.0)
    if p is None:
        return {}
    r = evaluate(rep, policy, p.thresholds or [])
    return {"threshold": p.thresholds[0] if p.thresholds else None, "reduction": 1 - r.cost,
            "drop_pt": 100 * ((backbone_point(rep).accuracy or 0) - (r.accuracy or 0)), "agreement": r.agreement}


def front_at(points: list[Any], costs: list[float]) -> list[float | None]:
    """Best accuracy reached at or below each cost (the curves compared point by point)."""
    front = pareto(points)
    return [max((p.accuracy for p in front if p.cost <= c), default=None) for c in costs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache/pteenet/bench-cifar10")
    ap.add_argument("--config", default="r56-default")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gate_study.json")
    args = ap.parse_args()
    test = ExitCache.load(args.work / f"{args.config}-test.npz")
    cal, rep = test.take(report_half(test.num_samples, 0)), test.take(report_half(test.num_samples, 1))
    w = fit_gate(cal)
    g_cal, g_rep = with_gate(cal, w), with_gate(rep, w)
    costs = [0.4, 0.5, 0.6, 0.7]
    doc = {
        "config": args.config, "protocol": "B (gate and thresholds fitted on test half 0, reported on half 1)",
        "features": ["max-softmax", "entropy", "confidence h", "agrees with previous exit", "bias"],
        "max-softmax": chosen(cal, rep, "max-softmax"), "gate": chosen(g_cal, g_rep, "confidence"),
        "accuracy_at_cost": {"costs": costs,
                             "max-softmax": front_at(sweep_global(rep, "max-softmax", GRID), costs),
                             "gate": front_at(sweep_global(g_rep, "confidence", GRID), costs)},
    }
    doc["gate_wins"] = bool(doc["gate"] and doc["max-softmax"]
                            and doc["gate"]["reduction"] > doc["max-softmax"]["reduction"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
