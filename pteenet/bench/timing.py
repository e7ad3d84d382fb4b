"""Where one batch's time goes: every backbone stage and every computed head, measured.

The MAC ratio is what early exit would save if every MAC took the same time. They do not: on a
CPU a ResNet's first, high-resolution stage takes more time per MAC than its last (measured:
``best_resnet56.timing`` in benchmarks/results/cifar10_resnet.json), so
leaving early saves less time than MACs; and a pooled head that costs 0.1% of the MACs takes a few
percent of the time (pooling reads the whole tap, and is memory-bound). ``profile`` measures both
on the hardware at hand, so that ``bench`` can split the gap between the MAC ratio and the
measured time ratio into the backbone's share (``ideal_time_ratio``: early exit with free exits)
and the exits' own (``predicted_time_ratio`` adds the heads; the rest is bookkeeping: row
selection and decisions).

The prediction scales every stage and head linearly with the rows still in flight, which holds at
large batches; at batch 1 it is the mean time over samples, not a latency percentile.
"""
from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..exits.chain import Carry, exit_step
from ..runtime.model import EarlyExitModel


@dataclass
class TimeProfile:
    batch_size: int
    stage_ms: list[float]  # the E+1 stages, each on the whole batch
    head_ms: list[float]  # per exit; 0.0 for a head the runtime does not compute

    def ratios(self, fractions: Sequence[float]) -> dict[str, float]:
        """Time ratios to the whole backbone for exit ``fractions`` (E+1, the last: ran to the end)."""
        total = sum(self.stage_ms)
        prefix = list(itertools.accumulate(self.stage_ms[:-1]))
        heads = list(itertools.accumulate(self.head_ms))
        f_end = fractions[-1]
        ideal = sum(f * p for f, p in zip(fractions, prefix)) / total + f_end
        predicted = (sum(f * (p + h) for f, p, h in zip(fractions, prefix, heads)) / total
                     + f_end * (1 + heads[-1] / total))
        return {"ideal_time_ratio": ideal, "predicted_time_ratio": predicted}

    def to_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "stage_ms": self.stage_ms, "head_ms": self.head_ms}


def profile(model: EarlyExitModel, x: torch.Tensor, repeats: int = 5, warmup: int = 1) -> TimeProfile:
    """Time each stage of ``model`` on its own input and each computed head on its tap (with what
    earlier heads carry), for the batch ``x``: medians of ``repeats`` rounds, timed round-robin so
    that other load on the machine hits every part alike."""
    stages = model.stages.modules
    computed = model.computed_branches()
    calls: list[tuple[str, int, Any]] = []
    with torch.inference_mode():
        state: tuple[Any, ...] = (x,)
        carry = Carry()
        for k, stage in enumerate(stages[:-1]):
            calls.append(("stage", k, (stage, state)))
            out = stage(*state)
            state = out[:-1]
            if computed[k]:
                calls.append(("head", k, (out[-1], carry)))
                _, _, _, carry = exit_step(model.branches[k], model.ensemble, k, out[-1], carry)
        calls.append(("stage", len(stages) - 1, (stages[-1], state)))

        def run(kind: str, k: int, args: Any) -> None:
            if kind == "stage":
                args[0](*args[1])
            else:
                exit_step(model.branches[k], model.ensemble, k, *args)

        times: dict[tuple[str, int], list[float]] = {(kind, k): [] for kind, k, _ in calls}
        for r in range(warmup + repeats):
            for kind, k, args in calls:
                t0 = time.perf_counter()
                run(kind, k, args)
                if r >= warmup:
                    times[(kind, k)].append(time.perf_counter() - t0)
    med = {key: 1e3 * statistics.median(v) for key, v in times.items()}
    return TimeProfile(x.shape[0], [med[("stage", k)] for k in range(len(stages))],
                       [med.get(("head", k), 0.0) for k in range(model.num_exits)])
