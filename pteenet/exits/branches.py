"""Exit branches: what reads a backbone tap and answers (class logits, confidence logit).

Every branch is ``stem`` -> ``body`` -> two linear heads (a classifier and the sigmoid confidence
head h of the paper). The stem has no parameters, so a feature cache can hold its output instead of
the tap (pooled features are 10-100x smaller than the tap itself).

- ``conv0..conv3``: the paper's ConvX: X x [3x3 conv (same channels, no bias), BN, ReLU], global
  average pool. The stem is the identity (the convs are trained), so caches hold the whole tap.
- ``pool``: average- and max-pool to a G x G grid, concatenated and flattened (SDN's feature
  reduction, Kaya et al. 2019); the heads are linear on that vector. The stem is the pooling.
- ``pool-mlp``: the same pooled vector through one hidden layer (width ``hidden``) before the heads.
- ``conv-lite``: one strided 3x3 conv halving the channels (+BN, ReLU), then the G x G pooling and
  linear heads: for backbones whose pooled features are too weak on their own.

With ``cascade`` every head also reads the previous exit's logits (detached in training, Zero Time
Waste, Wolczyk et al. 2021); exit 0 reads zeros, so every head has the same input layout.

The tap's layout (``graph.LAYOUTS``, found from the graph) picks the branch's input side; ``kind``
still picks the family:
- channels-last maps (B, H, W, C), Swin's: the stem first permutes them to (B, C, H, W) (a view;
  counted as one operation per element, the most a copy would cost), then everything is as above.
- token sequences (B, N, D), a ViT's: ``TokenPool`` is the pooling: LayerNorm over D (no affine: the
  linear layer after it absorbs one), then the first token (a ViT's class token) and the mean over
  all tokens, concatenated (2D values; the CNN heads' average and max pooling). ``pool`` and
  ``pool-mlp`` put it in the stem, so feature caches hold 2D values an image instead of N x D.
  ``conv-lite`` and ``convX`` become token-wise: one linear layer halving D, or X layers of width D,
  each with LayerNorm and GELU, applied to every token (what a 3x3 conv is to a map), then ``TokenPool``.
"""
from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import Config, check_choice, check_int
from ..errors import PteenetError
from . import fold
from .cascade import CASCADE_INPUTS, cascade_features

MAX_CONVS = 3
BRANCH_SCHEMA = 2  # 2: cascade_input (1: the cascade read log-probabilities)
CASCADE_WORDS = {"zscore": "standardised logits", "logprob": "log-probabilities"}
KINDS = ("conv", "pool", "pool-mlp", "conv-lite")
NAMES = "conv0, conv1, conv2, conv3, pool, pool-mlp, conv-lite"


