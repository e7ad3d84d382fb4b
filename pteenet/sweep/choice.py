"""How a sweep picks its point: the criterion on the curve, exit selection, the guarantee, and the
no-exit tail checked on the clock.

A profile prices a sample that takes no exit from parts timed one by one; run together they cost
more (measured on CIFAR ResNet-56 at batch 1: 1.200x against 1.157x predicted, over the 1.2 bound
the prediction kept: ``settings.eager_b1.tail_check`` in ``benchmarks/results/cifar10_time.json``). So where the sweep timed its own profile, the chosen model's no-exit path is
then measured against the plain backbone (``timing.measure_tail``), and while it pays more than
``max_tail`` the predicted bound is tightened by the ratio of measured to predicted overhead and
the choice is made again. The bound then holds as measured on this machine, or the sweep says by how
much it does not.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import numpy as np
import torch

from ..distributed import ALONE, Group, from_main
from ..errors import PteenetError
from ..evaluation.cache import ExitCache
from ..evaluation.engine import Point, backbone_point, select
from ..exits.chain import computed_branches
from ..progress import Sink
from ..runtime import timing
from ..runtime.model import EarlyExitModel
from .guarantee import certify, record
from .per_class import certify_per_class, chosen_level
from .pricing import Pricing
from .selection import Selection, backbone_only, better, select_exits, tail_breaks


class SweepConfig(Protocol):
    """What choosing reads of ``run.SweepConfig`` (which imports this module, so not imported here)."""

    max_drop: float | None
    budget: float | None
    confidence: float
    per_exit: bool
    per_class: bool
    select_exits: bool
    max_tail: float | None
    profile: str | None
    deploy_runtime: str
    deploy_batch_size: int
    quantize: str | None

Choice = tuple[Point | None, list[bool] | None, dict[str, Any] | None]
TAIL_TRIES = 4  # measurements at most; each takes about 3 s (timing.measure_tail)


def _with_selection(cache: ExitCache, model: EarlyExitModel, policies: list[str], grid: np.ndarray,
                    cfg: SweepConfig, chosen: Point | None, pricing: Pricing) -> tuple[Point | None, list[bool] | None]:
    """The chosen point again with exit selection, per policy (global thresholds); kept unless
    ``chosen`` beats it (is cheaper within max_drop, or more accurate within budget)."""
    best: Selection | None = None
    for policy in policies:
        try:
            sel = select_exits(cache, pricing, model.chained, policy, grid, cfg.max_drop, cfg.budget, cfg.max_tail)
        except PteenetError:
            continue
        if best is None or better(sel.point, best.point, cfg.budget is not None):
            best = sel
    # Every exit deciding is a candidate too, if its tail keeps the bound.
    whole = chosen if chosen is not None and not tail_breaks(pricing, [True] * cache.num_exits, model.chained, cfg.max_tail) else None
    if best is None and whole is None and chosen is not None:
        return backbone_only(cache, chosen, pricing, model.chained)[:2]  # no set of exits keeps the tail bound
    # At equal cost and accuracy the selection still wins: fewer exits are fewer decisions at run time.
    if best is None or (whole is not None and better(whole, best.point, cfg.budget is not None)):
        return whole, None
    return best.point, best.active


def choose(cache: ExitCache, points: list[Point], model: EarlyExitModel, policies: list[str], grid: np.ndarray,
           cfg: SweepConfig, pricing: Pricing) -> Choice:
    """The point the criterion picks (None: none meets it), the exits that stay active (``--select-exits``),
    and with a confidence the certified choice instead and its record (the --no-guarantee choice beside it)."""
    chosen = select(points, backbone_point(cache), cfg.budget, cfg.max_drop)
    chosen, active = _with_selection(cache, model, policies, grid, cfg, chosen, pricing) if cfg.select_exits \
        else (chosen, None)
    if cfg.max_drop is None or not cfg.confidence:
        return chosen, active, None
    cost = pricing if cfg.select_exits else None
    if cfg.per_class:
        cert, family = certify_per_class(cache, policies, grid, cfg.max_drop, cfg.confidence, cost=cost, chained=model.chained,
                                         max_tail=cfg.max_tail, num_classes=model.info.num_classes)
        rec = record(cert, backbone_point(cache), chosen, active)
        rec["per_class"] = {**family.to_dict(), "level": chosen_level(family, cert.point)}
        return cert.point, cert.active, rec
    cert = certify(cache, policies, grid, cfg.max_drop, cfg.confidence, per_exit=cfg.per_exit,
                   cost=cost, chained=model.chained, max_tail=cfg.max_tail,
                   split=cfg.quantize is not None)  # INT8: quantized on structure-share images, which may not certify
    return cert.point, cert.active, record(cert, backbone_point(cache), chosen, active)


def guard_tail(pick: Callable[[float], Choice], measure: Callable[[list[bool]], float], pricing: Pricing,
               chained: bool, num_exits: int, max_tail: float, tries: int = TAIL_TRIES) -> tuple[Choice, dict[str, Any]]:
    """``pick(bound)`` chooses under a predicted no-exit bound; ``measure(active)`` times the no-exit
    path of that choice as a ratio to the backbone. Starting from ``max_tail``, while the measured
    tail is over ``max_tail`` the bound is scaled so that the overhead, measured as it was
    predicted, would fit, and the choice is made again. Returns the last choice and the record."""
    bound, attempts = max_tail, []
    choice = pick(bound)
    for attempt in range(tries):
        if choice[0] is None:  # nothing chosen: no model to measure
            break
        computed = computed_branches(choice[1] or [True] * num_exits, chained)
        if not any(computed):  # the backbone alone
            attempts.append({"bound": bound, "computed": 0, "predicted": 1.0, "measured": None})
            break
        predicted = pricing.costs(computed)[-1]
        measured = measure(choice[1] or [True] * num_exits)
        attempts.append({"bound": bound, "computed": sum(computed), "predicted": predicted, "measured": measured})
        if measured <= max_tail or predicted <= 1.0 or attempt == tries - 1:
            break
        # Overhead measured = (measured - 1) / (predicted - 1) x predicted: allow what fits max_tail.
        bound = max(1.0, min(1.0 + (max_tail - 1.0) * (predicted - 1.0) / (measured - 1.0), predicted - 1e-6))
        choice = pick(bound)
    last = attempts[-1] if attempts else {}
    held = last.get("measured") is None or last["measured"] <= max_tail
    return choice, {"max_tail": max_tail, "attempts": attempts, "held": held}


def tail_meter(model: EarlyExitModel, cfg: SweepConfig, cost_model: dict[str, Any], device: torch.device,
               group: Group = ALONE) -> Callable[[list[bool]], float] | str | None:
    """How this sweep measures a choice's no-exit tail (``timing.measure_tail`` at the deploy batch
    size, rank 0's figure on every rank), or why it cannot: a sentence for the record. None: no
    tail bound applies (no exit selection, or no ``max_tail``)."""
    if not cfg.select_exits or cfg.max_tail is None:
        return None
    if cost_model.get("kind") != "time":
        return "priced in MACs: the tail bound is in MACs, not measured"
    if cfg.profile is not None:
        return f"priced with the profile in {cfg.profile}: the tail holds as predicted there, not measured here"
    if cfg.deploy_runtime != "eager":
        return "priced in ONNX Runtime: the tail bound holds as predicted (pteenet bench --runtime onnxruntime measures it)"
    x = torch.randn(cfg.deploy_batch_size, *model.info.preprocess.input_size, device=device,
                    generator=torch.Generator(device=device).manual_seed(1))

    def measure(active: list[bool]) -> float:
        return float(from_main(timing.measure_tail(model, x, active)["ratio"], group))
    return measure


def choose_checked(cache: ExitCache, points: list[Point], model: EarlyExitModel, policies: list[str], grid: np.ndarray,
                   cfg: SweepConfig, pricing: Pricing, meter: Callable[[list[bool]], float] | str | None) -> tuple[Choice, dict[str, Any] | None]:
    """``choose``, with the no-exit tail measured and the bound tightened where it does not hold
    (``guard_tail``); the record says what was measured, or why nothing was (``tail_meter``)."""
    if meter is None or isinstance(meter, str):
        choice = choose(cache, points, model, policies, grid, cfg, pricing)
        return choice, (None if meter is None else {"max_tail": cfg.max_tail, "attempts": [], "held": None, "why": meter})

    def pick(bound: float) -> Choice:
        return choose(cache, points, model, policies, grid, dataclasses.replace(cfg, max_tail=bound), pricing)
    assert cfg.max_tail is not None
    return guard_tail(pick, meter, pricing, model.chained, cache.num_exits, cfg.max_tail)


def tail_notes(tail: dict[str, Any], sink: Sink, warn: Callable[[str], None]) -> None:
    """What the no-exit tail measured, and the predicted bound it took (``choice.guard_tail``)."""
    timed = [a for a in tail["attempts"] if a["measured"] is not None]
    if not timed:
        return
    first, last = timed[0], tail["attempts"][-1]
    text = (f"a sample that takes no exit measured {first['measured']:.3f}x the backbone here "
            f"(predicted {first['predicted']:.3f}x, bound {tail['max_tail']:g}x)")
    if len(tail["attempts"]) > 1:
        text += (f"; with the predicted bound tightened to {last['bound']:.3f}x, "
                 + (f"{last['measured']:.3f}x" if last["measured"] is not None else "no exit computed (the backbone alone)"))
    sink.note(text)
    if not tail["held"]:
        warn(f"the no-exit path still measures {last['measured']:.3f}x the backbone, over --max-tail "
             f"{tail['max_tail']:g} after {len(tail['attempts'])} tries; pass a lower --max-tail or attach fewer exits")
