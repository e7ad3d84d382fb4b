"""A measured cost model: where one batch's time goes, and what each exit costs on the clock.

The MAC ratio is what early exit would save if every MAC took the same time. They do not: on a
CPU a ResNet's first, high-resolution stage takes more time per MAC than its last (measured:
``best_resnet56.timing`` in benchmarks/results/cifar10_resnet.json), so leaving early saves less time than MACs; and a pooled branch that costs 0.1% of the MACs takes a few
percent of the time (pooling reads the whole tap, and is memory-bound), at batch 1 more (each op's
fixed cost). ``profile`` measures, for one batch size, every backbone stage, every computed branch,
one decision (score, comparison, the one value read back) and, at batch > 1, the row compaction
after an exit, with the machine it ran on. ``TimeProfile.costs`` then prices a sample that leaves
at exit k in predicted time as a fraction of the plain backbone's, exactly as ``CostTable.costs``
prices it in MACs, so the sweep and exit selection can price points in time (``--cost time``) and
``bench`` can split the gap between the MAC ratio and the measured time ratio.

The prediction scales every part linearly with the rows still in flight, which holds at large
batches; at batch 1 it is the mean time over samples, not a latency percentile.
"""
from __future__ import annotations

import itertools
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import PteenetError
from ..exits import lean, policies
from ..exits.chain import Carry, exit_step
from .model import EarlyExitModel


