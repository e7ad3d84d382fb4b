"""A chosen setting with a statistical guarantee (Learn-then-Test, Angelopoulos et al. 2021).

The cheapest setting whose calibration accuracy is within ``max_drop`` points of the backbone's is
the one where the calibration sample happened to be luckiest: on new data it breaks the promise
about half the time. Here each candidate setting is a hypothesis "its risk exceeds the target" with
a valid p-value (``bounds.py``: the accuracy drop with labels, the disagreement with the backbone
without), and the candidates are tested in a fixed sequence from conservative to aggressive,
stopping at the first one not rejected: every rejected (certified) setting then keeps its risk at
most the target with probability >= 1 - delta, however many were tested, and the cheapest of them
is chosen.

The order must not depend on the data that certify it. One policy's global thresholds are ordered
by the threshold itself, so all the calibration data certify. Any other search (several policies,
exit selection, per-exit thresholds) chooses its structure and orders its candidates on one part of
the calibration data (``STRUCTURE_SHARE``, a seeded split) and certifies on the rest.

The promise assumes that the calibration images and the images the model will see are exchangeable
(drawn i.i.d. from the same distribution); it says nothing about data that drift away from them.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..configs import check_number
from ..errors import PteenetError
from ..evaluation.cache import ExitCache
from ..evaluation.engine import (
    Point,
    backbone_point,
    evaluate,
    exit_indices,
    pareto,
    search_per_exit,
    select,
    sweep_global,
)
from ..exits import policies as pol
from ..tracing.cost import CostTable
from . import bounds
from .selection import restrict, select_exits, tail_breaks

CONFIDENCE = 0.9  # the default 1 - delta
STRUCTURE_SHARE = 0.3  # of the calibration samples, when a structure has to be chosen first
SPLIT_SEED = 0
PER_EXIT_CANDIDATES = 16  # per-exit settings searched on the structure part (budgets along its front)
ASSUMPTION = ("the calibration images and the images the model will see are exchangeable "
              "(drawn i.i.d. from the same distribution)")
METHOD = ("fixed-sequence testing from conservative to aggressive settings (Learn-then-Test); p-values: "
          "exact trinomial tail with a Berger-Boos bound on the discordance rate (accuracy drop), "
          "exact binomial tail (disagreement)")

Candidate = tuple[str, list[float]]  # (policy, one threshold per exit)
# A candidate on the whole calibration split, with its (n_plus, n_minus) on the certifying samples.
Tested = tuple[Point, tuple[int, int]]


@dataclass
class Guarantee:
    """What was certified, on how many samples, and how the chosen setting fared there."""

    confidence: float
    risk: str  # "accuracy drop" (labels) | "disagreement" (with the backbone; no labels)
    target: float  # a fraction
    bound: float | None  # the chosen setting's upper confidence bound on the certification samples
    observed: float | None  # its risk on the certification samples
    samples: int  # certification samples
    structure_samples: int  # samples that chose the policy, exits and order (0: none needed)
    tested: int
    certified: int

    def promise(self) -> str:
        """One sentence: what the guarantee promises and what it assumes."""
        return (f"With probability at least {self.confidence:.0%} the chosen setting's {self.risk} on new data "
                f"is at most {100 * self.target:g} point{'' if 100 * self.target == 1 else 's'}, provided {ASSUMPTION}.")

    def to_dict(self) -> dict[str, Any]:
        pts = (lambda v: None if v is None else 100 * v)  # noqa: E731 - percentage points, as --max-drop
        return {"confidence": self.confidence, "risk": self.risk, "target_points": 100 * self.target,
                "bound_points": pts(self.bound), "observed_points": pts(self.observed),
                "samples": self.samples, "structure_samples": self.structure_samples, "tested": self.tested,
                "certified": self.certified, "method": METHOD, "promise": self.promise(), "assumption": ASSUMPTION}


@dataclass
class Certified:
    point: Point | None  # the chosen setting on the whole calibration cache; None: nothing certified
    active: list[bool] | None  # exits that decide (exit selection), None: all
    guarantee: Guarantee
    tested: list[Tested] = dataclasses.field(default_factory=list)  # the whole sequence, in order


def check_confidence(value: float) -> None:
    """0 (no guarantee) or a confidence in [0.5, 1)."""
    if value != 0:
        check_number("confidence", value, 0.5, 1, high_open=True,
                     hint="e.g. --confidence 0.9; 0 (or --no-guarantee) chooses without a guarantee")


def risk_counts(cache: ExitCache, exits: np.ndarray) -> tuple[int, int]:
    """(n_plus, n_minus) of the accuracy drop with labels; (disagreements, 0) without."""
    answer = cache.preds[exits, np.arange(cache.num_samples)]
    if cache.labels is None:
        return int((answer != cache.backbone_preds).sum()), 0
    backbone, exit_ok = cache.backbone_preds == cache.labels, answer == cache.labels
    return int((backbone & ~exit_ok).sum()), int((~backbone & exit_ok).sum())


def fixed_sequence(counts: Sequence[tuple[int, int]], n: int, target: float, delta: float, labelled: bool) -> int:
    """How many candidates, in order, are certified: the test stops at the first p-value > delta.
    ``counts``: each candidate's ``risk_counts`` on the ``n`` certifying samples."""
    for i, c in enumerate(counts):
        if bounds.pvalue(c, n, target, delta, labelled) > delta:
            return i
    return len(counts)


