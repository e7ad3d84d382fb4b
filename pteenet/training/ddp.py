"""The branches under ``DistributedDataParallel``, and nothing else: the backbone is never a child
of what DDP wraps (never broadcast, never all-reduced, never given a gradient), and the branches'
BatchNorm layers normalise over the global batch (two all-reduces of per-channel sums, on Gloo or
NCCL; torch's SyncBatchNorm runs on GPUs only), so N processes train what one process would.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..distributed import Group


class _SumOverRanks(torch.autograd.Function):
    """Sum over ranks with a gradient: every rank's loss depends on every rank's input, so the
    gradient is summed over ranks too."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        g = grad.clone()
        dist.all_reduce(g)
        return g


class _GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch in training (Gloo or NCCL): the mean from an all-reduce of
    per-channel sums, then the variance from an all-reduce of squared deviations (two passes, as
    one process computes it). Both all-reduces carry gradients. Eval mode: the running statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        dtype, x = x.dtype, x.float()  # statistics in float32, also under autocast
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor(float(x.numel() // x.shape[1]), device=x.device)
        dist.all_reduce(count)
        mean = _SumOverRanks.apply(x.sum(dims)) / count
        var = _SumOverRanks.apply(((x - mean.reshape(shape)) ** 2).sum(dims)) / count
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            self.num_batches_tracked.add_(1)  # type: ignore[union-attr,operator]
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)  # type: ignore[arg-type]
            with torch.no_grad():
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * count / max(float(count) - 1, 1.0), alpha=m)
        y = (x - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + self.eps)
        if self.affine:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        return y.to(dtype)


_SYNCED: dict[type, type] = {}


@contextlib.contextmanager
def synced_batchnorm(module: nn.Module) -> Iterator[None]:
    """Every BatchNorm in ``module`` normalises over the global batch while inside; the modules,
    parameters and state-dict keys stay the same objects (only their class is swapped)."""
    swapped = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, _GlobalBatchNorm):
            cls = type(m)
            synced = _SYNCED.setdefault(cls, type(f"Global{cls.__name__}", (_GlobalBatchNorm, cls), {}))
            m.__class__ = synced
            swapped.append((m, cls))
    try:
        yield
    finally:
        for m, cls in swapped:
            m.__class__ = cls


class _BranchForward(nn.Module):
    """What DDP wraps: the branches only (the backbone is no child of it, so it is never
    broadcast, never all-reduced and never gets a gradient)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.branches = model.branches
        self._run = type(model).branch_outputs.__get__(model)

    def forward(self, taps: Sequence[torch.Tensor], final: torch.Tensor, features: bool = False) -> Any:
        return self._run(taps, final, features)


@contextlib.contextmanager
def branches_in_ddp(model: Any, group: Group, device: torch.device) -> Iterator[None]:
    """While inside, ``model.branch_outputs`` with gradients goes through DDP over the branches,
    whose BatchNorm uses global-batch statistics; without gradients (evaluation) it runs locally."""
    if not group.active:
        yield
        return
    from torch.nn.parallel import DistributedDataParallel as DDP

    local = type(model).branch_outputs.__get__(model)
    with synced_batchnorm(model.branches):
        # Buffers are already equal on every rank (global statistics): nothing to broadcast.
        with warnings.catch_warnings():  # torch 2.14 deprecates the name; its replacement still syncs at init
            warnings.simplefilter("ignore", FutureWarning)
            ddp = DDP(_BranchForward(model), device_ids=[device.index] if device.type == "cuda" else None,
                      broadcast_buffers=False)

        def branch_outputs(taps: Sequence[torch.Tensor], final: torch.Tensor, features: bool = False) -> Any:
            return ddp(taps, final, features) if torch.is_grad_enabled() else local(taps, final, features)

        model.branch_outputs = branch_outputs
        try:
            yield
        finally:
            del model.branch_outputs
