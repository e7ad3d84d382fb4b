"""A branch's inference-time form: BatchNorm folded into its neighbours, two heads in one matmul.

In eval mode a BatchNorm is an affine map, so it folds into the convolution or linear layer next
to it (a conv followed by BN becomes one conv with a bias; BN followed by a linear layer becomes
one linear layer), and the classifier and the confidence head read the same vector, so they are one
(K+1)-output linear layer. At batch 1 a pooled MLP head drops from 7 ops to 4 this way, and every
op costs about as much as its arithmetic there (measured: ``benchmarks/branch_cost.py``).

The folded tensors are derived from the branch's parameters, never stored: ``FoldedBranch`` is
rebuilt whenever a parameter or buffer is replaced or changed in place, so a checkpoint holds the
trained layers only and training after inference needs no care.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .cascade import cascade_features

Op = Callable[[torch.Tensor], torch.Tensor]


def _bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with bn(x) == x * scale + shift per channel, in eval mode; float64."""
    assert bn.running_var is not None and bn.running_mean is not None
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    return scale, shift


def _conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Op:
    s, t = _bn_affine(bn)
    w = (conv.weight.double() * s[:, None, None, None]).to(conv.weight.dtype)
    b = t if conv.bias is None else conv.bias.double() * s + t
    b = b.to(conv.weight.dtype)
    stride, padding, dilation, groups = conv.stride, conv.padding, conv.dilation, conv.groups
    return lambda x: F.conv2d(x, w, b, stride, padding, dilation, groups)


def _affine_linear(scale: torch.Tensor, shift: torch.Tensor, lin_w: torch.Tensor, lin_b: torch.Tensor | None,
                   cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear layer whose first ``cols`` inputs were ``x * scale + shift``, as one linear layer."""
    w = lin_w.double().clone()
    b = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device) if lin_b is None else lin_b.double().clone()
    b += w[:, :cols] @ shift
    w[:, :cols] *= scale
    return w.to(lin_w.dtype), b.to(lin_w.dtype)


def _flat(module: nn.Module) -> list[nn.Module]:
    return list(module) if isinstance(module, nn.Sequential) else [module]


@dataclass
class FoldedBranch:
    """``stem`` then ``body`` (folded ops), then the merged heads."""

    tensors: list[torch.Tensor]  # the branch's parameters and buffers when it was folded ...
    versions: tuple[int, ...]  # ... and their in-place version counters then
    body: list[Op]
    head_w: torch.Tensor  # [K+1, width (+K with a cascade)]
    head_b: torch.Tensor
    cascade: str | None  # the cascade's input form (cascade.py), None without a cascade

    def current(self) -> bool:
        """False once a parameter or buffer was changed in place (training, load_state_dict).
        Replaced tensors (``.to()``, ``.half()``) are caught by ``Branch._apply``. A few
        microseconds a call, where hashing every tensor's pointer took 80."""
        return tuple(t._version for t in self.tensors) == self.versions

    def head(self, z: torch.Tensor, prev: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        for op in self.body:
            z = op(z)
        if self.cascade:
            if prev is None:
                prev = z.new_zeros(z.shape[0], self.head_w.shape[0] - 1)
            z = torch.cat([z, cascade_features(prev, self.cascade).to(z.dtype)], 1)
        out = F.linear(z, self.head_w, self.head_b)
        return out[:, :-1], out[:, -1]


def fold(branch: Any) -> FoldedBranch:
    """The folded form of a ``Branch`` (its ``body``, ``classifier``, ``confidence``, ``cascade``)."""
    mods = _flat(branch.body)
    ops: list[Op] = []
    pending: tuple[torch.Tensor, torch.Tensor] | None = None  # a trailing BN1d, folded into the heads
    i = 0
    while i < len(mods):
        m, nxt = mods[i], (mods[i + 1] if i + 1 < len(mods) else None)
        if isinstance(m, nn.Conv2d) and isinstance(nxt, nn.BatchNorm2d):
            ops.append(_conv_bn(m, nxt))
            i += 2
            continue
        if isinstance(m, nn.BatchNorm1d) and isinstance(nxt, nn.Linear):
            w, b = _affine_linear(*_bn_affine(m), nxt.weight, nxt.bias, nxt.in_features)
            ops.append(lambda x, w=w, b=b: F.linear(x, w, b))
            i += 2
            continue
        if isinstance(m, nn.BatchNorm1d) and nxt is None:
            pending = _bn_affine(m)
        elif not isinstance(m, nn.Identity):
            ops.append(m)  # ReLU, pooling, flatten; a BatchNorm with nothing to fold into stays as is
        i += 1
    cls, conf = branch.classifier, branch.confidence
    w = torch.cat([cls.weight, conf.weight], 0)
    b = torch.cat([cls.bias, conf.bias], 0)
    if pending is not None:
        w, b = _affine_linear(*pending, w, b, pending[0].shape[0])
    tensors = [*branch.parameters(), *branch.buffers()]
    return FoldedBranch(tensors, tuple(t._version for t in tensors), ops, w, b,
                        branch.cascade_input if branch.cascade else None)


_off = threading.local()


@contextlib.contextmanager
def unfolded() -> Iterator[None]:
    """Run the trained layers even at inference: for counting MACs (thop hooks modules, and the
    folded form is plain functions) and for comparisons."""
    before = getattr(_off, "on", False)
    _off.on = True
    try:
        yield
    finally:
        _off.on = before


def inference_ok() -> bool:
    """Folding is for eager inference: not under autograd, and not while torch.export or the JIT
    trace (exported programs keep the trained layers, so they stay tunable and inspectable)."""
    return (not torch.is_grad_enabled() and not getattr(_off, "on", False) and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing())
