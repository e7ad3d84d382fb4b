"""EENet's exit scheduler fitted on an exit cache, simulated on another, and certified.

1. Utilities (``fit_utilities``): the scheduler of ``exits/eenet.py`` trained by binary cross-entropy
   toward "exit j is right" (vs labels; vs the backbone's answer without labels), exit by exit, each
   reading the utilities of the exits before it.
2. Assignment (``_Assignment.fractions``): a linear map of a sample's utilities (and 1 for the backbone's
   end) to a softmax over the exits, trained with KL(utilities normalised over exits || assignment)
   plus |expected cost - budget| / budget. Its mean per exit is the share of samples that exit takes.
3. Thresholds (``thresholds_for``): exit by exit, of the samples still in flight, the share assigned
   to that exit with the highest score (the utility before its clamp) leaves: the threshold lies
   between the last that leaves and the first that stays. The backbone's end takes the rest.

Certification (``certify_eenet``) fits on the structure share of the calibration data and tests a
fixed sequence of budgets, from the most conservative (no sample leaves) down, on the rest, with
``guarantee.py``'s Learn-then-Test machinery. Costs are the cache's: MACs or predicted time.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import PteenetError
from ..evaluation.cache import ExitCache
from ..evaluation.engine import Point, backbone_point, below_cheapest, point_from_exits, select
from ..exits.eenet import ALWAYS_EXIT, FEATURES, NAME, NEVER_EXIT, Scheduler, features, fp32_threshold
from . import bounds
from .guarantee import SPLIT_SEED, STRUCTURE_SHARE, Certified, Guarantee, Tested, certified_choice, record, risk_counts

MIN_FIT_SAMPLES = 200  # samples the scheduler is fitted on, at least (about 10 per exit of a 27-exit model, and 2 per weight of one exit)
# Budgets in the certified sequence, evenly spaced from the most conservative to the cheapest; with
# 40, CIFAR ResNet-56 saved fewer MACs (benchmarks/results/cifar10_eenet-budgets40.json).
BUDGETS = 80
MAX_ITER = 60  # L-BFGS iterations per fit (from a least-squares start, or the last budget's assignment)
L2 = 1e-4  # a little weight decay on the utility maps: separable exits would otherwise drive them to infinity
BUDGET_WEIGHT = 100.0  # weight of |expected cost - budget| / budget against the KL term
BUDGET_SLACK = 0.01  # a fitted setting may miss its budget by this much (of the backbone) before we say so


@dataclass
class Setting:
    """A fitted scheduler and its thresholds: what a model with ``--policy eenet`` runs."""

    scheduler: Scheduler
    thresholds: list[float]  # one per model exit; exits the scheduler does not cover never pass
    budget: float | None = None  # the budget the thresholds were fitted for


def check_options(policy: str, per_exit: bool, select_exits: bool, quantize: str | None = None) -> None:
    """The sweep options that do not apply to policy eenet."""
    if policy == NAME and (per_exit or select_exits):
        raise PteenetError("--policy eenet sets its own threshold per exit and decides at every exit",
                           "drop --per-exit and --select-exits")
    check_quantize(policy, quantize)


def check_quantize(policy: str, quantize: str | None) -> None:
    """Policy eenet with INT8, refused by the sweep and the export alike: the scheduler is fitted and
    its thresholds certified on the FP32 exits' logits (the INT8 programs' caches keep none), and a
    threshold certified there is no guarantee for the INT8 exits' logits the scheduler would read."""
    if policy == NAME and quantize:
        raise PteenetError("policy eenet's scheduler is fitted on the FP32 model's exit logits, not the INT8 programs'",
                           "drop --quantize, or use another --policy")


def min_calibration(share: float = STRUCTURE_SHARE) -> int:
    """The smallest calibration split whose structure share holds ``MIN_FIT_SAMPLES``."""
    return math.ceil(MIN_FIT_SAMPLES / share)


