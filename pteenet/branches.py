"""The paper's ConvX exit branch: X x [3x3 conv (same channels, no bias), BN, ReLU], global average
pool, then a softmax classifier and a sigmoid confidence head on the pooled vector."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .errors import PteenetError

MAX_CONVS = 3


@dataclass(frozen=True)
class BranchConfig:
    convs: int = 2  # X in ConvX; 0 is the pool-only branch

    @property
    def name(self) -> str:
        return f"conv{self.convs}"

    @classmethod
    def parse(cls, text: str) -> "BranchConfig":
        m = re.fullmatch(r"conv([0-9]+)", text.strip().lower())
        if not m or int(m.group(1)) > MAX_CONVS:
            raise PteenetError(f"unknown branch type '{text}'", "known branch types: conv0, conv1, conv2, conv3")
        return cls(int(m.group(1)))


class Branch(nn.Module):
    """One exit. ``forward`` returns (class logits [B, K], confidence logit [B]); h = sigmoid of the
    latter. Returning the logit rather than h lets the loss work in log space without clamping."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, cfg: BranchConfig) -> None:
        super().__init__()
        if len(in_shape) == 3:
            c = in_shape[0]
            layers: list[nn.Module] = []
            for _ in range(cfg.convs):
                layers += [nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            self.body = nn.Sequential(*layers)
            self.pool: nn.Module = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        elif len(in_shape) == 1:
            # A flattened activation has no spatial extent to convolve: the heads read it directly.
            c = in_shape[0]
            self.body = nn.Sequential()
            self.pool = nn.Sequential()
        else:
            raise PteenetError(
                f"cannot build a branch on a tensor of shape (B, {', '.join(map(str, in_shape))})",
                "exits need a (B, C, H, W) feature map or a (B, C) vector",
            )
        self.classifier = nn.Linear(c, num_classes)
        self.confidence = nn.Linear(c, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.pool(self.body(x))
        return self.classifier(z), self.confidence(z).squeeze(1)
