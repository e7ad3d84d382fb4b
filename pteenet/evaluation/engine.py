"""The engine: evaluate exit policies and thresholds from a cache of per-exit outputs.

One pass over a split stores every exit's prediction and every policy's score (``ExitCache``, in
``cache.py``); everything below is pure numpy over that cache, so trying a thousand thresholds
costs no model time.
A sample leaves at the FIRST exit whose score passes its threshold (``policies.passes``), else it
runs to the backbone's end (index E). Costs are fractions of the plain backbone: ``costs[k]`` is
cumulative (prefix + every branch passed), ``costs_paper[k]`` the paper's (prefix + own branch).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..configs import check_criterion
from ..errors import PteenetError, unknown_name
from ..exits import policies as pol
from .cache import ExitCache

_EPS = 1e-9  # slack when comparing float costs with a budget (sums in a different order)


@dataclass
class Point:
    """One operating point: where samples leave and what that costs and scores."""

    thresholds: list[float] | None  # per exit; None for the backbone and the oracle
    accuracy: float | None  # vs labels; None without labels
    agreement: float  # with the backbone's prediction
    cost: float  # mean cumulative cost, fraction of the backbone
    cost_paper: float  # mean cost in the paper's convention
    exit_fractions: list[float]  # E+1 fractions; the last is "ran to the end"
    policy: str | None = None
    kind: str = "global"  # global | per-exit | per-class | backbone | oracle
    class_thresholds: list[list[float]] | None = None  # per-class: [E][C], looked up by the exit's predicted class

    @property
    def metric(self) -> float:
        """What selection maximises: accuracy when there are labels, else agreement."""
        return self.accuracy if self.accuracy is not None else self.agreement

    def to_dict(self) -> dict:
        glob = self.kind == "global" and self.thresholds
        return {"threshold": self.thresholds[0] if glob else self.thresholds,
                "accuracy": self.accuracy, "agreement": self.agreement, "cost": self.cost,
                "cost_paper": self.cost_paper, "exit_fractions": self.exit_fractions,
                "policy": self.policy, "kind": self.kind,
                **({} if self.class_thresholds is None else {"class_thresholds": self.class_thresholds})}

    @classmethod
    def from_dict(cls, d: dict[str, Any], n_exits: int) -> Point:
        """The inverse of ``to_dict`` (a point of a stored sweep document)."""
        return cls(threshold_list(d.get("threshold"), n_exits), d.get("accuracy"), d["agreement"], d["cost"],
                   d["cost_paper"], list(d["exit_fractions"]), d.get("policy"), d.get("kind", "global"),
                   d.get("class_thresholds"))


def threshold_list(t: Any, n_exits: int) -> list[float] | None:
    """A sweep document's ``threshold`` (one global value, a per-exit list, or None) as per-exit values."""
    return None if t is None else [float(v) for v in t] if isinstance(t, (list, tuple)) else [float(t)] * n_exits


def _policy_scores(cache: ExitCache, policy: str) -> np.ndarray:
    if policy not in cache.scores:
        raise unknown_name("policy", policy, cache.scores)
    return cache.scores[policy]


def _hits(cache: ExitCache) -> tuple[np.ndarray | None, np.ndarray]:
    """[E+1, N] bools: each exit right vs labels (None without labels), and agreeing with the end."""
    correct = None if cache.labels is None else cache.preds == cache.labels[None, :]
    return correct, cache.preds == cache.backbone_preds[None, :]


def _first_index(mask: np.ndarray) -> np.ndarray:
    """Per column, the first row that is True, else the row count (E): "runs to the end"."""
    first = np.full(mask.shape[1], mask.shape[0], dtype=np.int64)
    for k in range(mask.shape[0] - 1, -1, -1):
        first[mask[k]] = k
    return first


def _passmat(policy: str, s: np.ndarray, ts: Sequence[float]) -> np.ndarray:
    # float(t): a numpy float64 threshold would compare in float64, a Python float compares in
    # the scores' float32, as the torch runtime does; keep every path on the latter.
    return np.array([pol.passes(policy, s[k], float(t)) for k, t in enumerate(ts)],
                    dtype=bool).reshape(s.shape)


