"""The batch-1 exit step as its ops and nothing else: the latency path's head.

At batch 1 every line of Python between two ops costs about as much as an op, and more right after
a backbone stage has run (its code evicted the head's from the CPU's caches). Through
``exit_step`` a pooled MLP head also pays module calls, the pooling plan's lookup, the fold's
freshness check and the carry; without them the batch-1 mean on CIFAR ResNet-56 fell from 0.640 to
0.627 of the backbone's time and the no-exit tail from 1.156x to 1.132x, 6 exits deciding
(``benchmarks/batch1_ab.py`` → ``benchmarks/results/batch1_ab.json``). ``lean_step`` returns, for
an unchained pooled branch, a function of the tap that runs exactly the ops ``Branch.forward``
runs in inference (the same pooling plan, the folded layers, ReLU as its in-place function), so its
logits are the same to the bit; anything else gets None and the caller uses ``exit_step``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import branches as br
from . import fold

Step = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _ops(folded: fold.FoldedBranch) -> list[Callable[[torch.Tensor], torch.Tensor]] | None:
    """The folded body as plain functions, or None where it holds a module other than ReLU."""
    ops: list[Callable[[torch.Tensor], torch.Tensor]] = []
    for op in folded.body:
        if isinstance(op, nn.ReLU):
            ops.append(torch.relu_ if op.inplace else torch.relu)  # what nn.ReLU.forward calls
        elif isinstance(op, nn.Module):
            return None
        else:
            ops.append(op)
    return ops


def lean_step(branch: Any, tap: torch.Tensor) -> Step | None:
    """``tap -> (class logits, confidence logit)`` for ``branch`` on taps shaped like ``tap`` (batch
    1), or None where the branch is not a plain pooled head in eval-mode inference. The function
    holds this moment's folded layers and pooling plan: build it again when they change
    (``key``)."""
    stem = branch.stem
    if branch.cascade or branch.training or not fold.inference_ok() or not isinstance(stem, br.GridPool) \
            or br.forced_plan() is not None or tap.dim() != 4:
        return None
    folded = branch.folded()
    ops = _ops(folded)
    if ops is None:
        return None
    w, b = folded.head_w, folded.head_b
    if stem.whole:
        def pooled(x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)
    elif stem.windows is not None:
        pool, win = br.POOL_PLANS[br.fastest_plan(tap, stem.windows)], stem.windows

        def pooled(x: torch.Tensor) -> torch.Tensor:
            avg, mx = pool(x, win)
            return torch.cat([avg, mx], 1).flatten(1)  # one flatten for both: the same order, one op fewer
    else:
        return None

    def step(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = pooled(x)
        for op in ops:
            z = op(z)
        out = F.linear(z, w, b)
        return out[:, :-1], out[:, -1]
    return step


def key(branch: Any, tap: torch.Tensor) -> tuple[Any, ...]:
    """What a lean step for ``branch`` depends on besides ``context()``: its folded layers (rebuilt
    when a parameter changes) and the tap's shape, dtype and device."""
    folded = branch._folded
    return (id(folded), folded is not None and folded.current(), tap.shape, tap.dtype, tap.device)


def context() -> tuple[Any, ...]:
    """What every lean step depends on: the thread count (the pooling plan is chosen per count),
    a forced pooling plan, and whether folding applies (one call per prediction, not per exit)."""
    return torch.get_num_threads(), br.forced_plan(), fold.inference_ok()
