"""Per-class thresholds: one threshold per (exit, predicted class), from a one-parameter family.

An exit is often sure of some classes long before others; one threshold per exit makes the easy
classes wait for the hard ones. Here, at a level ``eps``, exit k lets a sample it predicts as class c
leave where its score passes ``T[k, c](eps)``: the most permissive threshold at which, on the
samples that fit the family, exit k's answers of class c that pass agree with the backbone at least
``1 - eps`` of the time, counting one disagreement more than seen and shrinking the class towards
its exit's agreement over all classes by ``SHRINK`` samples' worth (a per-class precision target,
as CalexNet calibrates its exits). As ``eps``
grows the set of admissible thresholds only grows, so every ``T[k, c]`` moves monotonically towards
letting more samples leave: the family is ordered from conservative to aggressive, and the
certification tests it in that order (``certify_per_class``), as it does one policy's global
thresholds. A (exit, class) pair predicted for fewer than ``MIN_SAMPLES`` fitting samples takes its
exit's threshold at the same level, fitted on every class at once, and the record names it.

The runtime looks the threshold up by the exit's predicted class (``EarlyExitModel.class_thresholds``)
in eager, batch-1 and staged programs, so it sends each sample where ``exit_indices`` says.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import PteenetError
from ..evaluation.cache import ExitCache
from ..evaluation.engine import Point, point_from_exits
from ..exits import policies as pol
from ..exits.eenet import NAME as EENET
from ..tracing.cost import CostTable
from .guarantee import (
    SPLIT_SEED,
    STRUCTURE_SHARE,
    Certified,
    Guarantee,
    certified_choice,
    choose_structure,
    risk_counts,
    view_of,
)

MIN_SAMPLES = 30  # fitting samples an exit must predict as a class for that class to get its own threshold
# One disagreement assumed beyond those seen: a cut passing m samples reaches at most m / (m + 1),
# so the family starts at "nobody leaves" (level 0) and a few lucky samples of a class do not let it
# leave early.
PRIOR_MISSES = 1
# A class's agreement at a threshold is shrunk towards its exit's (all classes) by this many samples'
# worth: a class seen a few dozen times cannot move far from its exit on luck alone.
SHRINK = 20
# The precision misses tried, conservative first: 0, then log-spaced up to one answer in two.
LEVELS = np.concatenate([[0.0], np.geomspace(1e-4, 0.5, 79)])


@dataclass
class ClassFamily:
    """The family fitted on some samples: ``table[i]`` is [E, C] at ``levels[i]`` (float32 values,
    as the scores compare), ``fallback`` the (exit, class) pairs that take their exit's threshold."""

    policy: str
    levels: np.ndarray
    table: np.ndarray  # [L, E, C]
    fallback: list[tuple[int, int]]

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "levels": len(self.levels), "min_samples": MIN_SAMPLES,
                "fallback": [list(p) for p in self.fallback]}


def _precision(scores: np.ndarray, ok: np.ndarray, policy: str,
               pooled: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores sorted most eager to leave first, the cuts: the last index of each run of equal
    scores, the agreement of the samples each cut passes). With ``pooled`` (the exit's agreement over
    every class at a threshold) it is shrunk towards that by ``SHRINK`` samples' worth."""
    p = pol.get(policy)
    keep = ~np.isnan(scores)
    s, ok = scores[keep].astype(np.float32), ok[keep]
    order = np.argsort(-s if p.high_leaves else s, kind="stable")
    s, ok = s[order], ok[order]
    last = np.flatnonzero(np.append(s[1:] != s[:-1], True))  # a cut passes a whole run of equal scores
    agree = np.cumsum(ok)[last].astype(np.float64)
    if pooled is None:
        return s, last, agree / (last + 1 + PRIOR_MISSES)
    return s, last, (agree + SHRINK * pooled(s[last])) / (last + 1 + SHRINK)


