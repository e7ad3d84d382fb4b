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


class _Mixer(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(c), nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        t = x.reshape(b, -1, c)  # (B, N, C) tokens, and back: channels stay last
        return (t + self.fc(self.norm(t))).reshape(b, h, w, c)


class _Merge(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm, self.reduction = nn.LayerNorm(4 * c), nn.Linear(4 * c, 2 * c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class TimmStyle(nn.Module):
    """Channels-last the way timm's Swin writes it (no torchvision Permute module, reshapes to tokens
    and back, patch merging by reshape/permute/flatten), and an optional forward argument."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.stage1, self.merge, self.stage2 = _Mixer(8), _Merge(8), _Mixer(16)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.stage2(self.merge(self.stage1(self.embed(x).permute(0, 2, 3, 1))))
        return self.head(x.mean((1, 2)))


def timm_style(num_classes: int = 10) -> nn.Module:
    return TimmStyle(num_classes)



def tanh_stack(num_classes: int = 1000, blocks: int = 18, width: int = 16) -> nn.Module:
    """``blocks`` [3x3 conv, tanh] at one resolution, global average pooling, BatchNorm and a linear
    classifier: a 1,000-class backbone for tests. A random net answers nearly one class for every
    input; the BatchNorm's statistics, set here on random blob images like ``synthetic``'s, centre
    the pooled features, so that the random classifier's argmax spreads over many classes."""
    gen = torch.Generator().manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.Tanh()]
    for _ in range(blocks):
        layers += [nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.Tanh())]
    norm = nn.BatchNorm1d(width, momentum=None)
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), norm, nn.Linear(width, num_classes))
    with torch.no_grad():
        for m in net.modules():  # weights from ``gen``: the same backbone on every call
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (3 / m.weight[0].numel()) ** 0.5)
                m.bias.zero_()
        blobs = torch.rand(512, 3, 4, 4, generator=gen)
        x = torch.nn.functional.interpolate(blobs, size=(8, 8), mode="bilinear") + 0.1 * torch.randn(512, 3, 8, 8, generator=gen)
        net.train()(((x.clamp(0, 1) - 0.45) / 0.25))
    return net.eval()
