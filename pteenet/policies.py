"""Exit policies: how a branch's outputs become a score and when a score lets a sample leave.

The runtime and the sweep both decide through ``passes`` so that a threshold means the same thing in
both places. Works on torch tensors and numpy arrays alike.
"""
from __future__ import annotations

import math
from typing import Any

import torch

POLICIES = ("confidence", "max-softmax", "entropy")


def scores(logits: torch.Tensor, conf_logit: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample scores of one exit for every policy (float32, shape [batch]).

    ``confidence`` is the sigmoid confidence head h; ``max-softmax`` the top class probability;
    ``entropy`` the softmax entropy divided by log(num_classes), so it lies in [0, 1].
    """
    logp = torch.log_softmax(logits.float(), dim=1)
    p = logp.exp()
    ent = -(p * logp).sum(1) / math.log(max(logits.shape[1], 2))
    return {
        "confidence": torch.sigmoid(conf_logit.float().reshape(-1)),
        "max-softmax": p.max(1).values,
        "entropy": ent.clamp(0.0, 1.0),
    }


def score(policy: str, logits: torch.Tensor, conf_logit: torch.Tensor) -> torch.Tensor:
    """The score of one policy only (the runtime's hot path: no work for the other two)."""
    if policy == "confidence":
        return torch.sigmoid(conf_logit.float().reshape(-1))
    if policy == "max-softmax":
        # Same formula as ``scores`` so the runtime and the sweep's cache agree to the bit.
        return torch.log_softmax(logits.float(), dim=1).max(1).values.exp()
    if policy == "entropy":
        return scores(logits, conf_logit)["entropy"]
    raise ValueError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")


def passes(policy: str, s: Any, threshold: float) -> Any:
    """True where a sample leaves: h > T, max-softmax >= T, normalised entropy <= T."""
    if policy == "confidence":
        return s > threshold
    if policy == "max-softmax":
        return s >= threshold
    if policy == "entropy":
        return s <= threshold
    raise ValueError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")


def never_exit_threshold(policy: str) -> float:
    """A threshold at which no sample ever leaves early (the staged model equals the backbone)."""
    return {"confidence": 1.0, "max-softmax": 1.5, "entropy": -1.0}[policy]
