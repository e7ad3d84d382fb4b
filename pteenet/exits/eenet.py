"""EENet's exit scheduler at run time (Ilhan et al., WACV 2024): a learned utility per exit.

At the j-th deciding exit the scheduler reads the exit's class probabilities p, two confidence
measures and the utilities of the deciding exits before it, and scores

    q_j = clamp(w1_j . p + w2_j . [max p, 1 - H(p) / log C, q_0 .. q_{j-1}] + b_j, 0, 1)

A sample leaves at the first deciding exit where the utility before its clamp reaches the exit's
threshold, z_j >= t_j (for t_j in [0, 1] that is q_j >= t_j; above 1 the clamp would tie every
sample it saturates, and those cannot be ranked). The clamped utilities of earlier exits are a
carried value (``Carry.util`` [B, j]), passed on like the cascade's logits. The fitting lives in
``sweep/eenet.py``; this module is the one function every runtime (eager at any batch size, the
batch-1 path, the staged programs) and the simulation on an exit cache call, so they take the
same exits.

Everything is computed in float64 from the float32 logits: a float32 dot product summed in another
order (ONNX Runtime, another batch size) can move a score by a few 1e-8, enough to cross a
threshold; in float64 that takes a score within about 1e-15 of one. Thresholds are float32 values
(``fp32_threshold``) so that a float32 threshold input, as the staged programs take, is exact.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import PteenetError
from .policies import EENET, HOST_MAX_CLASSES

NAME = EENET
RULE = "EENet's learned utility of the exit (before its clamp to [0, 1]) >= T"
NEVER_EXIT = float(np.finfo(np.float32).max)  # a threshold no score reaches (a float32, as every threshold)
ALWAYS_EXIT = -NEVER_EXIT
FEATURES = 2  # max p and 1 - normalised entropy, before the earlier utilities


class Scheduler(nn.Module):
    """The utilities of the deciding exits ``exits`` (model exit indices, in order) over ``num_classes``."""

    def __init__(self, exits: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.exits = [int(k) for k in exits]
        if not self.exits or sorted(set(self.exits)) != self.exits:
            raise PteenetError(f"the scheduler's exits must be increasing and not empty, got {self.exits}",
                               "give the indices of the exits that decide")
        m = len(self.exits)
        self.w1 = nn.Parameter(torch.zeros(m, num_classes, dtype=torch.float64))
        # Row j reads [max p, 1 - H/log C, q_0 .. q_{m-1}]; only the first j utilities are used.
        self.w2 = nn.Parameter(torch.zeros(m, FEATURES + m, dtype=torch.float64))
        self.b = nn.Parameter(torch.full((m,), 0.5, dtype=torch.float64))
        self.slot = {k: j for j, k in enumerate(self.exits)}

    @property
    def num_classes(self) -> int:
        return self.w1.shape[1]

    def to_meta(self) -> dict:
        """What the checkpoint's JSON records (the tensors go to safetensors as ``scheduler.*``)."""
        return {"kind": NAME, "exits": self.exits, "num_classes": self.num_classes}

    @classmethod
    def from_meta(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> Scheduler:
        if meta.get("kind") != NAME:
            raise PteenetError(f"unknown exit scheduler {meta.get('kind')!r}", "upgrade pteenet")
        s = cls(meta["exits"], int(meta["num_classes"]))
        s.load_state_dict(tensors)
        return s.requires_grad_(False)

    def raw(self, j: int, logits: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
        """z_j [B] (float64), the utility of the j-th deciding exit before its clamp, from its
        logits [B, C] and the earlier (clamped) utilities ``prev`` [B, j] (None for j = 0)."""
        return self.raw_from(j, features(logits), prev)

    def raw_from(self, j: int, f: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
        """The utility before the clamp from ``features`` [B, C + 2] (fitting computes them once)."""
        c = self.num_classes
        w1, w2, b = self.w1.to(f.device), self.w2.to(f.device), self.b.to(f.device)  # no-ops on the CPU
        z = (f[:, :c] * w1[j]).sum(1) + w2[j, 0] * f[:, c] + w2[j, 1] * f[:, c + 1] + b[j]
        if j:
            assert prev is not None
            z = z + (prev * w2[j, FEATURES:FEATURES + j]).sum(1)
        return z

    def step(self, k: int, logits: torch.Tensor, prev: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """At model exit ``k``: (the decision score z [B], the carried utilities with clamp(z)
        appended [B, j + 1])."""
        j = self.slot[k]
        z = self.raw(j, logits, prev)
        q = z.clamp(0.0, 1.0)[:, None]
        return z, (q if prev is None else torch.cat([prev, q], 1))

    def host_step(self, k: int, z: list[float], prev: list[float]) -> float:
        """``step``'s score of one sample in Python floats (the batch-1 path: no tensor ops); the
        caller appends its clamp to ``prev``. Float64 like the tensor ops; the two differ by
        rounding order only (about 1e-16)."""
        j = self.slot[k]
        w1, w2, b = self._host_params()
        mx = max(z)
        e = [math.exp(v - mx) for v in z]
        s = sum(e)
        logs = math.log(s)
        p = [v / s for v in e]
        ent = -sum(pi * (v - mx - logs) for pi, v in zip(p, z))
        conf = 1.0 - ent / math.log(max(len(z), 2))
        r = sum(map(float.__mul__, p, w1[j])) + w2[j][0] * max(p) + w2[j][1] * conf + b[j]
        return r + sum(map(float.__mul__, prev[:j], w2[j][FEATURES:FEATURES + j]))

    def _host_params(self) -> tuple[list[list[float]], list[list[float]], list[float]]:
        key = (self.w1._version, self.w2._version, self.b._version)
        cached = getattr(self, "_host", None)
        if cached is None or cached[0] != key:
            cached = (key, (self.w1.tolist(), self.w2.tolist(), self.b.tolist()))
            object.__setattr__(self, "_host", cached)
        return cached[1]

    def scores(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """[N, m]: every deciding exit's decision score for every sample (``logits``: one [N, C]
        per deciding exit), through ``step`` as the runtime computes them."""
        util, out = None, []
        for k, z in zip(self.exits, logits):
            s, util = self.step(k, z, util)
            out.append(s)
        return torch.stack(out, 1)


def features(logits: torch.Tensor) -> torch.Tensor:
    """[B, C + 2] float64: the class probabilities, the top one and 1 - the normalised entropy."""
    logp = torch.log_softmax(logits.to(torch.float64), dim=1)
    p = logp.exp()
    conf = 1.0 - (-(p * logp).sum(1)) / math.log(max(logits.shape[1], 2))
    return torch.cat([p, p.max(1, keepdim=True).values, conf[:, None]], 1)


# How far a Python-float utility must lie from a threshold for the tensor one to be on the same
# side: both are float64 and differ by the order of a few sums of at most C + m terms of size <= |w|.
HOST_MARGIN = 1e-9


def fp32_threshold(t: float) -> float:
    """The nearest float32 value: a threshold exact in every runtime (the staged programs take float32)."""
    return float(np.float32(t))


def leaves_one(scheduler: Scheduler, k: int, logits: torch.Tensor, util: list[float], threshold: float) -> bool:
    """The batch-1 decision at model exit ``k`` (``logits`` [1, C]); appends the exit's clamped
    utility to ``util``, the earlier ones as Python floats. Scored in Python floats where the score
    is clear of the threshold (``HOST_MARGIN``), else by the tensor ops, which decide then."""
    s = math.nan
    if logits.shape[1] <= HOST_MAX_CLASSES:
        try:
            s = scheduler.host_step(k, logits.tolist()[0], util)
        except (OverflowError, ValueError):  # inf or nan among the logits: the tensor ops decide
            s = math.nan
    if not abs(s - threshold) > HOST_MARGIN * (1.0 + abs(s)):  # also where s is nan
        prev = torch.tensor([util], dtype=torch.float64) if util else None
        s = float(scheduler.step(k, logits, prev)[0])
    util.append(min(max(s, 0.0), 1.0))
    return s >= threshold