def _make_point(cache: ExitCache, counts: np.ndarray, n_correct: int, n_agree: int,
                thresholds: list[float] | None, policy: str | None, kind: str) -> Point:
    # Every path (evaluate, sweep_global, oracle) ends here with integer counts, so the same
    # setting gives bit-identical floats whichever path computed it.
    n = max(cache.num_samples, 1)
    return Point(thresholds=thresholds,
                 accuracy=None if cache.labels is None else int(n_correct) / n,
                 agreement=int(n_agree) / n, cost=float(counts @ cache.costs) / n,
                 cost_paper=float(counts @ cache.costs_paper) / n,
                 exit_fractions=[int(c) / n for c in counts], policy=policy, kind=kind)


def point_from_exits(cache: ExitCache, exit_idx: np.ndarray, thresholds: list[float] | None,
                      policy: str | None, kind: str) -> Point:
    correct, agree = _hits(cache)
    cols = np.arange(cache.num_samples)
    n_correct = 0 if correct is None else int(correct[exit_idx, cols].sum())
    counts = np.bincount(exit_idx, minlength=cache.num_exits + 1).astype(np.int64)
    return _make_point(cache, counts, n_correct, int(agree[exit_idx, cols].sum()), thresholds,
                       policy, kind)


def _setting(cache: ExitCache, thresholds: float | Sequence[float]) -> tuple[list[float], str]:
    if np.ndim(thresholds) == 0:
        ts, kind = [float(thresholds)] * cache.num_exits, "global"  # type: ignore[arg-type]
    else:
        ts, kind = [float(t) for t in thresholds], "per-exit"  # type: ignore[union-attr]
    if len(ts) != cache.num_exits:
        raise PteenetError(f"{len(ts)} thresholds given for {cache.num_exits} exits",
                           "give one threshold per exit, or a single global one")
    return ts, kind


def exit_indices(cache: ExitCache, policy: str, thresholds: float | Sequence[float]) -> np.ndarray:
    """[N] where each sample leaves under a setting (E: it runs to the end)."""
    ts, _ = _setting(cache, thresholds)
    return _first_index(_passmat(policy, _policy_scores(cache, policy), ts))


def evaluate(cache: ExitCache, policy: str, thresholds: float | Sequence[float]) -> Point:
    """One setting: a global threshold (float) or one threshold per exit."""
    ts, kind = _setting(cache, thresholds)
    return point_from_exits(cache, exit_indices(cache, policy, ts), ts, policy, kind)


def backbone_point(cache: ExitCache) -> Point:
    """The plain backbone: no branch runs, cost 1 in both conventions."""
    e, n = cache.num_exits, max(cache.num_samples, 1)
    right = None if cache.labels is None else int((cache.backbone_preds == cache.labels).sum())
    return Point(None, None if right is None else right / n, 1.0, 1.0, 1.0,
                 [0.0] * e + [1.0], None, "backbone")


def oracle_point(cache: ExitCache) -> Point:
    """Each sample leaves at the first exit that is right (vs labels, else vs the backbone)."""
    correct, agree = _hits(cache)
    ok = (correct if correct is not None else agree)[:-1]
    return point_from_exits(cache, _first_index(ok), None, None, "oracle")


def _direction(policy: str) -> tuple[bool, str]:
    """(leaves when the score is high?, searchsorted side), from the policy's comparison."""
    p = pol.get(policy)
    # High: the passing set is a sorted suffix starting at the first v >= T (eq passes: 'left')
    # or v > T ('right'). Low: a prefix ending after v <= T ('right') or before v == T ('left').
    return p.high_leaves, "left" if p.inclusive == p.high_leaves else "right"