def _pooled(s: np.ndarray, last: np.ndarray, precision: np.ndarray, policy: str) -> Callable[[np.ndarray], np.ndarray]:
    """The exit's agreement at any threshold: that of the deepest pooled cut the threshold passes."""
    high = pol.get(policy).high_leaves
    keys = -s[last].astype(np.float64) if high else s[last].astype(np.float64)

    def at(v: np.ndarray) -> np.ndarray:
        i = np.searchsorted(keys, -v if high else v, side="right") - 1
        return np.where(i >= 0, precision[np.maximum(i, 0)], 0.0)
    return at


def _cuts(scores: np.ndarray, ok: np.ndarray, levels: np.ndarray, policy: str,
          pooled: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Per level, the most permissive threshold whose passing samples agree at least 1 - eps of
    the time (the policy's never-exit threshold where none does)."""
    p = pol.get(policy)
    out = np.full(levels.size, p.never_exit, dtype=np.float64)
    if np.isnan(scores).all():
        return out
    s, last, precision = _precision(scores, ok, policy, pooled)
    for i, eps in enumerate(levels):
        good = np.flatnonzero(precision >= 1.0 - eps - 1e-12)
        if good.size:
            j = last[good[-1]]
            # Halfway to the next score that must not pass: no threshold sits on a score (a score
            # computed at another batch shape may move by a rounding step), and new samples between
            # the two fall on either side alike. Past the last sample: every score passes (they lie in [0, 1]).
            if j + 1 < s.size:
                out[i] = float(np.float32((np.float64(s[j]) + np.float64(s[j + 1])) / 2))
            else:
                out[i] = -1.0 if p.high_leaves else 2.0
    return out


def fit(cache: ExitCache, policy: str, num_classes: int | None = None, levels: np.ndarray = LEVELS,
        min_samples: int = MIN_SAMPLES) -> ClassFamily:
    """The family on ``cache``'s samples (exits whose scores are NaN there do not decide), for
    ``num_classes`` classes (default: the largest class the cache holds)."""
    s = cache.scores[policy]
    e = s.shape[0]
    seen = max(int(cache.preds.max(initial=0)), -1 if cache.labels is None else int(cache.labels.max(initial=0))) + 1
    c = seen if num_classes is None else max(int(num_classes), seen)
    agree = cache.preds[:-1] == cache.preds[-1][None]
    table = np.empty((levels.size, e, c), dtype=np.float64)
    fallback = []
    for k in range(e):
        pooled = _cuts(s[k], agree[k], levels, policy)
        prior = None if np.isnan(s[k]).all() else _pooled(*_precision(s[k], agree[k], policy), policy)
        for cls in range(c):
            mine = cache.preds[k] == cls
            if mine.sum() < min_samples:
                table[:, k, cls] = pooled
                if prior is not None:
                    fallback.append((k, cls))
            else:
                table[:, k, cls] = _cuts(s[k, mine], agree[k, mine], levels, policy, prior)
    return ClassFamily(policy, levels, table.astype(np.float32), fallback)


def exit_indices(cache: ExitCache, policy: str, table: np.ndarray) -> np.ndarray:
    """[N] where each sample leaves with thresholds ``table`` [E, C] looked up by the exit's predicted class."""
    s = cache.scores[policy]
    e = s.shape[0]
    t = np.asarray(table, dtype=np.float32)
    passed = np.zeros(s.shape, dtype=bool)
    for k in range(e):
        passed[k] = pol.passes(policy, s[k], t[k][cache.preds[k]])  # float32 against float32, as the runtime
    first = np.where(passed.any(0), passed.argmax(0), e)
    return first


def evaluate(cache: ExitCache, policy: str, table: np.ndarray) -> Point:
    """One per-class setting; ``thresholds`` holds each exit's most conservative class threshold
    (what a runtime without the table would use: no sample leaves earlier than with the table)."""
    t = np.asarray(table, dtype=np.float32)
    loose = (t.max(1) if pol.get(policy).high_leaves else t.min(1)).astype(np.float64).tolist()
    p = point_from_exits(cache, exit_indices(cache, policy, t), loose, policy, "per-class")
    p.class_thresholds = t.astype(np.float64).tolist()
    return p


def certify_per_class(cache: ExitCache, policies: list[str], grid: np.ndarray, max_drop: float, confidence: float, *,
                      cost: CostTable | Any | None = None, chained: bool = False, seed: int = SPLIT_SEED,
                      max_tail: float | None = None, num_classes: int | None = None,
                      levels: np.ndarray = LEVELS) -> tuple[Certified, ClassFamily]:
    """The cheapest per-class setting certified to keep the drop within ``max_drop`` points with
    probability >= ``confidence``. On ``STRUCTURE_SHARE`` of the samples: the policy and (with
    ``cost``) the exits, as ``certify`` chooses them, then the family; on the rest: the fixed
    sequence over its levels, conservative first."""
    target, n = max_drop / 100.0, cache.num_samples
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(STRUCTURE_SHARE * n))
    part, rest = cache.take(np.sort(perm[:k])), cache.take(np.sort(perm[k:]))
    scored = [p for p in policies if p in pol.SCORED] or ["max-softmax"]
    active, candidates = choose_structure(part, scored, grid, max_drop, False, cost, chained, max_tail)
    policy = candidates[0][0]
    family = fit(view_of(part, active, cost, chained), policy, num_classes, levels)
    rest_view, full_view = view_of(rest, active, cost, chained), view_of(cache, active, cost, chained)
    tested = [(evaluate(full_view, policy, t), risk_counts(rest_view, exit_indices(rest_view, policy, t)))
              for t in family.table]
    risk = "accuracy drop" if cache.labels is not None else "disagreement"
    g = Guarantee(confidence=confidence, risk=risk, target=target, bound=None, observed=None, samples=rest.num_samples,
                  structure_samples=part.num_samples, tested=0, certified=0)
    return certified_choice(g, tested, active), family


def monotone(family: ClassFamily) -> bool:
    """Whether every threshold moves only towards letting more samples leave along the levels."""
    d = np.diff(family.table.astype(np.float64), axis=0)
    return bool((d <= 0).all() if pol.get(family.policy).high_leaves else (d >= 0).all())


def chosen_level(family: ClassFamily, point: Point | None) -> float | None:
    """The level of a chosen point of the family (None: nothing chosen)."""
    if point is None or point.class_thresholds is None:
        return None
    want = np.asarray(point.class_thresholds, dtype=np.float32)
    hit = [i for i, t in enumerate(family.table) if np.array_equal(t, want)]
    return float(family.levels[hit[0]]) if hit else None



def check_per_class(per_class: bool, max_drop: float | None, confidence: float, policy: str) -> None:
    """``--per-class`` needs a certified ``--max-drop`` and a policy with a score."""
    if not per_class:
        return
    if max_drop is None or not confidence:
        raise PteenetError("--per-class needs --max-drop P with a guarantee: its thresholds are a family certified "
                           "from conservative to aggressive", "pass --max-drop P (and no --no-guarantee)")
    if policy in pol.STATEFUL or policy == EENET:  # eenet: its scheduler's score is fitted, one threshold per exit
        raise PteenetError(f"--per-class thresholds a score, and {policy} is not one",
                           f"pass --policy {' or '.join(pol.SCORED)}, or all")


def fallback_warning(guarantee: dict[str, Any] | None) -> str | None:
    """The sweep's warning naming the (exit, class) pairs that took their exit's threshold; None: none did."""
    pc = (guarantee or {}).get("per_class") or {}
    fallback = pc.get("fallback")
    if not fallback:
        return None
    return (f"per-class: {len(fallback)} (exit, class) pairs were predicted for fewer than {pc['min_samples']} of the "
            "images that fitted the thresholds and use their exit's threshold instead: "
            + ", ".join(f"exit {k} class {c}" for k, c in fallback[:8]) + (" ..." if len(fallback) > 8 else "")
            + " (all of them: guarantee.per_class.fallback in sweep.json)")