@dataclass(frozen=True, kw_only=True)
class BranchConfig(Config):
    kind: str = "conv"  # conv | pool | pool-mlp | conv-lite
    convs: int = 2  # X in ConvX (kind conv only); 0 is the pool-only branch
    grid: int = 4  # G of the G x G pooling (pool, pool-mlp, conv-lite)
    hidden: int = 128  # hidden width (pool-mlp)
    cascade: bool = False  # each head also reads the previous exit's logits ...
    cascade_input: str = "zscore"  # ... in this form (cascade.py; schema-1 files: logprob)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PteenetError(f"unknown branch type '{self.kind}'", f"known branch types: {NAMES}")
        check_int("convs", self.convs, 0, f"conv branches take 0..{MAX_CONVS} convs")
        if self.convs > MAX_CONVS:
            raise PteenetError(f"conv branches take 0..{MAX_CONVS} convs, got {self.convs}", f"known branch types: {NAMES}")
        check_int("grid", self.grid, 1, "e.g. --grid 4")
        check_int("hidden", self.hidden, 1, "e.g. --hidden 128")
        check_choice("cascade_input", self.cascade_input, CASCADE_INPUTS)

    @property
    def name(self) -> str:
        return f"conv{self.convs}" if self.kind == "conv" else self.kind

    @property
    def description(self) -> str:
        """One sentence for reports: what the branch computes."""
        g = f"{self.grid}x{self.grid}"
        body = {"conv": f"{self.convs} x [3x3 conv, BN, ReLU] and global average pooling",
                "pool": f"average and max pooling to {g} and BatchNorm",
                "pool-mlp": f"average and max pooling to {g}, BatchNorm and one hidden layer of {self.hidden}",
                "conv-lite": f"a strided 3x3 conv halving the channels, average and max pooling to {g}"}[self.kind]
        return (f"{self.name}: {body}, then a classifier and a confidence head"
                + (f", each branch also reading the previous exit's {CASCADE_WORDS[self.cascade_input]} (cascade)"
                   if self.cascade else ""))

    @property
    def cacheable_stem(self) -> bool:
        """True when the stem does real (parameter-free) work, so caching its output pays."""
        return self.kind in ("pool", "pool-mlp")

    @classmethod
    def parse(cls, text: str, **options: Any) -> "BranchConfig":
        """``conv2``, ``pool``, ``pool-mlp`` or ``conv-lite``, plus keyword options (grid, hidden, cascade)."""
        t = text.strip().lower()
        m = re.fullmatch(r"conv([0-9]+)", t)
        if m and int(m.group(1)) <= MAX_CONVS:
            return cls(kind="conv", convs=int(m.group(1)), **options)
        if t in KINDS and t != "conv":
            return cls(kind=t, **options)
        raise PteenetError(f"unknown branch type '{text}'", f"known branch types: {NAMES}")

    def to_dict(self) -> dict[str, Any]:
        # "type": the name users know, for readers of the file; "branch_schema": 2 since cascade_input.
        return {"type": self.name, "branch_schema": BRANCH_SCHEMA, **super().to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BranchConfig":
        """Checkpoints before the new heads wrote only ``{"type": "convX", "convs": X}``; before
        branch schema 2, cascades read log-probabilities (and the record has no ``cascade_input``)."""
        d = dict(d)
        name = str(d.pop("type", ""))
        schema = d.pop("branch_schema", 1)
        if not isinstance(schema, int) or schema > BRANCH_SCHEMA:
            raise PteenetError(f"branch schema {schema!r} is newer than this pteenet's ({BRANCH_SCHEMA})", "upgrade pteenet")
        if "kind" not in d:
            d["kind"] = "conv" if name.startswith("conv") and name != "conv-lite" else name
        if schema < 2 and d.get("cascade"):  # without a cascade the input form means nothing: the default
            d.setdefault("cascade_input", "logprob")
        return super().from_dict(d)


def grid_width(c: int, hw: tuple[int, int], grid: int) -> int:
    """Length of ``GridPool``'s output vector."""
    h, w = min(grid, hw[0]), min(grid, hw[1])
    return c * h * w if (h, w) == tuple(hw) else 2 * c * h * w


def _pool_nchw(x: torch.Tensor, k: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """avg_pool2d, and a max over the window's columns, then its rows (cheaper than max_pool2d)."""
    (kh, kw), (b, c, h, w) = k, x.shape
    mx = x.reshape(b, c, h, w // kw, kw).amax(4).reshape(b, c, h // kh, kh, w // kw).amax(3)
    return F.avg_pool2d(x, k), mx


def _pool_rows(x: torch.Tensor, k: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """avg_pool2d, and a max over the window's rows first, over whole contiguous image rows
    (vectorised along W), then its columns: fast where windows are large (CIFAR ResNet stage 1,
    ImageNet maps)."""
    (kh, kw), (b, c, h, w) = k, x.shape
    rows = x.reshape(b, c, h // kh, kh, w)
    return F.avg_pool2d(x, k), rows.amax(3).reshape(b, c, h // kh, w // kw, kw).amax(4)


def _pool_nhwc(x: torch.Tensor, k: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One copy to channels-last, where both pooling kernels vectorise along C: fast for small
    windows over many channels (CIFAR ResNet stages 2-3), slow for large maps (the copy)."""
    y = x.contiguous(memory_format=torch.channels_last)
    return F.avg_pool2d(y, k), F.max_pool2d(y, k)


# Equal-window pooling has several formulations whose speed depends on the shape and the CPU by
# 2-3x either way (measured: benchmarks/branch_cost.py). Pooling is most of a pooled head's time at
# large batches, so the first large batch of each shape times them and every later call uses the
# fastest (one choice per process). A choice made by a clock must not change a value: every plan
# computes its average with PyTorch's avg_pool2d kernel (NCHW or channels-last: both add a window's
# elements in the same row-major order from zero, then divide), and a maximum is exact in any order,
# so all plans give the same bits for a given input, and a sample's pooled values do not depend on
# the batch it came in (tests/test_branches.py). Summing whole rows first, as the maximum does in
# "rows", would round averages differently: no plan does (the price: docs/speed.md).
def _pool_2d(x: torch.Tensor, k: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain pooling kernels with the window as kernel and stride: the fastest at batch 1 (half
    the adaptive kernels' time), any batch size, and what torch.export and ONNX get."""
    return F.avg_pool2d(x, k), F.max_pool2d(x, k)


POOL_PLANS = {"pool2d": _pool_2d, "nchw": _pool_nchw, "rows": _pool_rows, "nhwc": _pool_nhwc}
_chosen_plan: dict[str, str] = {}  # plan_key -> plan name
_forced = threading.local()


@contextlib.contextmanager
def pool_plan(name: str) -> Iterator[None]:
    """Every ``GridPool`` uses plan ``name`` while inside (for comparisons: ``benchmarks/branch_cost.py``)."""
    if name not in POOL_PLANS:
        raise ValueError(f"unknown pooling plan {name!r}: one of {', '.join(POOL_PLANS)}")
    before = getattr(_forced, "plan", None)
    _forced.plan = name
    try:
        yield
    finally:
        _forced.plan = before


def forced_plan() -> str | None:
    """The plan ``pool_plan`` forces in this thread now, or None."""
    return getattr(_forced, "plan", None)


def chosen_plans() -> dict[str, str]:
    """The plan timed fastest for each ``plan_key`` so far (for benchmarks: the values are the same)."""
    return dict(_chosen_plan)


def plan_key(x: torch.Tensor, k: tuple[int, int]) -> str:
    """(shape, window, batch-size class, dtype, device, threads) as text, so a record can be JSON.
    Per batch-size class: at batch 1 the fixed cost of each op decides, at 256 memory traffic."""
    rows = "1" if x.shape[0] == 1 else "<16" if x.shape[0] < 16 else ">=16"
    return f"{tuple(x.shape[1:])} {tuple(k)} {rows} {x.dtype} {x.device.type} {torch.get_num_threads()}"


def fastest_plan(x: torch.Tensor, k: tuple[int, int]) -> str:
    """The plan every ``GridPool`` uses for ``x`` with windows ``k``: forced, or timed on first use."""
    forced = forced_plan()
    if forced is not None:
        return forced
    key = plan_key(x, k)
    plan = _chosen_plan.get(key)
    if plan is None:
        plan = _chosen_plan[key] = _time_plans(x, k)
    return plan


def _time_plans(x: torch.Tensor, k: tuple[int, int], rounds: int = 5) -> str:
    """The plan with the shortest best time over ``rounds`` round-robin rounds (the minimum, and
    taking turns, so that a burst of other load on the machine cannot pick a slow plan)."""
    best = dict.fromkeys(POOL_PLANS, float("inf"))
    with torch.no_grad():
        for fn in POOL_PLANS.values():
            fn(x, k)  # warm-up: first calls allocate
        for _ in range(rounds):
            for name, fn in POOL_PLANS.items():
                t0 = time.perf_counter()
                fn(x, k)
                best[name] = min(best[name], time.perf_counter() - t0)
    return min(best, key=best.__getitem__)


def _bins(n: int, g: int) -> list[tuple[int, int]]:
    """The windows of adaptive pooling from n to g cells: [floor(i*n/g), ceil((i+1)*n/g))."""
    return [((i * n) // g, -((-(i + 1) * n) // g)) for i in range(g)]


class GridPool(nn.Module):
    """Average- and max-pool to at most G x G, concatenated and flattened: (B, C, H, W) -> (B, 2*C*g*g).
    A map no larger than the grid is passed through flattened: both pools would be the identity."""

    def __init__(self, grid: int, hw: tuple[int, int]) -> None:
        super().__init__()
        # A grid finer than the map would only repeat values: cap it at the map's size.
        size = (min(grid, hw[0]), min(grid, hw[1]))
        self.whole = size == tuple(hw)
        self.avg, self.max = nn.AdaptiveAvgPool2d(size), nn.AdaptiveMaxPool2d(size)
        # Equal windows: the same pooling through faster kernels (see forward).
        self.windows = (hw[0] // size[0], hw[1] // size[1]) if hw[0] % size[0] == 0 and hw[1] % size[1] == 0 else None
        # Unequal windows (a 14x14 or 7x7 map on a 4x4 grid): ONNX has no adaptive pooling with
        # uneven bins, so exported programs pool each bin of the adaptive rule (start floor(i*H/g),
        # end ceil((i+1)*H/g)) by slicing, the same windows as eager's adaptive kernels.
        self.bins = [(h0, h1, w0, w1) for h0, h1 in _bins(hw[0], size[0]) for w0, w1 in _bins(hw[1], size[1])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.whole:
            return x.flatten(1)
        if self.windows is None:
            if torch.compiler.is_compiling() or torch.jit.is_tracing():
                cells = [x[:, :, h0:h1, w0:w1] for h0, h1, w0, w1 in self.bins]
                avg = torch.stack([c.mean((2, 3)) for c in cells], 2)  # (B, C, g*g): the adaptive order
                mx = torch.stack([c.amax((2, 3)) for c in cells], 2)
                return torch.cat([avg.flatten(1), mx.flatten(1)], 1)
            return torch.cat([self.avg(x).flatten(1), self.max(x).flatten(1)], 1)
        # PyTorch's adaptive CPU kernels are slow, at batch 256 and at batch 1
        # (benchmarks/results/branch_cost.json). While torch.export traces, the plain kernels: timing
        # would pin the dynamic batch dimension, and they export to ONNX's AveragePool/MaxPool.
        plan = "pool2d" if torch.compiler.is_compiling() or torch.jit.is_tracing() else fastest_plan(x, self.windows)
        avg, mx = POOL_PLANS[plan](x, self.windows)
        return torch.cat([avg.flatten(1), mx.flatten(1)], 1)


class ChannelsFirst(nn.Module):
    """(B, H, W, C) -> (B, C, H, W): a view (pooling and conv kernels read channels-last strides)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


class TokenPool(nn.Module):
    """(B, N, D) -> (B, 2D): LayerNorm over D, then [first token, mean over tokens]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)  # an nn.LayerNorm so that thop counts it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return torch.cat([x[:, 0], x.mean(1)], 1)


def _token_layers(d: int, out: int, n: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for _ in range(n):
        layers += [nn.Linear(d, out, bias=False), nn.LayerNorm(out), nn.GELU()]
        d = out
    return layers


def _token_body(in_shape: tuple[int, ...], cfg: BranchConfig) -> tuple[nn.Module, nn.Module, int]:
    d = in_shape[1]
    if cfg.kind == "conv":
        return nn.Identity(), nn.Sequential(*_token_layers(d, d, cfg.convs), TokenPool(d)), 2 * d
    if cfg.kind == "conv-lite":
        half = max(d // 2, 1)
        return nn.Identity(), nn.Sequential(*_token_layers(d, half, 1), TokenPool(half)), 2 * half
    if cfg.kind == "pool-mlp":
        return TokenPool(d), nn.Sequential(nn.Linear(2 * d, cfg.hidden), nn.ReLU(inplace=True)), cfg.hidden
    return TokenPool(d), nn.Identity(), 2 * d


def _body_and_width(in_shape: tuple[int, ...], cfg: BranchConfig, layout: str = "chw") -> tuple[nn.Module, nn.Module, int]:
    """(stem, body, width of the vector the heads read, before any cascade input)."""
    if layout == "tokens":
        return _token_body(in_shape, cfg)
    if layout == "hwc":
        h, w, c = in_shape
        stem, body, width = _body_and_width((c, h, w), cfg)
        return nn.Sequential(ChannelsFirst(), stem), body, width
    if len(in_shape) == 1:
        # A flattened activation has no spatial extent: the heads (or the MLP) read it directly.
        c = in_shape[0]
        if cfg.kind == "pool-mlp":
            return nn.Identity(), nn.Sequential(nn.Linear(c, cfg.hidden), nn.ReLU(inplace=True)), cfg.hidden
        return nn.Identity(), nn.Identity(), c
    if len(in_shape) != 3:
        raise PteenetError(f"cannot build a branch on a tensor of shape (B, {', '.join(map(str, in_shape))})",
                           "exits need a (B, C, H, W) feature map or a (B, C) vector")
    c, h, w = in_shape
    if cfg.kind == "conv":
        layers: list[nn.Module] = []
        for _ in range(cfg.convs):
            layers += [nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        return nn.Identity(), nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), c
    if cfg.kind == "conv-lite":
        half = max(c // 2, 1)
        oh, ow = (h + 1) // 2, (w + 1) // 2
        pool = GridPool(cfg.grid, (oh, ow))
        width = grid_width(half, (oh, ow), cfg.grid)
        body = nn.Sequential(nn.Conv2d(c, half, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(half),
                             nn.ReLU(inplace=True), pool, nn.BatchNorm1d(width))
        return nn.Identity(), body, width
    stem = GridPool(cfg.grid, (h, w))
    width = grid_width(c, (h, w), cfg.grid)
    # BatchNorm on the pooled vector: backbone activations differ in scale from block to block (and
    # a random backbone's are huge), so without it one learning rate cannot suit every head. At
    # inference it is an affine map, nearly free.
    if cfg.kind == "pool-mlp":
        return stem, nn.Sequential(nn.BatchNorm1d(width), nn.Linear(width, cfg.hidden), nn.ReLU(inplace=True)), cfg.hidden
    return stem, nn.BatchNorm1d(width), width


class Branch(nn.Module):
    """One exit. ``forward(tap, prev)`` returns (class logits [B, K], confidence logit [B]); h is the
    sigmoid of the latter (logits, not h, so that the loss works in log space without clamping).
    ``prev`` is the previous exit's logits, read only with ``cascade``."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, cfg: BranchConfig, layout: str = "chw") -> None:
        super().__init__()
        self.stem, self.body, width = _body_and_width(in_shape, cfg, layout)
        self.cascade = cfg.cascade
        self.cascade_input = cfg.cascade_input
        head_in = width + (num_classes if cfg.cascade else 0)
        self.classifier = nn.Linear(head_in, num_classes)
        self.confidence = nn.Linear(head_in, 1)
        self._folded: fold.FoldedBranch | None = None  # the inference form, derived on first use

    def _apply(self, fn: Any, recurse: bool = True) -> "Branch":
        self._folded = None  # .to()/.half() replace the tensors the folded form was built from
        return super()._apply(fn, recurse)

    def folded(self) -> fold.FoldedBranch:
        """BatchNorm folded into its neighbours and both heads in one matmul (eval inference)."""
        if self._folded is None or not self._folded.current():
            self._folded = fold.fold(self)
        return self._folded

    def head(self, features: torch.Tensor, prev: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """From the stem's output (what a feature cache holds) to (logits, confidence logit)."""
        if not self.training and fold.inference_ok():
            return self.folded().head(features, prev)
        z = self.body(features)
        if self.cascade:
            if prev is None:
                prev = z.new_zeros(z.shape[0], self.classifier.out_features)
            # Detached: a head learns to use its predecessor's answer, never to change it.
            # Standardised (cascade.py): logits' free offset and scale would make the input drift.
            z = torch.cat([z, cascade_features(prev, self.cascade_input).to(z.dtype)], 1)
        return self.classifier(z), self.confidence(z).squeeze(1)

    def forward(self, x: torch.Tensor, prev: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.stem(x), prev)