def _pass_sums(policy: str, values: np.ndarray, weights: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """[len(ts), W]: sum of each weight row over the samples whose value passes at each T."""
    high, side = _direction(policy)
    values = np.where(np.isnan(values), -np.inf if high else np.inf, values)  # NaN never passes
    order = np.argsort(values, kind="stable")
    cs = np.zeros((weights.shape[0], values.size + 1), dtype=weights.dtype)
    np.cumsum(weights[:, order], axis=1, out=cs[:, 1:])
    idx = np.searchsorted(values[order], ts.astype(values.dtype), side=side)
    return (cs[:, -1:] - cs[:, idx] if high else cs[:, idx]).T


def sweep_global(cache: ExitCache, policy: str, thresholds: np.ndarray) -> list[Point]:
    """Every global threshold at once: one sort per exit, no loop over thresholds."""
    s = _policy_scores(cache, policy)
    ts = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    e, n = s.shape
    high, _ = _direction(policy)
    # A sample has left by exit j iff some score among exits 0..j passes; passes is monotone in
    # the score, so that is iff the running best (max when high passes, min when low) passes.
    run = (np.fmax if high else np.fmin).accumulate(s, axis=0) if e else s
    correct, agree = _hits(cache)
    c = (correct if correct is not None else agree).astype(np.int64)
    a = agree.astype(np.int64)
    ones = np.ones(n, dtype=np.int64)
    counts = np.zeros((ts.size, e + 1), dtype=np.int64)
    counts[:, 0] = n
    n_correct, n_agree = np.full(ts.size, c[0].sum()), np.full(ts.size, a[0].sum())
    for j in range(e):
        # S(j, w) = sum of w over samples still running after exit j; those leaving at exit k
        # are S(k-1) - S(k), so exit j's row loses S(j) and exit j+1's row gains it.
        left = _pass_sums(policy, run[j], np.stack([ones, c[j], c[j + 1], a[j], a[j + 1]]), ts)
        still = np.array([n, c[j].sum(), c[j + 1].sum(), a[j].sum(), a[j + 1].sum()]) - left
        counts[:, j] -= still[:, 0]
        counts[:, j + 1] += still[:, 0]
        n_correct = n_correct - still[:, 1] + still[:, 2]
        n_agree = n_agree - still[:, 3] + still[:, 4]
    if correct is None:
        n_correct = np.zeros(ts.size, dtype=np.int64)
    return [_make_point(cache, counts[i], n_correct[i], n_agree[i], [float(t)] * e, policy,
                        "global") for i, t in enumerate(ts)]


def below_cheapest(budget: float, cheapest: float) -> PteenetError:
    """The error for a budget that no setting meets, naming the smallest one that works."""
    up = math.ceil(cheapest * 1e4) / 1e4
    return PteenetError(f"budget {budget:g} is below the cheapest reachable cost {cheapest:.4f}",
                        f"use a budget of at least {up:g} (a fraction of the backbone's cost)")


def search_per_exit(cache: ExitCache, policy: str, budgets: Sequence[float],
                    grid: np.ndarray, max_rounds: int = 5) -> list[Point]:
    """Per-exit thresholds maximising accuracy (agreement without labels) at mean cost <= budget."""
    grid = np.unique(np.asarray(grid, dtype=np.float64))
    s = _policy_scores(cache, policy)
    e, n = s.shape
    correct, agree = _hits(cache)
    gain = (correct if correct is not None else agree).astype(np.int64)
    glob = sweep_global(cache, policy, grid)
    cols = np.arange(n)
    out = []
    for budget in budgets:
        feasible = [p for p in glob if p.cost <= budget + _EPS]
        if not feasible:
            raise below_cheapest(budget, min(p.cost for p in glob))
        # Coordinate ascent. Start from the best global threshold within the budget, then, exit
        # by exit, try every grid value for that exit with the others fixed and keep the best
        # feasible one; repeat until a whole round changes nothing. Only strict improvements
        # (more right answers, or as many for less cost) are taken, so the result is never worse
        # than the global start and the loop ends. With the others fixed, a sample reaching exit
        # k either leaves there or continues to a fixed later exit, so one sort scores the grid.
        best = max(feasible, key=lambda p: (p.metric, -p.cost))
        ts = list(best.thresholds or [])
        for _ in range(max_rounds):
            changed = False
            for k in range(e):
                pm = _passmat(policy, s, ts)
                first = _first_index(pm)
                reach = first >= k
                cont = k + 1 + _first_index(pm[k + 1:, reach])  # where it goes if it stays at k
                r = cols[reach]
                base_gain = gain[first[~reach], cols[~reach]].sum() + gain[cont, r].sum()
                base_cost = cache.costs[first[~reach]].sum() + cache.costs[cont].sum()
                w = np.stack([gain[k, r] - gain[cont, r], cache.costs[k] - cache.costs[cont]])
                cand = np.unique(np.append(grid, ts[k]))
                sums = _pass_sums(policy, s[k, r], w.astype(np.float64), cand)
                g, cost = base_gain + sums[:, 0], (base_cost + sums[:, 1]) / n
                ok = cost <= budget + _EPS
                cur = int(np.searchsorted(cand, ts[k]))
                i = max(np.flatnonzero(ok), key=lambda i: (round(g[i]), -cost[i]), default=cur)
                if round(g[i]) > round(g[cur]) or (round(g[i]) == round(g[cur])
                                                   and cost[i] < cost[cur] - _EPS):
                    ts[k], changed = float(cand[i]), True
            if not changed:
                break
        out.append(evaluate(cache, policy, ts))
    return out


def pareto(points: Sequence[Point]) -> list[Point]:
    """The non-dominated front (lower cost, higher accuracy/agreement), sorted by cost."""
    front: list[Point] = []
    for p in sorted(points, key=lambda p: (p.cost, -p.metric)):
        if not front or p.metric > front[-1].metric:
            front.append(p)
    return front


def select(points: Sequence[Point], backbone: Point, budget: float | None = None,
           max_drop: float | None = None) -> Point | None:
    """By budget: the most accurate point within it. By max_drop (percentage points): the
    cheapest point within that much of the backbone. None when nothing qualifies."""
    points = list(points)
    check_criterion(budget, max_drop)
    if not points or (budget is None and max_drop is None):
        return None
    if budget is not None:
        cheapest = min(p.cost for p in points)
        if not budget >= cheapest - _EPS:
            raise below_cheapest(budget, cheapest)
        return max((p for p in points if p.cost <= budget + _EPS), key=lambda p: (p.metric, -p.cost))
    assert max_drop is not None
    target = backbone.metric - max_drop / 100.0
    ok = [p for p in points if p.metric >= target - _EPS]
    return min(ok, key=lambda p: (p.cost, -p.metric)) if ok else None


def parse_range(text: str) -> np.ndarray:
    """'START:STOP:STEP' (STOP included when on the grid) or one value; all within [0, 1]."""
    hint = "write START:STOP:STEP, e.g. 0:1:0.01, or a single threshold"
    try:
        nums = [float(x) for x in text.strip().split(":")]
    except ValueError:
        raise PteenetError(f"bad threshold range '{text}'", hint) from None
    if len(nums) not in (1, 3) or not all(math.isfinite(x) for x in nums):
        raise PteenetError(f"bad threshold range '{text}'", hint)
    if len(nums) == 1:
        values = np.array(nums)
    else:
        start, stop, step = nums
        if step <= 0:
            raise PteenetError(f"threshold range '{text}' needs a positive STEP", hint)
        if stop < start:
            raise PteenetError(f"threshold range '{text}' is empty (STOP < START)", hint)
        count = int(math.floor((stop - start) / step + 1e-9)) + 1
        if count > 1_000_000:
            raise PteenetError(f"threshold range '{text}' has {count} values", "use a larger STEP")
        # Rounding removes 0.30000000000000004-style noise so thresholds print and match cleanly.
        values = np.minimum(np.round(start + step * np.arange(count), 12), stop)
    if values.min() < 0 or values.max() > 1:
        raise PteenetError(f"thresholds must lie in [0, 1], got '{text}'",
                           "every policy's score (h, max-softmax, normalised entropy) is in [0, 1]")
    return values