def tune_allocator() -> str | None:
    """Keep freed activation memory in the process instead of returning it to the OS.

    glibc serves large blocks (a 256-image activation of 16 MB) with mmap and frees them with munmap,
    so every new activation pays page faults. On CIFAR ResNet-56 at batch 256 on this project's CPU
    machine that slowed eager inference, and a traced graph, whose frees come in a slightly
    different order, more (``benchmarks/stage_profile.py`` measures both: ``benchmarks/results/stage_profile.json``). Raising glibc's mmap and trim thresholds removes both
    effects. It changes this process only; returns a description, or None where glibc is absent.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    if libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 1 << 30):
        return "glibc mallopt: mmap threshold 32 MiB, trim threshold 1 GiB"
    return None


def machine() -> dict[str, Any]:
    """What a profile was measured on: its prices hold there only."""
    return {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "runtime": "eager"}


@dataclass
class TimeProfile:
    batch_size: int
    stage_ms: list[float]  # the E+1 stages, each on the whole batch
    branch_ms: list[float]  # per exit; 0.0 for a branch the runtime does not compute
    backbone_ms: float | None = None  # the plain backbone on the same batch, one call (not a reference)
    decision_ms: float = 0.0  # one exit's decision: score, comparison, the value read back
    compaction_ms: list[float] = field(default_factory=list)  # per exit: selecting the rows that stay (batch > 1)
    machine: dict[str, Any] = field(default_factory=dict)
    load_average: float | None = None

    @property
    def reference_ms(self) -> float:
        """What ratios divide by: the stages' sum, timed the same way as the branches (short calls,
        round-robin). The whole backbone timed as one long call (``backbone_ms``, recorded to show
        what splitting costs) is not comparable on a shared machine: a 20 ms call is preempted by
        other processes far more often than a 0.3 ms one, which would make every exit look cheap."""
        return sum(self.stage_ms)

    def costs(self, computed: Sequence[bool] | None = None) -> list[float]:
        """Per exit, then the end: the predicted time of a sample that leaves there, as a fraction
        of the plain backbone's (``CostTable.costs`` in time). A computed branch costs its branch, its
        decision and, at batch > 1, the compaction after it; ``computed`` None: the branches profiled."""
        flags = [h > 0 for h in self.branch_ms] if computed is None else list(computed)
        ref, out, passed, before = self.reference_ms, [], 0.0, 0.0
        for k, c in enumerate(flags):
            before += self.stage_ms[k]
            if c:
                passed += self.branch_ms[k] + self.decision_ms
            out.append((before + passed) / ref)
            if c and self.compaction_ms:
                passed += self.compaction_ms[k]  # paid only by the rows that go on
        return out + [(before + self.stage_ms[-1] + passed) / ref]

    def costs_paper(self) -> list[float]:
        """The paper's convention (prefix and the exit's own branch only), in time."""
        ref, prefix = self.reference_ms, list(itertools.accumulate(self.stage_ms))
        return [(prefix[k] + h + self.decision_ms) / ref for k, h in enumerate(self.branch_ms)] + [prefix[-1] / ref]

    def ratios(self, fractions: Sequence[float]) -> dict[str, float]:
        """Time ratios to the whole backbone for exit ``fractions`` (E+1, the last: ran to the end):
        with free exits (``ideal``) and with every part priced (``predicted``)."""
        ref, prefix = self.reference_ms, list(itertools.accumulate(self.stage_ms))
        ideal = sum(f * p for f, p in zip(fractions, prefix)) / ref
        predicted = sum(f * c for f, c in zip(fractions, self.costs()))
        return {"ideal_time_ratio": ideal, "predicted_time_ratio": predicted}

    def to_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "stage_ms": self.stage_ms, "branch_ms": self.branch_ms,
                "backbone_ms": self.backbone_ms, "decision_ms": self.decision_ms,
                "compaction_ms": self.compaction_ms, "machine": self.machine, "load_average": self.load_average}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TimeProfile":
        """Reads profiles written before ``branch_ms`` was named, whose key is ``head_ms``."""
        branch_ms = d["branch_ms"] if "branch_ms" in d else d["head_ms"]
        return cls(int(d["batch_size"]), list(d["stage_ms"]), list(branch_ms), d.get("backbone_ms"),
                   float(d.get("decision_ms", 0.0)), list(d.get("compaction_ms") or []), dict(d.get("machine") or {}),
                   d.get("load_average"))


def read_profile(path: str, num_exits: int, batch_size: int) -> TimeProfile:
    """A ``TimeProfile`` from a file: the profile itself (``to_dict``), or a document that holds
    one: a sweep's ``sweep.json`` (``cost_model.profile``) or a ``cifar10_time.py`` summary
    (``profiles``, the one for ``batch_size``). It must price every stage and every branch of a
    model with ``num_exits`` exits, for ``batch_size``: exit selection would take an unpriced
    branch for free."""
    hint = "give sweep.json of a sweep that measured it, or a TimeProfile JSON (TimeProfile.to_dict)"
    try:
        raw = json.loads(Path(path).read_text())
        if "cost_model" in raw:
            raw = raw["cost_model"]["profile"]
        elif "profiles" in raw:
            raw = raw["profiles"][str(batch_size)]
        prof = TimeProfile.from_dict(raw)
    except FileNotFoundError:
        raise PteenetError(f"no profile file {path}", hint) from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PteenetError(f"{path} holds no time profile ({type(e).__name__}: {e})", hint) from None
    if len(prof.stage_ms) != num_exits + 1 or len(prof.branch_ms) != num_exits:
        raise PteenetError(f"{path} prices {len(prof.branch_ms)} exits; this model has {num_exits}",
                           "profile the same attached model")
    if prof.batch_size != batch_size:
        raise PteenetError(f"{path} was measured at batch {prof.batch_size}, not {batch_size}",
                           f"pass --deploy-batch-size {prof.batch_size}, or a profile measured at {batch_size}")
    if unpriced := [k for k, h in enumerate(prof.branch_ms) if h <= 0]:
        raise PteenetError(f"{path} does not price the branches of exits {unpriced}",
                           "use a profile measured with every branch computed (the sweep's own, in sweep.json)")
    return prof


def _round_robin(calls: dict[Any, Callable[[], Any]], repeats: int, warmup: int) -> dict[Any, float]:
    """Median ms of each call over ``repeats`` rounds, taking turns, so that other load on the
    machine hits every part alike."""
    times: dict[Any, list[float]] = {key: [] for key in calls}
    for r in range(warmup + repeats):
        for key, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            if r >= warmup:
                times[key].append(time.perf_counter() - t0)
    return {key: 1e3 * statistics.median(v) for key, v in times.items()}


def _full_pass(model: EarlyExitModel, x: torch.Tensor, computed: list[bool],
               segments: dict[tuple[str, int], list[float]]) -> None:
    """One pass through every stage and computed branch in the runtime's order, each segment timed
    where it runs: a branch then finds its weights as cold as in a real pass (timed alone and
    repeated, 27 branches' weights stay in cache and look cheaper than they are at batch 1)."""
    state: tuple[Any, ...] = (x,)
    carry = Carry()
    stages = model.stages.modules
    context = lean.context()
    for k, stage in enumerate(stages[:-1]):
        t0 = time.perf_counter()
        out = stage(*state)
        t1 = time.perf_counter()
        state = out[:-1]
        segments[("stage", k)].append(t1 - t0)
        if computed[k]:
            if x.shape[0] == 1:  # as the runtime runs it (``EarlyExitModel.step_one``)
                _, _, carry = model.step_one(k, out[-1], carry, context)
            else:
                _, _, _, carry = exit_step(model.branches[k], model.ensemble, k, out[-1], carry)
            segments[("head", k)].append(time.perf_counter() - t1)
    t0 = time.perf_counter()
    stages[-1](*state)
    segments[("stage", len(stages) - 1)].append(time.perf_counter() - t0)


def _decision(rule: policies.Policy, logits: torch.Tensor, conf: torch.Tensor, threshold: float) -> Callable[[], bool]:
    """One decision as the runtime takes it: at batch 1 from Python floats (``Policy.leaves_one``),
    else the tensor score, compared, and read back."""
    if logits.shape[0] == 1:
        return lambda: rule.leaves_one(logits, conf, threshold)
    return lambda: bool(rule.passes(rule.score(logits, conf), threshold).any())


def profile(model: EarlyExitModel, x: torch.Tensor, repeats: int = 5, warmup: int = 1) -> TimeProfile:
    """Time the plain backbone, each stage of ``model`` and each computed branch (inside full passes,
    ``_full_pass``), one decision and, at batch > 1, the compaction after each exit (keeping 90% of
    the rows), for the batch ``x``: medians over ``repeats`` rounds, taken in turns."""
    stages = model.stages.modules
    computed = model.computed_branches()
    # policy eenet's decision is timed as max-softmax's: the same softmax, then a few dot products
    rule = policies.get(model.policy if model.policy in policies.POLICIES else "max-softmax")
    threshold = model.thresholds[0] if model.thresholds else 0.5
    segments: dict[tuple[str, int], list[float]] = {("stage", k): [] for k in range(len(stages))}
    segments.update({("head", k): [] for k, c in enumerate(computed) if c})
    calls: dict[Any, Callable[[], Any]] = {("backbone", 0): lambda: model.backbone(x),
                                           ("pass", 0): lambda: _full_pass(model, x, computed, segments)}
    n = x.shape[0]
    keep = torch.arange(n, device=x.device)[: max(1, (9 * n) // 10)]
    with torch.inference_mode():
        state: tuple[Any, ...] = (x,)
        carry = Carry()
        for k, stage in enumerate(stages[:-1]):
            out = stage(*state)
            state = out[:-1]
            if computed[k]:
                _, logits, conf, carry = exit_step(model.branches[k], model.ensemble, k, out[-1], carry)
                if ("decision", 0) not in calls:
                    calls[("decision", 0)] = _decision(rule, logits, conf, threshold)
            if n > 1:
                flags = model.stages.batched[k + 1]
                calls[("compaction", k)] = lambda state=state, flags=flags, carry=carry: (
                    tuple(v.index_select(0, keep) if b else v for v, b in zip(state, flags)), carry.select(keep))
        med = _round_robin(calls, repeats, warmup)
    med.update({key: 1e3 * statistics.median(v[warmup:]) for key, v in segments.items()})
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = None
    return TimeProfile(n, [med[("stage", k)] for k in range(len(stages))],
                       [med.get(("head", k), 0.0) for k in range(model.num_exits)], med[("backbone", 0)],
                       med.get(("decision", 0), 0.0),
                       [med.get(("compaction", k), 0.0) for k in range(model.num_exits)] if n > 1 else [],
                       machine(), load)


def measure_tail(model: EarlyExitModel, x: torch.Tensor, active: Sequence[bool], budget_s: float = 3.0,
                 min_rounds: int = 5, max_rounds: int = 300) -> dict[str, Any]:
    """What a batch that takes no exit pays on the clock: ``model`` with ``active`` exits deciding
    and thresholds at which nothing leaves (every computed branch and decision runs, on the cut
    backbone of ``run_plan``), against the plain backbone, for about ``budget_s`` seconds; the
    ratio of the medians. The two take turns in a seeded random order, as the benchmarks time them:
    what ran just before decides which weights are still in the CPU's caches. A profile predicts
    this tail from parts timed one by one, which misses part of what running them together costs:
    measured on ResNet-56 at batch 1 with 8 exits computed, 1.200x against 1.157x predicted
    (``settings.eager_b1.tail_check`` in ``benchmarks/results/cifar10_time.json``)."""
    saved = model.active
    never = [policies.never_exit_threshold(model.policy)] * model.num_exits
    model.set_active(active)
    calls = {"backbone": lambda: model.backbone(x), "tail": lambda: model.predict(x, never)}
    times: dict[str, list[float]] = {k: [] for k in calls}
    order = random.Random(0)
    try:
        with torch.inference_mode():
            t0 = time.perf_counter()
            for fn in calls.values():  # warm-up, and the time of one round
                fn()
            rounds = int(min(max_rounds, max(min_rounds, budget_s / max(time.perf_counter() - t0, 1e-9))))
            for _ in range(rounds):
                for key in order.sample(list(calls), len(calls)):
                    t1 = time.perf_counter()
                    calls[key]()
                    times[key].append(time.perf_counter() - t1)
    finally:
        model.active = saved
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    return {"ratio": med["tail"] / med["backbone"], "backbone_ms": med["backbone"], "tail_ms": med["tail"],
            "rounds": rounds, "batch_size": int(x.shape[0])}
