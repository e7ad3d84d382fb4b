"""Which torchvision classification models attach, split into stages and reproduce their logits.

For every name in ``torchvision.models.list_models(module=torchvision.models)``, random weights,
batch 3: attach 2 exits by cost (``linear``), run the staged model with no exit taken and compare its
logits with the backbone's (allclose, atol 1e-5 relative to the logits' scale); then let the rows
whose exit-0 score reaches the median leave there and check that the rest, run on in a smaller batch,
still get the backbone's logits; then force every sample out at the first exit. Each row records the layout
the exits' branches read (chw, hwc: channels-last, tokens). Small inputs (64x64) first;
models that need more (fixed-size transformers, Inception) are retried at 224x224.

    python benchmarks/torchvision_coverage.py [--out benchmarks/results] [--only resnet18 vit_b_16]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torchvision.models as tvm

from pteenet import AttachConfig, PteenetError
from pteenet import attach
from pteenet.exits.policies import never_exit_threshold, score


def check(name: str, size: int, prefix: str = "torchvision", hooks: bool = False) -> dict[str, Any]:
    """One model (``prefix:name``) at ``size`` x ``size``; also used by timm_coverage.py. ``hooks``:
    the forward-hooks fallback (no real early exit: nothing shrinks, the logits must still match)."""
    t0 = time.time()
    model = attach(AttachConfig(backbone=f"{prefix}:{name}", input_size=(3, size, size), exits=2, placement="linear",
                                hooks=hooks))
    x = torch.randn(3, 3, size, size)
    never = never_exit_threshold("max-softmax")
    with torch.no_grad():
        ref = model.backbone(x)
        model.set_thresholds(never, "max-softmax")
        staged = model.predict(x).logits
        diff = float((staged - ref).abs().max())
        scale = float(ref.abs().max()) or 1.0
        # Rows leave mid-way: those whose exit-0 score reaches the median leave there, the rest run on
        # in a smaller batch to the end, where they must still get the backbone's logits.
        every = model.forward_all(x)
        median = float(score("max-softmax", every.exit_logits[0], every.exit_conf[0]).median())
        mid = model.predict(x, [median] + [never] * (model.num_exits - 1), "max-softmax")
        stay = mid.exit_index == model.num_exits
        mid_diff = float((mid.logits[stay] - ref[stay]).abs().max()) if bool(stay.any()) else 0.0
        model.set_thresholds(0.0, "max-softmax")
        first = model.predict(x)
    tol = 1e-5 * max(1.0, scale)
    return {
        "model": name, "input": size, "ok": diff <= tol and mid_diff <= tol, "exact": diff == 0, "max_abs_diff": diff,
        "rows_left_at_exit0": int((mid.exit_index == 0).sum()), "max_abs_diff_after_rows_left": mid_diff,
        "exits": [p.name for p in model.exit_points], "layouts": [p.layout for p in model.exit_points],
        "tap_shapes": [list(t) for t in model.tap_shapes], "shrinkable": model.stages.shrinkable,
        "backbone_macs": model.cost.backbone_macs if model.cost else None,
        "all_left_at_exit0": bool((first.exit_index == 0).all()), "seconds": round(time.time() - t0, 1),
    }


def survey(name: str, prefix: str = "torchvision") -> dict[str, Any]:
    """``check`` at 64x64, and at 224x224 where 64 fails; a failure is recorded with its message."""
    row: dict[str, Any] = {"model": name, "ok": False}
    failed: dict[int, str] = {}
    for size in (64, 224):
        try:
            return {**check(name, size, prefix), **({"failed_at": failed} if failed else {})}
        except PteenetError as e:
            failed[size] = str(e)[:300]
        except Exception as e:  # noqa: BLE001 - we are surveying failures
            failed[size] = f"{type(e).__name__}: {str(e)[:300]}"
        row = {"model": name, "ok": False, "input": size, "error": failed[size],
               **({"failed_at": failed} if len(failed) > 1 else {})}
    if "torch.fx cannot trace" in row["error"]:
        # The labelled fallback (``attach --hooks``): exits computed, no real early exit.
        try:
            row["hooks_fallback"] = check(name, row["input"], prefix, hooks=True)
        except Exception as e:  # noqa: BLE001 - we are surveying failures
            row["hooks_fallback"] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--update", action="store_true", help="merge these models' rows into the existing results file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.only or tvm.list_models(module=tvm):
        rows.append(survey(name))
        print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "torchvision_coverage.json"
    if args.update and path.exists():
        fresh = {r["model"]: r for r in rows}
        rows = [fresh.pop(r["model"], r) for r in json.loads(path.read_text())["models"]] + list(fresh.values())
    doc = {"torch": torch.__version__, "torchvision": tvm.__name__ and __import__("torchvision").__version__,
           "models": rows, "ok": sum(r["ok"] for r in rows), "total": len(rows)}
    path.write_text(json.dumps(doc, indent=1))
    print(f"{doc['ok']}/{doc['total']} models attach and reproduce their logits")


if __name__ == "__main__":
    main()
