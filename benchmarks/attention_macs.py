"""Which MAC count to trust for transformers: thop, torch's FlopCounterMode, or pteenet's count.

For each model (random weights, batch 1, its own input size), counts the whole backbone's MACs five
ways: ``thop.profile`` (per-module rules); FlopCounterMode / 2 in eval mode without grad (the way
inference runs: nn.MultiheadAttention takes its fused path); FlopCounterMode / 2 on the unfused path
(train mode, no dropout in these models, attention asked for its weights, so every matmul is a
visible aten op); pteenet's count (``cost.node_macs``: thop's rules where it has one, its own rule
for nn.MultiheadAttention, FlopCounterMode elsewhere); and torchvision's published figure
(``weights.meta["_ops"]``, GFLOPS that are MACs).

    python benchmarks/attention_macs.py [--models vit_b_16 swin_t resnet50] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import thop
import torch
import torchvision.models as tvm
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pteenet.tracing.cost import cumulative_macs, node_macs
from pteenet.tracing.graph import trace


def counts(name: str) -> dict[str, float]:
    weights = tvm.get_model_weights(name).DEFAULT
    size = weights.transforms().crop_size[0]
    model = tvm.get_model(name, weights=None).eval()
    x = torch.zeros(1, 3, size, size)
    with torch.no_grad():
        thop_macs, _ = thop.profile(copy.deepcopy(model), inputs=(x,), verbose=False)
        with FlopCounterMode(display=False) as fused:
            model(x)
        mha = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
        hooks = [m.register_forward_pre_hook(lambda mod, a, kw: (a, {**kw, "need_weights": True}), with_kwargs=True)
                 for m in mha]
        model.train()
        with FlopCounterMode(display=False) as unfused:
            model(x)
        model.eval()
        for h in hooks:
            h.remove()
    tb = trace(model, (3, size, size))
    ours = cumulative_macs(tb, node_macs(tb, (3, size, size)))[-1]
    return {"model": name, "input": size, "thop": float(thop_macs), "flop_counter_eval": fused.get_total_flops() / 2,
            "flop_counter_unfused": unfused.get_total_flops() / 2, "pteenet": float(ours),
            "torchvision_published": float(weights.meta["_ops"]) * 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["vit_b_16", "swin_t", "resnet50"])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.models:
        rows.append(counts(name))
        print(json.dumps({k: (f"{v / 1e9:.3f}G" if isinstance(v, float) else v) for k, v in rows[-1].items()}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attention_macs.json").write_text(json.dumps({"torch": torch.__version__, "models": rows}, indent=1))


if __name__ == "__main__":
    main()
