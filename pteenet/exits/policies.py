"""Exit policies: how a branch's outputs become a score and when a score lets a sample leave.

A policy is one ``Policy`` entry in ``POLICIES``: its score, the comparison that lets a sample
leave, the threshold at which none does, and the sentence a report prints about it. The runtime,
the exit cache (``scores``) and the sweep engine all read the registry and decide through
``Policy.passes``, so a threshold means the same thing everywhere. Adding a policy is one entry.
Works on torch tensors and numpy arrays alike.

At batch 1 a decision through tensor ops costs about half as much again as the head before it
(CIFAR ResNet-56 right after a backbone pass: a head 0.17-0.24 ms, with the entropy's nine tensor
ops 0.25-0.33 ms, with ``leaves_one`` 0.20-0.28 ms; ``benchmarks/results/batch1_breakdown.json``), so
``Policy.leaves_one`` reads the K numbers once and scores them in Python floats (``host``), and
lets the tensor score decide only where the two could disagree (``_margin``): the decision is
the tensor score's, always.

A stateful policy (``Policy.step``: patience) scores an exit from what the exits that decided before
it answered: the runtime carries that small state through its stage loop (``decide``), and the exit
cache derives the same scores from the exits' predictions (``chain_scores``), so the sweep simulates
exactly what the runtime does.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..configs import check_choice, check_int
from ..errors import PteenetError

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
    # The same score of one sample in float64 from its logits and confidence logit as Python
    # floats, with the largest magnitude it read (for ``_margin``), or None (batch-1 decisions
    # then use ``score``).
    host: Callable[[list[float], float], tuple[float, float]] | None = None
    host_reads_conf: bool = False  # whether ``host`` reads the confidence logit (one more read)
    # Stateful policies: ``step(logits [B,K], state) -> (score [B], state)``, the state None at the
    # first deciding exit; ``from_preds(preds [E,N] ints, active [E] bools) -> scores [E,N]`` (NaN
    # where an exit does not decide) is the same score from the exit cache; ``grid(E)`` the
    # thresholds worth sweeping (the policy's own, not the [0, 1] grid of the scores above).
    step: Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]] | None = None
    from_preds: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
    grid: Callable[[int], np.ndarray] | None = None

    def __post_init__(self) -> None:
        if self.compare not in _COMPARISONS:
            raise ValueError(f"policy {self.name!r}: compare must be one of {', '.join(_COMPARISONS)}")

    @property
    def stateful(self) -> bool:
        """True when an exit's score depends on the exits that decided before it."""
        return self.step is not None

    def decide(self, logits: torch.Tensor, conf_logit: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        """(score [B], the state the next deciding exit reads): the runtime's one call per deciding
        exit, for stateless and stateful policies alike (a stateless one keeps no state)."""
        if self.step is not None:
            return self.step(logits, state)
        return self.score(logits, conf_logit), None

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

    def leaves_one(self, logits: torch.Tensor, conf_logit: torch.Tensor, threshold: float) -> bool:
        """``bool(passes(score(logits, conf_logit), threshold))`` for one sample ([1, K], [1]),
        without tensor ops where the float64 score is clear of the threshold: the float32 score
        differs from the exact one by far less than ``_margin``, so both lie on the same side."""
        if self.host is not None and logits.shape[1] <= HOST_MAX_CLASSES:
            z = logits.tolist()[0]
            c = float(conf_logit) if self.host_reads_conf else 0.0
            try:
                s, size = self.host(z, c)
            except (OverflowError, ValueError):  # inf or nan among the logits: the tensor ops decide
                s, size = math.nan, 0.0
            if abs(s - threshold) > _margin(len(z), size):  # False for nan
                return bool(_COMPARISONS[self.compare](s, threshold))
        return bool(self.passes(self.score(logits, conf_logit), threshold))


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


# Above this many classes a Python loop over the logits costs more than the tensor ops it saves.
HOST_MAX_CLASSES = 64


def _margin(k: int, size: float) -> float:
    """How far the float64 score of K logits of at most ``size`` in magnitude must be from a
    threshold for the float32 tensor score to lie on the same side. A float32 op rounds by 6e-8 of
    what it handles, so the tensor score can be off by a few of those per term of its sums (K) and
    per unit of the logits' size, where a kernel subtracts large logits; the scores lie in [0, 1].
    1e-6 per class and per unit of size is 8 times that; measured, the two scores differ by at most
    3.3e-7 for 2-64 classes and logits up to 1e5 (``tests/test_policies.py``)."""
    return 1e-6 * (k + 4 + size)


# Each ``host`` returns (score, the size of what it read) in as few Python operations as it can:
# right after a backbone stage every one of them runs from a cold CPU cache.
def _host_confidence(z: list[float], c: float) -> tuple[float, float]:
    return (1.0 / (1.0 + math.exp(-c)) if c >= 0 else math.exp(c) / (1.0 + math.exp(c))), abs(c)


def _host_max_softmax(z: list[float], c: float) -> tuple[float, float]:
    mx = max(z)  # the top probability is 1 / sum(exp(z - max))
    return 1.0 / sum([math.exp(v - mx) for v in z]), max(mx, -min(z))


def _host_entropy(z: list[float], c: float) -> tuple[float, float]:
    mx = max(z)
    d = [v - mx for v in z]
    e = list(map(math.exp, d))
    s = sum(e)  # entropy = log s - sum(e * d) / s, with p = e / s and log p = d - log s
    ent = (math.log(s) - sum(map(operator.mul, e, d)) / s) / math.log(max(len(z), 2))
    return min(max(ent, 0.0), 1.0), max(mx, -min(z))


# Patience (PABEE, Zhou et al. 2020): the score is the run length, how many deciding exits in a
# row, ending at this one, predict the same class; a sample leaves once it reaches the threshold t.
# PABEE's "patience p" (p unchanged predictions after the first) is t = p + 1 here. The state is
# (last predicted class [B] int64, run length [B] float32), carried by the runtime.
NEVER_PATIENT = 1e6  # more deciding exits than any model has: nobody leaves


def _patience_step(logits: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
    pred = logits.argmax(1)
    if state is None:
        run = torch.ones(pred.shape, dtype=torch.float32, device=pred.device)
    else:
        last, prev_run = state
        run = torch.where(pred == last, prev_run + 1.0, torch.ones_like(prev_run))
    return run, (pred, run)


def _patience_from_preds(preds: np.ndarray, active: np.ndarray) -> np.ndarray:
    e, n = preds.shape
    out = np.full((e, n), np.nan, dtype=np.float32)
    last, run = np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=np.float32)
    for k in range(e):
        if active[k]:
            run = np.where(preds[k] == last, run + 1, 1).astype(np.float32)
            last = preds[k].astype(np.int64)
            out[k] = run
    return out


def _patience_score(logits: torch.Tensor, conf_logit: torch.Tensor) -> torch.Tensor:
    """An exit alone (no earlier exit decided): a run of one."""
    return torch.ones(logits.shape[0], dtype=torch.float32, device=logits.device)


POLICIES: dict[str, Policy] = {p.name: p for p in (
    Policy("confidence", _confidence, ">", never_exit=1.0, rule="confidence h > T", host=_host_confidence,
           host_reads_conf=True),
    Policy("max-softmax", _max_softmax, ">=", never_exit=1.5, rule="top softmax probability >= T",
           host=_host_max_softmax),
    Policy("entropy", _entropy, "<=", never_exit=-1.0, rule="normalised softmax entropy <= T", host=_host_entropy),
    Policy("patience", _patience_score, ">=", never_exit=NEVER_PATIENT,
           rule="T deciding exits in a row, ending there, predict the same class (patience)",
           step=_patience_step, from_preds=_patience_from_preds,
           grid=lambda e: np.arange(1, e + 2, dtype=np.float64)),
)}
STATEFUL = tuple(name for name, p in POLICIES.items() if p.stateful)
SCORED = tuple(name for name in POLICIES if name not in STATEFUL)  # an exit's outputs alone give the score


def get(policy: str) -> Policy:
    """The registered policy of that name; ValueError for an unknown one."""
    try:
        return POLICIES[policy]
    except (KeyError, TypeError):
        raise ValueError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}") from None


