"""``export --format staged-onnx --quantize int8``: the staged program's pieces as static INT8,
and the INT8 backbone beside them.

The pieces are composed from ``runtime.ort_quant.QuantizedParts``: every stage quantized alone on
the FP32 values it sees and every deciding exit's head in FP32, then joined (``onnx.compose``) into one program per piece. These
are the very programs ``sweep-threshold --quantize int8`` caches and prices, quantized from the same
images (rows of the calibration split the sweep does not certify on: ``guarantee.structure_rows``),
so the exported program decides as the sweep measured it. The INT8 backbone is the same stage
programs joined without heads: with thresholds at which no sample leaves, the INT8 early-exit
program returns exactly its logits.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..exits import policies
from ..runtime.model import EarlyExitModel
from ..runtime.onnx import ort_session
from ..runtime.ort_quant import SETTINGS, QuantizedParts, join, quantize_parts
from ..sweep.quantized import quantization_images, stack
from . import driver

INT8_FOLDER = "staged_onnx_int8"
INT8_BACKBONE = "backbone_int8.onnx"


def quantize_staged(model: EarlyExitModel, fp32: Path, out: Path, images: torch.Tensor, record: dict[str, Any],
                    parts: QuantizedParts | None = None) -> list[str]:
    """The pieces listed in ``fp32`` (``export_pieces``'s manifest) as INT8 programs in ``out``,
    quantized on ``images`` (preprocessed calibration images), with the driver and manifest; the
    INT8 backbone at ``out.parent / INT8_BACKBONE``. Returns the names written beside ``fp32``.
    ``parts``: stage and head programs quantized on ``images`` before (``quantize_parts``), reused."""
    import onnx

    manifest = json.loads((fp32 / driver.MANIFEST).read_text())
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pteenet-int8-", dir=out.parent) as work:
        # Parts quantized before (by the INT8 sweep) keep their stages; their heads decide by the
        # policy of that time, so they are exported again where the model's setting changed since.
        parts = parts.for_model(model, images, Path(work) / "heads") if parts else quantize_parts(model, images, Path(work))
        for piece in manifest["pieces"]:
            first, last = piece["stages"]
            onnx.save(join(parts, first, last, piece["decides"], piece["inputs"], piece["outputs"]), str(out / piece["file"]))
        onnx.save(join(parts, 0, model.num_exits, False, ["x"], ["logits"]), str(out.parent / INT8_BACKBONE))
    manifest.update(precision="int8", quantization={**SETTINGS, **record})
    (out / driver.MANIFEST).write_text(json.dumps(manifest, indent=1))
    shutil.copyfile(driver.__file__, out / "run_staged.py")
    return [INT8_FOLDER, INT8_BACKBONE]


def evaluate_int8(model: EarlyExitModel, folder: Path, images: torch.Tensor, labels: torch.Tensor | None,
                  threads: int | None = None) -> dict[str, Any]:
    """The INT8 program of ``folder`` (thresholds as exported) and the INT8 backbone beside it, on
    ``images``: accuracy and agreement with the FP32 backbone (eager), per exit and overall."""
    staged = driver.StagedModel(folder / INT8_FOLDER, driver.onnx_runner(threads))
    backbone = ort_session(str(folder / INT8_BACKBONE), threads)
    preds, exits, int8_bb, fp32_bb = [], [], [], []
    with torch.no_grad():
        for x in images.split(256):
            logits, idx = staged.run(x.numpy())
            preds.append(logits.argmax(1))
            exits.append(idx)
            int8_bb.append(backbone.run(None, {"x": x.numpy()})[0].argmax(1))
            fp32_bb.append(model.backbone(x).argmax(1).numpy())
    p, e, q, f = (np.concatenate(v) for v in (preds, exits, int8_bb, fp32_bb))
    y = None if labels is None else labels.numpy()

    def rates(mask: np.ndarray, answer: np.ndarray) -> dict[str, Any]:
        n = int(mask.sum())
        return {"samples": n, "fraction": n / len(p),
                "accuracy": None if y is None or n == 0 else float((answer[mask] == y[mask]).mean()),
                "agreement_with_fp32_backbone": None if n == 0 else float((answer[mask] == f[mask]).mean())}

    everything = np.ones(len(p), dtype=bool)
    return {"images": len(p), "split": "test", "policy": model.policy, "thresholds": list(model.thresholds),
            "fp32_backbone_accuracy": None if y is None else float((f == y).mean()),
            "int8_backbone": rates(everything, q), "int8_early_exit": rates(everything, p),
            "per_exit": [{"exit": k if k < model.num_exits else "end", **rates(e == k, p)}
                         for k in range(model.num_exits + 1) if k == model.num_exits or model.active[k]]}


def onnx_decisions(model: EarlyExitModel, folder: Path, images: torch.Tensor, threads: int | None = None) -> dict[str, Any]:
    """The FP32 staged ONNX program of ``folder`` against the eager model (the values the sweep
    certified on), sample by sample on ``images``: how many leave at another exit. ONNX Runtime's
    kernels round differently from PyTorch's, so this is measured, not assumed (docs/how-it-works.md)."""
    staged = driver.StagedModel(folder, driver.onnx_runner(threads))
    differ = 0
    with torch.no_grad():
        for x in images.split(256):
            _, where = staged.run(x.numpy())
            differ += int((where != model.predict(x).exit_index.numpy()).sum())
    return {"images": len(images), "exits_differ": differ, "policy": model.policy, "thresholds": list(model.thresholds)}


def never_leave(model: EarlyExitModel) -> list[float]:
    """Thresholds at which no sample leaves: the INT8 program then runs the INT8 backbone."""
    return [policies.never_exit_threshold(model.policy)] * model.num_exits


REPORT_IMAGES = 2000  # test images the report measures the INT8 programs on


def quantization_data(model: EarlyExitModel, data: Any, n: int) -> tuple[torch.Tensor, dict[str, Any], Any]:
    """``n`` calibration images to quantize on (``sweep.quantized.quantization_images``: as the INT8
    sweep takes them), what to record of them, and the test split."""
    from ..data import DataRequest
    from ..errors import PteenetError

    if data is None and not model.meta.get("data"):
        raise PteenetError("--quantize int8 needs calibration images and the checkpoint records no data",
                           "pass --data SPEC (the data the exits were trained on)")
    splits, spec = _splits(model, data or DataRequest())
    images, record = quantization_images(splits.calibration, n, spec)
    return images, record, splits.test


def test_split(model: EarlyExitModel, data: Any) -> Any:
    """The test split of ``data`` (a ``DataRequest``), as the checkpoint's training held it out."""
    return _splits(model, data)[0].test


def _splits(model: EarlyExitModel, data: Any) -> tuple[Any, str | None]:
    from ..data import load_splits, resolve_data

    cfg, _ = resolve_data(data, model.meta.get("data"))
    return load_splits(cfg, model.info.preprocess, model.info.num_classes), cfg.spec


def test_images(test: Any) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The first ``REPORT_IMAGES`` test images and labels; None when the split is empty."""
    from torch.utils.data import Subset

    n = min(len(test), REPORT_IMAGES)
    return None if n == 0 else stack(Subset(test, list(range(n))))


def quant_images_for(model: EarlyExitModel, asked: int | None) -> int:
    """The images to quantize on: as asked, else the INT8 sweep's (so the programs are the swept ones)."""
    from ..runtime.ort_quant import DEFAULT_QUANT_IMAGES

    swept = ((model.meta.get("sweep") or {}).get("cost_model") or {}).get("quantization") or {}
    return asked or int(swept.get("images") or DEFAULT_QUANT_IMAGES)
