"""Exit policies: how a branch's outputs become a score and when a score lets a sample leave.

A policy is one ``Policy`` entry in ``POLICIES``: its score, the comparison that lets a sample
leave, the threshold at which none does, and the sentence a report prints about it. The runtime,
the exit cache (``scores``) and the sweep engine all read the registry and decide through
``Policy.passes``, so a threshold means the same thing everywhere. Adding a policy is one entry.
Works on torch tensors and numpy arrays alike.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..configs import check_choice

# The comparisons a policy may use: "leaves when score OP threshold".
_COMPARISONS: dict[str, Callable[[Any, Any], Any]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


@dataclass(frozen=True)
class Policy:
    """One exit policy. ``score(logits [B,K], conf_logit [B]) -> float32 [B]`` scores one exit; a
    sample leaves where ``score <compare> T``."""

    name: str
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    compare: str  # one of > >= < <=: with ">" or ">=" high scores leave
    never_exit: float  # a threshold at which no sample ever leaves (the staged model equals the backbone)
    rule: str  # what the report prints: "a sample leaves at the first exit where {rule}"

    def __post_init__(self) -> None:
        if self.compare not in _COMPARISONS:
            raise ValueError(f"policy {self.name!r}: compare must be one of {', '.join(_COMPARISONS)}")

    @property
    def high_leaves(self) -> bool:
        """True when a high score lets a sample leave (the passing scores are a suffix)."""
        return self.compare.startswith(">")

    @property
    def inclusive(self) -> bool:
        """True when a score equal to the threshold leaves."""
        return self.compare.endswith("=")

    def passes(self, s: Any, threshold: float) -> Any:
        """True where a sample leaves: exactly ``s <compare> threshold``, in the scores' dtype."""
        return _COMPARISONS[self.compare](s, threshold)


def _confidence(logits: torch.Tensor, conf_logit: torch.Tensor) -> torch.Tensor:
    """The sigmoid confidence head h."""
    return torch.sigmoid(conf_logit.float().reshape(-1))


def _max_softmax(logits: torch.Tensor, conf_logit: torch.Tensor) -> torch.Tensor:
    """The top class probability (exp of the top log-probability: the other classes' exps are not
    needed, and exp is monotone, so it equals the max of the probabilities)."""
    return torch.log_softmax(logits.float(), dim=1).max(1).values.exp()


def _entropy(logits: torch.Tensor, conf_logit: torch.Tensor) -> torch.Tensor:
    """The softmax entropy divided by log(num_classes), so it lies in [0, 1]."""
    logp = torch.log_softmax(logits.float(), dim=1)
    ent = -(logp.exp() * logp).sum(1) / math.log(max(logits.shape[1], 2))
    return ent.clamp(0.0, 1.0)


POLICIES: dict[str, Policy] = {p.name: p for p in (
    Policy("confidence", _confidence, ">", never_exit=1.0, rule="confidence h > T"),
    Policy("max-softmax", _max_softmax, ">=", never_exit=1.5, rule="top softmax probability >= T"),
    Policy("entropy", _entropy, "<=", never_exit=-1.0, rule="normalised softmax entropy <= T"),
)}


def get(policy: str) -> Policy:
    """The registered policy of that name; ValueError for an unknown one."""
    try:
        return POLICIES[policy]
    except (KeyError, TypeError):
        raise ValueError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}") from None


def scores(logits: torch.Tensor, conf_logit: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample scores of one exit for every policy (float32, shape [batch]), what the exit cache
    stores. Each comes from the policy's own ``score``, the function the runtime calls, so the
    runtime and the sweep's cache agree to the bit."""
    return {name: p.score(logits, conf_logit) for name, p in POLICIES.items()}


def score(policy: str, logits: torch.Tensor, conf_logit: torch.Tensor) -> torch.Tensor:
    """The score of one policy only (the runtime's hot path: no work for the others)."""
    return get(policy).score(logits, conf_logit)


def passes(policy: str, s: Any, threshold: float) -> Any:
    """True where a sample leaves: h > T, max-softmax >= T, normalised entropy <= T."""
    return get(policy).passes(s, threshold)


def never_exit_threshold(policy: str) -> float:
    """A threshold at which no sample ever leaves early (the staged model equals the backbone)."""
    return get(policy).never_exit


def check_policy(value: Any, also: Sequence[str] = ()) -> None:
    """A policy of the registry (``POLICIES``), or one of ``also`` (such as "all")."""
    check_choice("policy", value, [*POLICIES, *also])
