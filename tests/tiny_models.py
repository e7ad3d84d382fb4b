"""Tiny backbones for tests, importable as ``tiny_models:FACTORY`` backbone specs (pytest puts tests/
on sys.path): a ViT and a Swin built from torchvision's classes, and a CNN torch.fx cannot trace."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

SIZE = (3, 32, 32)


def vit(num_classes: int = 10) -> nn.Module:
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                             num_classes=num_classes)


def swin(num_classes: int = 10) -> nn.Module:
    return SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[2, 2], num_heads=[2, 2], window_size=[2, 2],
                           num_classes=num_classes)


class Branchy(nn.Module):
    """Data-dependent control flow (``if x.mean() > 0``): torch.fx cannot trace it."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if x.mean() > 0:  # data-dependent: fx refuses this
            x = x * 0.5
        x = self.block2(self.block1(x))
        return self.head(x.mean((2, 3)))


def branchy(num_classes: int = 10) -> nn.Module:
    return Branchy(num_classes)