def _logits(cache: ExitCache, exits: Sequence[int]) -> list[torch.Tensor]:
    if cache.logits is None:
        raise PteenetError("the exit cache holds no logits: the eenet policy needs them",
                           "build the cache with build_cache(..., logits=True) (the sweep does so for --policy eenet)")
    return [torch.from_numpy(cache.logits[k]) for k in exits]


def _targets(cache: ExitCache, exits: Sequence[int]) -> torch.Tensor:
    """[N, m]: 1 where the exit is right (vs labels), or agrees with the backbone (no labels)."""
    ref = cache.labels if cache.labels is not None else cache.preds[-1]
    return torch.from_numpy((cache.preds[list(exits)] == ref[None]).T.astype(np.float64))


def scores(cache: ExitCache, scheduler: Scheduler) -> np.ndarray:
    """[N, m] float64: each deciding exit's decision score (its utility before the clamp) for each
    sample, as the runtime computes it."""
    with torch.no_grad():
        return scheduler.scores(_logits(cache, scheduler.exits)).numpy()


def _lbfgs(params: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``params`` minimising ``objective`` by L-BFGS (torch's: scipy's calls a multithreaded BLAS
    on vectors of a few dozen numbers, 40 times slower on a busy machine)."""
    params = params.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([params], lr=1, max_iter=MAX_ITER, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective(params)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return params.detach()


def _bce_fit(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Weights v (last: the bias) minimising the binary cross-entropy of clamp(x v + b, 0, 1)
    toward ``y``. The clamp passes no gradient where it saturates, so a wrong answer
    clamped to 1 (or a right one to 0) would never be corrected: past the clamp on the wrong side
    the loss goes on linearly with the slope it had there (on the right side it is flat, as the
    clamp makes it). The clamp is kept a little inside (0, 1) for the log."""
    xb = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    eps = 1e-3

    def objective(v: torch.Tensor) -> torch.Tensor:
        z = xb @ v
        q = z.clamp(eps, 1 - eps)
        bce = -(y * q.log() + (1 - y) * (-q).log1p())
        wrong = ((z > 1 - eps) & (y < 0.5)) | ((z < eps) & (y > 0.5))
        slope = ((q - y) / (q * (1 - q))).detach()
        return (bce + torch.where(wrong, slope * (z - q), 0.0)).mean() + L2 * (v[:-1] @ v[:-1])

    # From the least-squares fit (closed form, convex): most utilities then start inside (0, 1),
    # where the cross-entropy is smooth; from q = 0.5 everywhere L-BFGS ends in poor local minima.
    v0 = torch.linalg.lstsq(xb, y[:, None]).solution[:, 0]
    return _lbfgs(v0, objective)


def fit_utilities(cache: ExitCache, exits: Sequence[int] | None = None) -> Scheduler:
    """The utility maps, fitted on ``cache`` (every exit deciding unless ``exits`` says which),
    exit by exit: exit j's map is fitted with the utilities of the exits before it fixed."""
    exits = list(range(cache.num_exits)) if exits is None else list(exits)
    if cache.num_samples < MIN_FIT_SAMPLES:
        raise PteenetError(f"EENet's scheduler needs at least {MIN_FIT_SAMPLES} samples to fit on, got {cache.num_samples}",
                           "calibrate on more images")
    logits, y = _logits(cache, exits), _targets(cache, exits)
    sched = Scheduler(exits, cache.logits.shape[2])  # type: ignore[union-attr]
    c = sched.num_classes
    util: torch.Tensor | None = None
    with torch.no_grad():
        for j, z in enumerate(logits):
            f = features(z)
            v = _bce_fit(f if util is None else torch.cat([f, util], 1), y[:, j])
            sched.w1[j] = v[:c]
            sched.w2[j, :FEATURES] = v[c:c + FEATURES]
            sched.w2[j, FEATURES:FEATURES + j] = v[c + FEATURES:-1]
            sched.b[j] = float(v[-1])
            _, util = sched.step(exits[j], z, util)  # the runtime's own utility feeds the next exit
    return sched.requires_grad_(False)


def _exit_costs(cache: ExitCache, exits: Sequence[int]) -> np.ndarray:
    """The cost of leaving at each deciding exit, then of running to the end."""
    return np.append(cache.costs[list(exits)], cache.costs[-1])


class _Assignment:
    """The assignment network (a linear map of the utilities, softmax over the exits and the end),
    kept between budgets so each fit starts from the last (warm start)."""

    def __init__(self, util: np.ndarray, costs: np.ndarray) -> None:
        # The utilities clamped, as the paper's q (``util``: the decision scores, before the clamp).
        self.x = torch.from_numpy(np.concatenate([np.clip(util, 0.0, 1.0), np.ones((util.shape[0], 1))], 1))
        self.costs = torch.from_numpy(np.asarray(costs, dtype=np.float64))
        self.target = self.x / self.x.sum(1, keepdim=True).clamp_min(1e-12)
        k = self.x.shape[1]
        self.params = torch.zeros(k * k + k, dtype=torch.float64)

    def _probs(self, v: torch.Tensor) -> torch.Tensor:
        k = self.x.shape[1]
        return torch.softmax(self.x @ v[:k * k].reshape(k, k) + v[k * k:], 1)

    def fractions(self, budget: float) -> np.ndarray:
        """The mean assignment per exit (and the end) after fitting toward ``budget``."""
        logt = self.target.clamp_min(1e-12).log()

        def objective(v: torch.Tensor) -> torch.Tensor:
            logr = torch.log_softmax(self.x @ v[:self.x.shape[1] ** 2].reshape(self.x.shape[1], -1)
                                     + v[self.x.shape[1] ** 2:], 1)
            kl = (self.target * (logt - logr)).sum(1).mean()
            spent = (logr.exp() @ self.costs).mean()
            return kl + BUDGET_WEIGHT * (spent - budget).abs() / budget

        self.params = _lbfgs(self.params, objective)
        with torch.no_grad():
            return self._probs(self.params).mean(0).numpy()


def thresholds_for(util: np.ndarray, fractions: np.ndarray) -> list[float]:
    """Per deciding exit, the threshold that lets at most its share (``fractions[j]`` of all
    samples) of those still in flight leave, those with the highest score. Samples tied at the
    cut cannot be told apart at run time: they all stay."""
    n, m = util.shape
    flight = np.ones(n, dtype=bool)
    out = []
    for j in range(m):
        q = np.sort(util[flight, j])[::-1]
        take = min(int(round(fractions[j] * n)), q.size)
        t = NEVER_EXIT
        if take == q.size and take:
            t = ALWAYS_EXIT
        elif take:
            # The lowest float32 value above q[take] (the first that stays), at most the midpoint.
            above = q[q > q[take]]
            if above.size:
                t = fp32_threshold((above[-1] + q[take]) / 2)
                while t <= q[take]:
                    t = float(np.nextafter(np.float32(t), np.float32(np.inf)))
        out.append(float(t))
        flight &= ~(util[:, j] >= t)
    return out


def exit_indices(cache: ExitCache, setting: Setting, util: np.ndarray | None = None) -> np.ndarray:
    """[N] where each sample leaves (E: it runs to the end), as the runtime decides."""
    sched = setting.scheduler
    util = scores(cache, sched) if util is None else util
    passed = util >= np.array([setting.thresholds[k] for k in sched.exits])[None]
    first = np.where(passed.any(1), passed.argmax(1), len(sched.exits))
    return np.append(np.array(sched.exits, dtype=np.int64), cache.num_exits)[first]


def evaluate(cache: ExitCache, setting: Setting, util: np.ndarray | None = None) -> Point:
    """The setting on a cache: its accuracy, agreement and cost there."""
    return point_from_exits(cache, exit_indices(cache, setting, util), list(setting.thresholds), NAME, "per-exit")


def add_test_report(doc: dict, cache: ExitCache | None, setting: Setting | None) -> None:
    """The setting on the test split ``cache`` into the sweep document's ``chosen["test"]`` (where
    there is a chosen setting and a test split)."""
    if cache is None or setting is None or doc.get("chosen") is None:
        return
    bb = backbone_point(cache)
    doc["chosen"]["test"] = {**evaluate(cache, setting).to_dict(),
                             "backbone": {"accuracy": bb.accuracy, "agreement": bb.agreement, "cost": bb.cost}}


def _setting(cache: ExitCache, sched: Scheduler, per_exit: list[float], budget: float) -> Setting:
    ts = [NEVER_EXIT] * cache.num_exits
    for k, t in zip(sched.exits, per_exit):
        ts[k] = t
    return Setting(sched, ts, budget)


def fit(cache: ExitCache, budget: float, exits: Sequence[int] | None = None) -> Setting:
    """The scheduler and its thresholds fitted on ``cache`` for a mean cost of ``budget`` (a
    fraction of the backbone, in the cache's cost unit). Refuses a budget below the cheapest
    reachable cost, and one the fitted thresholds miss by more than ``BUDGET_SLACK``, naming the
    nearest budget they meet."""
    exits = list(range(cache.num_exits)) if exits is None else list(exits)
    costs = _exit_costs(cache, exits)
    if budget < costs.min() - 1e-9:
        raise below_cheapest(budget, float(costs.min()))
    sched = fit_utilities(cache, exits)
    util = scores(cache, sched)
    setting = _setting(cache, sched, thresholds_for(util, _Assignment(util, costs).fractions(budget)), budget)
    reached = evaluate(cache, setting, util).cost
    if reached > budget + BUDGET_SLACK:
        raise PteenetError(f"EENet's scheduler cannot meet budget {budget:g}: its thresholds cost {reached:.4f} on these samples",
                           f"the nearest budget it meets is {math.ceil(reached * 1e4) / 1e4:g}")
    return setting


def budget_sequence(cache: ExitCache, exits: Sequence[int], count: int = BUDGETS) -> np.ndarray:
    """From the most conservative budget (every sample runs to the end) down to the cheapest."""
    costs = _exit_costs(cache, exits)
    return np.linspace(costs[-1], costs.min(), count)


@dataclass
class CertifiedEENet:
    certified: Certified  # as ``guarantee.certify`` returns it: the point, the guarantee, the tested sequence
    setting: Setting | None  # the chosen setting; None when nothing was certified
    settings: list[Setting]  # every tested setting, in order


def certify_eenet(cache: ExitCache, max_drop: float, confidence: float, *, exits: Sequence[int] | None = None,
                  seed: int = SPLIT_SEED, count: int = BUDGETS) -> CertifiedEENet:
    """Fit on the structure share, then test budgets from the most conservative down on the rest
    (fixed-sequence, Learn-then-Test) and take the cheapest certified setting (its cost on the whole
    calibration cache). Testing stops at the first budget not certified: later ones cannot be.
    ``exits``: the deciding exits (default all); price the cache for them first
    (``selection.restrict``), as the runtime computes only the branches they need."""
    n, exits = cache.num_samples, list(range(cache.num_exits)) if exits is None else list(exits)
    k = int(round(STRUCTURE_SHARE * n))
    if k < MIN_FIT_SAMPLES:
        raise PteenetError(f"--policy eenet needs at least {min_calibration()} calibration images ({MIN_FIT_SAMPLES} "
                           f"to fit the scheduler on, {STRUCTURE_SHARE:.0%} of them), got {n}",
                           "calibrate on more images (--calibration SPEC), or use a fixed policy such as max-softmax")
    perm = np.random.default_rng(seed).permutation(n)
    part_idx, rest_idx = np.sort(perm[:k]), np.sort(perm[k:])
    part, rest = cache.take(part_idx), cache.take(rest_idx)
    sched = fit_utilities(part, exits)
    util = scores(cache, sched)
    assign = _Assignment(util[part_idx], _exit_costs(cache, exits))
    target, delta = max_drop / 100.0, 1.0 - confidence
    labelled = cache.labels is not None
    g = Guarantee(confidence=confidence, risk="accuracy drop" if labelled else "disagreement", target=target,
                  bound=None, observed=None, samples=rest.num_samples, structure_samples=part.num_samples,
                  tested=0, certified=0)
    tested: list[Tested] = []
    settings: list[Setting] = []
    for budget in budget_sequence(cache, exits, count):
        setting = _setting(cache, sched, thresholds_for(util[part_idx], assign.fractions(float(budget))), float(budget))
        counts = risk_counts(rest, exit_indices(rest, setting, util[rest_idx]))
        tested.append((evaluate(cache, setting, util), counts))
        settings.append(setting)
        if bounds.pvalue(counts, rest.num_samples, target, delta, labelled) > delta:
            break  # the fixed sequence stops here; the budgets after it are never tested
    cert = certified_choice(g, tested, None)
    chosen = None
    if cert.point is not None:
        chosen = next(s for (p, _), s in zip(tested, settings) if p.thresholds == cert.point.thresholds)
    return CertifiedEENet(cert, chosen, settings)


def curve(cache: ExitCache, scheduler: Scheduler, count: int = BUDGETS) -> list[tuple[Point, Setting]]:
    """The scheduler's thresholds for every budget of ``budget_sequence``, fitted and measured on ``cache``."""
    util = scores(cache, scheduler)
    assign = _Assignment(util, _exit_costs(cache, scheduler.exits))
    out = []
    for budget in budget_sequence(cache, scheduler.exits, count):
        setting = _setting(cache, scheduler, thresholds_for(util, assign.fractions(float(budget))), float(budget))
        out.append((evaluate(cache, setting, util), setting))
    return out


@dataclass
class Choice:
    """What a sweep with ``--policy eenet`` found: its curve, the chosen point and setting, and the
    guarantee's record (``guarantee.record``) where one was asked for."""

    points: list[Point]
    chosen: Point | None
    setting: Setting | None
    guarantee: dict | None = None


def sweep_eenet(cache: ExitCache, *, budget: float | None = None, max_drop: float | None = None,
                confidence: float = 0.0) -> Choice:
    """The sweep's work for policy eenet. With ``max_drop`` and a ``confidence``: the certified
    setting (``certify_eenet``) and its curve, the sequence it tested. Otherwise the scheduler is
    fitted on the whole calibration cache: at ``budget`` (``fit``), by ``max_drop`` the cheapest
    setting of its curve within the drop, or, without a criterion, the curve alone."""
    if max_drop is not None and confidence:
        c = certify_eenet(cache, max_drop, confidence)
        points = [p for p, _ in c.certified.tested]
        free = select(points, backbone_point(cache), max_drop=max_drop)
        return Choice(points, c.certified.point, c.setting, record(c.certified, backbone_point(cache), free, None))
    if cache.num_samples < MIN_FIT_SAMPLES:
        raise PteenetError(f"--policy eenet needs at least {MIN_FIT_SAMPLES} calibration images to fit its scheduler on, "
                           f"got {cache.num_samples}", "calibrate on more images (--calibration SPEC), or use a fixed policy such as max-softmax")
    if budget is not None:
        setting = fit(cache, budget)
        return Choice([p for p, _ in curve(cache, setting.scheduler)], evaluate(cache, setting), setting)
    pairs = curve(cache, fit_utilities(cache))
    points = [p for p, _ in pairs]
    chosen = None if max_drop is None else select(points, backbone_point(cache), max_drop=max_drop)
    setting = None if chosen is None else next(s for p, s in pairs if p is chosen)
    return Choice(points, chosen, setting)
