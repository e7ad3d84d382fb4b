"""Exit selection: which exits should take decisions at all.

With a cheap head after every block, most exits are rarely the first to pass; each still costs its
head (and, at batch size 1, a decision). Switching an exit off removes its decision, and its head
too unless a later exit still needs it (cascade or ensemble). What that saves and loses is measured
on an exit cache: the switched-off exits' scores never pass, and the costs are re-priced for the
heads that are still computed (``CostTable.costs(computed)``), exactly as the runtime will run.

The search is a greedy backward elimination on the chosen criterion (the cheapest global threshold
within ``max_drop`` points of the backbone, or the most accurate one within ``budget``): each round
drops the exit whose removal helps most, and removals that change nothing are taken too (fewer
exits is less work at run time), until every remaining removal hurts.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import PteenetError
from ..evaluation.cache import ExitCache
from ..evaluation.engine import Point, backbone_point, evaluate, select, sweep_global
from ..exits import policies as pol
from ..exits.chain import computed_branches
from ..runtime.timing import TimeProfile
from ..tracing.cost import CostTable


def restrict(cache: ExitCache, active: Sequence[bool], cost: CostTable | TimeProfile, chained: bool) -> ExitCache:
    """The cache as the runtime sees it with only ``active`` exits deciding, priced by ``cost``:
    MACs (``CostTable``) or measured time (``TimeProfile``), both through ``costs(computed)``."""
    mask = np.asarray(active, dtype=bool)
    if mask.shape != (cache.num_exits,):
        raise PteenetError(f"{mask.size} active flags for {cache.num_exits} exits", "give one per exit")
    scores = {p: np.where(mask[:, None], s, np.nan).astype(np.float32) for p, s in cache.scores.items()}
    scores.update(pol.chain_scores(cache.preds[:-1], mask))  # a stateful score counts only the exits that decide
    return ExitCache(cache.preds, scores, cache.labels, np.asarray(cost.costs(computed_branches(mask, chained))),
                     cache.costs_paper, reference=cache.reference, logits=cache.logits)


@dataclass
class Selection:
    active: list[bool]
    point: Point  # the chosen setting on the restricted cache
    rounds: int


def _objective(p: Point | None, by_budget: bool) -> tuple[float, float]:
    """Smaller is better: cost for max_drop; for a budget, missing accuracy, then cost."""
    if p is None:
        return (float("inf"), float("inf"))
    return (-p.metric, p.cost) if by_budget else (p.cost, -p.metric)


def tail_breaks(cost: CostTable | TimeProfile, active: list[bool], chained: bool, max_tail: float | None) -> bool:
    """Whether a sample that takes no exit would pay more than ``max_tail`` x the backbone."""
    return max_tail is not None and cost.costs(computed_branches(active, chained))[-1] > max_tail + 1e-12


def better(a: Point, b: Point, by_budget: bool) -> bool:
    """Whether ``a`` beats ``b``: cheaper within max_drop, or more accurate within a budget."""
    return _objective(a, by_budget) < _objective(b, by_budget)


def select_exits(cache: ExitCache, cost: CostTable | TimeProfile, chained: bool, policy: str, grid: np.ndarray,
                 max_drop: float | None = None, budget: float | None = None, max_tail: float | None = None) -> Selection:
    """Greedy backward elimination of exits for one policy with a global threshold. With
    ``max_tail``, exits are then dropped (the least harmful first) until a sample that leaves at no
    exit costs at most ``max_tail`` x the backbone: the mean must not hide a slow tail."""
    if (max_drop is None) == (budget is None):
        raise PteenetError("exit selection needs a criterion", "pass either --max-drop or --budget")
    backbone = backbone_point(cache)
    by_budget = budget is not None
    grid = pol.grid_for(policy, grid, cache.num_exits)

    def best(active: list[bool]) -> Point | None:
        if not any(active):
            return None
        points = sweep_global(restrict(cache, active, cost, chained), policy, grid)
        try:
            return select(points, backbone, budget, max_drop)
        except PteenetError:  # the budget is below what this set of exits can reach
            return None

    active = [True] * cache.num_exits
    current = best(active)
    rounds = 0
    while sum(active) > 1:
        rounds += 1
        trials = []
        for k in (k for k, a in enumerate(active) if a):
            trial = [a and j != k for j, a in enumerate(active)]
            trials.append((_objective(best(trial), by_budget), k))
        score, k = min(trials)
        if score > _objective(current, by_budget):
            break
        active[k] = False
        current = best(active)
    def tail(active: list[bool]) -> float:
        return cost.costs(computed_branches(active, chained))[-1]

    while any(active) and tail_breaks(cost, active, chained, max_tail):
        # Only removals that shorten the tail count (with a cascade or ensemble: the last active exit).
        trials = [(_objective(best(t), by_budget), k) for k, t in
                  ((k, [a and j != k for j, a in enumerate(active)]) for k, a in enumerate(active) if a)
                  if tail(t) < tail(active) - 1e-12]
        active[min(trials)[1]] = False
        current = best(active)
    if current is None:
        raise PteenetError("no setting meets the criterion with any set of exits",
                           "raise --max-drop or --budget")
    return Selection(active, current, rounds)


@dataclass
class NothingPays:
    """Why no setting saves compute: the cheapest one meeting the criterion, and how often the
    best exit agrees with the backbone on the calibration images."""

    cheapest: Point
    best_exit: int
    best_agreement: float
    samples: int

    def reason(self) -> str:
        return (f"the cheapest setting that meets the criterion costs {self.cheapest.cost:.3f} x the backbone; "
                f"the exits agree with the backbone on at most {100 * self.best_agreement:.1f}% of the "
                f"{self.samples} calibration images (exit {self.best_exit})")

    def to_dict(self) -> dict:
        return {"cheapest": self.cheapest.to_dict(), "best_exit": self.best_exit,
                "best_agreement": self.best_agreement, "reason": self.reason()}


def backbone_only(cache: ExitCache, chosen: Point, cost: CostTable | TimeProfile, chained: bool) -> tuple[Point, list[bool], NothingPays]:
    """Where the chosen setting costs at least the backbone (branches are work too, so a setting
    that rarely exits costs more): the same policy and thresholds with no exit active, so that the
    runtime computes no branch and the cost is exactly 1.0. Returns that point, the active flags
    (all off) and why."""
    agree = [(cache.preds[k] == cache.backbone_preds).mean() for k in range(cache.num_exits)]
    best = int(np.argmax(agree))
    active = [False] * cache.num_exits
    ts = chosen.thresholds or [1.0] * cache.num_exits
    point = evaluate(restrict(cache, active, cost, chained), chosen.policy or "confidence",
                     ts[0] if chosen.kind == "global" else ts)
    return point, active, NothingPays(chosen, best, float(agree[best]), cache.num_samples)