def scores(logits: torch.Tensor, conf_logit: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample scores of one exit for every stateless policy (float32, shape [batch]), what the
    exit cache stores. Each comes from the policy's own ``score``, the function the runtime calls,
    so the runtime and the sweep's cache agree to the bit. Stateful ones: ``chain_scores``."""
    return {name: POLICIES[name].score(logits, conf_logit) for name in SCORED}


def chain_scores(preds: np.ndarray, active: Sequence[bool] | np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every stateful policy's scores [E, N] from the exits' predictions [E, N] (the exit cache's,
    without the backbone's row), with only ``active`` exits deciding (default: all; NaN elsewhere)."""
    mask = np.ones(preds.shape[0], dtype=bool) if active is None else np.asarray(active, dtype=bool)
    return {name: p.from_preds(preds, mask) for name, p in POLICIES.items() if p.from_preds is not None}


def grid_for(policy: str, grid: np.ndarray, num_exits: int) -> np.ndarray:
    """The thresholds a sweep tries for ``policy``: its own grid where it has one (patience: the
    run lengths 1..E+1, E+1 being "never") unless ``grid`` already is one of whole numbers, else
    ``grid`` (the [0, 1] grid of the scores)."""
    p = get(policy)
    given = np.asarray(grid, dtype=np.float64)
    if p.grid is None or (given.size and (given >= 1).all() and (given == np.round(given)).all()):
        return grid  # a grid of whole numbers >= 1 is patience values already (``--patience T``)
    return p.grid(num_exits)


def score(policy: str, logits: torch.Tensor, conf_logit: torch.Tensor) -> torch.Tensor:
    """The score of one policy only (the runtime's hot path: no work for the others)."""
    return get(policy).score(logits, conf_logit)


def passes(policy: str, s: Any, threshold: float) -> Any:
    """True where a sample leaves: h > T, max-softmax >= T, normalised entropy <= T."""
    return get(policy).passes(s, threshold)


def never_exit_threshold(policy: str) -> float:
    """A threshold at which no sample ever leaves early (the staged model equals the backbone)."""
    return get(policy).never_exit


# Policies whose score a fitted model computes (``exits/eenet.py``): not in ``POLICIES`` (the
# exit cache cannot score them before they are fitted), but a model may run them.
EENET = "eenet"  # exits/eenet.py
LEARNED = (EENET,)


def check_policy(value: Any, also: Sequence[str] = ()) -> None:
    """A policy of the registry (``POLICIES``), a learned one (``LEARNED``), or one of ``also`` (such as "all")."""
    check_choice("policy", value, [*POLICIES, *LEARNED, *also])


def with_patience(patience: Any, policy: str) -> str:
    """The policy a sweep given a fixed ``patience`` runs (patience; ``policy`` where None), checking the pair."""
    if patience is None:
        return policy
    check_int("patience", patience, 1, "e.g. --patience 3: leave once 3 deciding exits in a row agree")
    if policy not in ("all", "patience"):
        raise PteenetError(f"--patience goes with the patience policy, not {policy}", "drop --policy, or pass --policy patience")
    return "patience"
