"""Which timm models attach, split into stages and reproduce their logits: a representative set of
families (ResNet, EfficientNet, ConvNeXt, RegNet, MobileNetV3, ViT, DeiT, Swin), random weights
(``pretrained=False``: no hub is needed), with the same check as ``torchvision_coverage.py``: 2 exits
by cost, batch 3, the staged model with no exit taken against the backbone (``exact``: bit-identical;
``ok``: within 1e-5 of the logits' scale), then every sample out at the first exit (the shrinking
batch path). 64x64 first; models that need more (fixed-size transformers) at 224x224.

    pip install timm   # or pip install -e '.[timm]'
    python benchmarks/timm_coverage.py [--out benchmarks/results] [--only resnet18 vit_tiny_patch16_224]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import timm
import torch

from torchvision_coverage import survey

FAMILIES = {
    "ResNet": ["resnet18", "resnet50", "resnet50d"],
    "EfficientNet": ["efficientnet_b0", "tf_efficientnetv2_b0"],
    "ConvNeXt": ["convnext_atto", "convnext_tiny"],
    "RegNet": ["regnetx_002", "regnety_004"],
    "MobileNetV3": ["mobilenetv3_small_100", "mobilenetv3_large_100"],
    "ViT": ["vit_tiny_patch16_224", "vit_small_patch16_224"],
    "DeiT": ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"],
    "Swin": ["swin_tiny_patch4_window7_224"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--only", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for family, names in FAMILIES.items():
        for name in names:
            if args.only and name not in args.only:
                continue
            rows.append({"family": family, **survey(name, prefix="timm")})
            print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"torch": torch.__version__, "timm": timm.__version__, "weights": "random (pretrained=False)",
           "models": rows, "ok": sum(r["ok"] for r in rows), "exact": sum(bool(r.get("exact")) for r in rows),
           "total": len(rows)}
    (args.out / "timm_coverage.json").write_text(json.dumps(doc, indent=1))
    print(f"{doc['ok']}/{doc['total']} timm models attach and reproduce their logits ({doc['exact']} bit-exactly)")


if __name__ == "__main__":
    main()