def threshold_sequence(policy: str, grid: np.ndarray, num_exits: int) -> list[Candidate]:
    """A policy's global thresholds, conservative (fewest samples leave) first."""
    ts = np.unique(np.asarray(pol.grid_for(policy, grid, num_exits), dtype=np.float64))
    ts = ts[::-1] if pol.get(policy).high_leaves else ts
    return [(policy, [float(t)] * num_exits) for t in ts]


def view_of(cache: ExitCache, active: list[bool] | None, cost: CostTable | None, chained: bool) -> ExitCache:
    return cache if active is None or cost is None else restrict(cache, active, cost, chained)


def choose_structure(part: ExitCache, policies: Sequence[str], grid: np.ndarray, max_drop: float, per_exit: bool,
               cost: CostTable | None, chained: bool, max_tail: float | None = None) -> tuple[list[bool] | None, list[Candidate]]:
    """On the structure part: the policy (and, with ``cost``, the exits) the --no-guarantee rule would pick,
    and that structure's candidates ordered by their cost on this part, dearest first."""
    best: tuple[float, str, list[bool] | None] = (float("inf"), policies[0], None)
    for policy in policies:
        own = pol.grid_for(policy, grid, part.num_exits)
        active, point = None, select(sweep_global(part, policy, own), backbone_point(part), max_drop=max_drop)
        if cost is not None:
            try:
                sel = select_exits(part, cost, chained, policy, grid, max_drop=max_drop, max_tail=max_tail)
                active, point = sel.active, sel.point
            except PteenetError:  # nothing meets the criterion on this part: keep every exit, unless a
                # sample that takes none would then pay over max_tail: then no exit (the backbone alone)
                if tail_breaks(cost, [True] * part.num_exits, chained, max_tail):
                    active = [False] * part.num_exits
        if point is not None and point.cost < best[0]:
            best = (point.cost, policy, active)
    _, policy, active = best
    view = view_of(part, active, cost, chained)
    seq = threshold_sequence(policy, grid, part.num_exits)
    priced = [(p.cost, c) for p, c in zip(sweep_global(view, policy, np.array([c[1][0] for c in seq])), seq)]
    if per_exit and part.num_exits > 1:
        own = pol.grid_for(policy, grid, part.num_exits)
        front = pareto(sweep_global(view, policy, own))
        picks = np.unique(np.linspace(0, len(front) - 1, min(PER_EXIT_CANDIDATES, len(front))).round().astype(int))
        for p in search_per_exit(view, policy, sorted({front[i].cost for i in picks}), own):
            priced.append((p.cost, (policy, list(p.thresholds or []))))
    order = sorted(range(len(priced)), key=lambda i: (-priced[i][0], i))  # stable: ties keep the threshold order
    return active, [priced[i][1] for i in order]


def structure_rows(n: int, seed: int = SPLIT_SEED) -> np.ndarray:
    """The calibration rows (of ``n``, sorted) that choose a structure and never certify: a seeded
    ``STRUCTURE_SHARE`` of them. INT8 programs are quantized on images of these rows too."""
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[:int(round(STRUCTURE_SHARE * n))])


def certify(cache: ExitCache, policies: Sequence[str], grid: np.ndarray, max_drop: float, confidence: float, *,
            per_exit: bool = False, cost: CostTable | None = None, chained: bool = False,
            seed: int = SPLIT_SEED, max_tail: float | None = None, split: bool = False) -> Certified:
    """The cheapest setting certified to keep the accuracy drop (the disagreement without labels)
    within ``max_drop`` points with probability >= ``confidence``. ``cost`` turns exit selection on;
    ``max_tail`` bounds what a sample that takes no exit pays there, as ``select_exits`` does.
    ``split``: certify on the certification share only even where no structure is chosen (an INT8
    program was quantized on images of the structure share: they may not certify it)."""
    target, n = max_drop / 100.0, cache.num_samples
    if len(policies) > 1 or per_exit or cost is not None or split:
        part_rows = structure_rows(n, seed)
        rest_rows = np.setdiff1d(np.arange(n), part_rows)
        part, rest = cache.take(part_rows), cache.take(rest_rows)
        active, candidates = choose_structure(part, policies, grid, max_drop, per_exit, cost, chained, max_tail)
    else:
        part, rest, active = None, cache, None
        candidates = threshold_sequence(policies[0], grid, cache.num_exits)
    rest_view, full_view = view_of(rest, active, cost, chained), view_of(cache, active, cost, chained)
    tested = []
    for policy, ts in candidates:
        point = evaluate(full_view, policy, ts)
        if len(set(ts)) == 1:
            point.kind = "global"
        tested.append((point, risk_counts(rest_view, exit_indices(rest_view, policy, ts))))
    risk = "accuracy drop" if cache.labels is not None else "disagreement"
    return certified_choice(Guarantee(confidence=confidence, risk=risk, target=target, bound=None, observed=None,
                                samples=rest.num_samples, structure_samples=0 if part is None else part.num_samples,
                                tested=0, certified=0), tested, active)


def certified_choice(g: Guarantee, tested: list[Tested], active: list[bool] | None) -> Certified:
    """Fixed-sequence testing of ``tested`` at ``g``'s target and confidence, and the cheapest
    certified setting (its cost and metric on the whole calibration split)."""
    labelled, delta = g.risk == "accuracy drop", 1.0 - g.confidence
    done = fixed_sequence([c for _, c in tested], g.samples, g.target, delta, labelled)
    g.tested, g.certified = min(done + 1, len(tested)), done
    if done == 0:
        return Certified(None, active, g, tested)
    i = min(range(done), key=lambda i: (tested[i][0].cost, -tested[i][0].metric, i))
    chosen, counts = tested[i]
    g.observed = (counts[0] - counts[1]) / max(g.samples, 1)
    g.bound = bounds.upper_bound(counts, g.samples, delta, labelled)
    return Certified(dataclasses.replace(chosen), active, g, tested)


def recertify(rec: dict[str, Any], max_drop: float, n_exits: int) -> tuple[Certified, dict[str, Any]]:
    """The same fixed sequence tested again at another target, from a sweep's ``record`` (the
    candidates' risk counts on the certifying samples): ``export --max-drop`` keeps the guarantee
    without the data. The structure was chosen on other samples than those that certify, so any
    target may be tested on them. Returns the choice and its record, as ``record`` writes it."""
    seq = rec.get("sequence")
    if not seq:
        raise PteenetError("the sweep stored no certified sequence to test another --max-drop on",
                           "re-run pteenet sweep-threshold --max-drop P --write (its guarantee records it)")
    tested = [(Point.from_dict(d, n_exits), (int(d["counts"][0]), int(d["counts"][1]))) for d in seq["candidates"]]
    g = Guarantee(confidence=float(rec["confidence"]), risk=rec["risk"], target=max_drop / 100.0, bound=None,
                  observed=None, samples=int(rec["samples"]), structure_samples=int(rec["structure_samples"]),
                  tested=0, certified=0)
    c = certified_choice(g, tested, seq.get("active_exits"))
    m, labelled = float(seq["backbone_metric"]), g.risk == "accuracy drop"
    bb = Point(None, m if labelled else None, 1.0 if labelled else m, 1.0, 1.0, [], None, "backbone")
    free = [p for p, _ in tested if _drop_points(p, bb) <= max_drop + 1e-9]
    return c, record(c, bb, min(free, key=lambda p: (p.cost, -p.metric)) if free else None, seq.get("active_exits"))


def _drop_points(p: Point, backbone: Point) -> float:
    return 100 * (backbone.metric - p.metric)


def record(c: Certified, backbone: Point, uncertified: Point | None,
           uncertified_active: list[bool] | None) -> dict[str, Any]:
    """The sweep document's ``guarantee``: the certificate, the chosen setting's drop on the whole
    calibration split, and what the --no-guarantee rule would have chosen from the same data."""
    out = c.guarantee.to_dict()
    out["calibration_drop_points"] = None if c.point is None else _drop_points(c.point, backbone)
    out["without_guarantee"] = None if uncertified is None else {
        **{k: v for k, v in uncertified.to_dict().items() if k in ("policy", "kind", "threshold", "cost")},
        "calibration_drop_points": _drop_points(uncertified, backbone), "active_exits": uncertified_active}
    # Every candidate tested, in order, with its counts on the certifying samples (``recertify``).
    out["sequence"] = {"active_exits": c.active, "backbone_metric": backbone.metric,
                       "candidates": [{**p.to_dict(), "counts": list(n)} for p, n in c.tested]}
    return out


def describe(g: dict[str, Any]) -> str:
    """A ``record`` for a person: the bound beside the observed drop, the --no-guarantee choice, the promise."""
    free = g.get("without_guarantee")
    text = (f"Certified: {g['risk']} <= {g['target_points']:g} pt with confidence {g['confidence']:g} (upper bound "
            f"{g['bound_points']:.2f} pt, observed {g['observed_points']:.2f} pt on {g['samples']} calibration images"
            + (f", {g['structure_samples']} others chose the structure" if g.get("structure_samples") else "")
            + f"; {g['calibration_drop_points']:.2f} pt on the whole calibration split)")
    if free:
        text += (f"; without the guarantee the same data allow cost {free['cost']:.3f} at "
                 f"{free['calibration_drop_points']:.2f} pt on calibration, with no promise for new data")
    return text + ". " + g["promise"]
