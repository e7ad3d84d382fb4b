"""``export --format staged-onnx --quantize int8``: the staged program's pieces as static INT8,
and the INT8 backbone beside them.

The pieces are composed from ``runtime.ort_quant.QuantizedParts``: every stage and head quantized
alone on the FP32 values it sees, then joined (``onnx.compose``) into one program per piece. These
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
from ..runtime.ort_quant import SETTINGS, QuantizedParts, quantize_parts
from . import driver

INT8_FOLDER = "staged_onnx_int8"
INT8_BACKBONE = "backbone_int8.onnx"


def _join(parts: QuantizedParts, first: int, last: int, head: bool, inputs: list[str], outputs: list[str]) -> Any:
    """Stages ``first``..``last`` (and ``last``'s head) as one ONNX program: each part's inputs fed
    from the one before by Identity nodes (free in ONNX Runtime), inputs and outputs renamed as a
    piece's (``inputs``: the state, then ``threshold`` with a head; ``outputs``: the state passed on,
    then ``logits`` and ``leave``; at the backbone's end ``logits`` alone)."""
    import onnx
    from onnx import compose, helper

    models = [(f"st{k}_", onnx.load(str(parts.stage_file(k)))) for k in range(first, last + 1)]
    if head:
        models.append((f"hd{last}_", onnx.load(str(parts.head_file(last)))))
    models = [(p, compose.add_prefix(m, p)) for p, m in models]
    nodes, inits, vinfo = [], [], []
    for _, m in models:
        nodes += list(m.graph.node)
        inits += list(m.graph.initializer)
        vinfo += list(m.graph.value_info)
    link = [helper.make_node("Identity", [src], [dst]) for src, dst in _links(models, head, inputs)]
    stage_in = [n for n in inputs if n != "threshold"]
    g_in = [_renamed(models[0][1].graph.input[i], n) for i, n in enumerate(stage_in)]
    g_in += [_renamed(models[-1][1].graph.input[1], "threshold")] if head else []
    last_stage = models[len(models) - 1 - head][1]
    sources = list(last_stage.graph.output)[:len(outputs) - 2] + list(models[-1][1].graph.output)[:2] if head \
        else list(last_stage.graph.output)[:1]
    out_links = [helper.make_node("Identity", [src.name], [name]) for name, src in zip(outputs, sources)]
    g_out = [_renamed(src, name) for name, src in zip(outputs, sources)]
    graph = helper.make_graph(link + nodes + out_links, "piece", g_in, g_out, inits, value_info=vinfo)
    return helper.make_model(graph, opset_imports=models[0][1].opset_import, ir_version=models[0][1].ir_version)


def _links(models: list[tuple[str, Any]], head: bool, inputs: list[str]) -> list[tuple[str, str]]:
    """(source, input) pairs: the piece's inputs into the first stage, each stage's state into the
    next, the last stage's tap and the threshold into the head."""
    pairs = [(name, models[0][1].graph.input[i].name) for i, name in enumerate(inputs) if name != "threshold"]
    stages = models[:len(models) - head]
    for (_, a), (_, b) in zip(stages, stages[1:]):
        pairs += [(a.graph.output[i].name, b.graph.input[i].name) for i in range(len(b.graph.input))]
    if head:
        h, s = models[-1][1], stages[-1][1]
        pairs += [(s.graph.output[len(s.graph.output) - 1].name, h.graph.input[0].name), ("threshold", h.graph.input[1].name)]
    return pairs


def _renamed(info: Any, name: str) -> Any:
    out = type(info)()
    out.CopyFrom(info)
    out.name = name
    return out


def quantize_staged(model: EarlyExitModel, fp32: Path, out: Path, images: torch.Tensor, record: dict[str, Any]) -> list[str]:
    """The pieces listed in ``fp32`` (``export_pieces``'s manifest) as INT8 programs in ``out``,
    quantized on ``images`` (preprocessed calibration images), with the driver and manifest; the
    INT8 backbone at ``out.parent / INT8_BACKBONE``. Returns the names written beside ``fp32``."""
    import onnx

    manifest = json.loads((fp32 / driver.MANIFEST).read_text())
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pteenet-int8-", dir=out.parent) as work:
        parts = quantize_parts(model, images, Path(work))
        for piece in manifest["pieces"]:
            first, last = piece["stages"]
            onnx.save(_join(parts, first, last, piece["decides"], piece["inputs"], piece["outputs"]), str(out / piece["file"]))
        onnx.save(_join(parts, 0, model.num_exits, False, ["x"], ["logits"]), str(out.parent / INT8_BACKBONE))
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


def never_leave(model: EarlyExitModel) -> list[float]:
    """Thresholds at which no sample leaves: the INT8 program then runs the INT8 backbone."""
    return [policies.never_exit_threshold(model.policy)] * model.num_exits


REPORT_IMAGES = 2000  # test images the report measures the INT8 programs on


def _stack(dataset: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    from ..data import make_loader

    xs, ys = [], []
    for x, y in make_loader(dataset, 256, shuffle=False):
        xs.append(x)
        ys.append(torch.as_tensor(y))
    labels = torch.cat(ys)
    return torch.cat(xs), None if bool((labels < 0).all()) else labels


def quantization_data(model: EarlyExitModel, data: Any, n: int) -> tuple[torch.Tensor, dict[str, Any], Any]:
    """``n`` calibration images to quantize on (the first ``n`` rows of the structure share of the
    calibration split, as the INT8 sweep takes them), what to record of them, and the test split."""
    from torch.utils.data import Subset

    from ..data import DataRequest, load_splits, resolve_data
    from ..errors import PteenetError
    from ..runtime.ort_quant import check_quant_images
    from ..sweep.guarantee import SPLIT_SEED, STRUCTURE_SHARE, structure_rows

    if data is None and not model.meta.get("data"):
        raise PteenetError("--quantize int8 needs calibration images and the checkpoint records no data",
                           "pass --data SPEC (the data the exits were trained on)")
    cfg, _ = resolve_data(data or DataRequest(), model.meta.get("data"))
    splits = load_splits(cfg, model.info.preprocess, model.info.num_classes)
    rows = structure_rows(len(splits.val), SPLIT_SEED)  # type: ignore[arg-type]
    check_quant_images(len(rows), n, f"the structure share ({STRUCTURE_SHARE:.0%}) of the calibration split")
    images, _ = _stack(Subset(splits.val, rows[:n].tolist()))
    record = {"images": n, "rows": f"the first {n} of the calibration split's structure share (seed {SPLIT_SEED})",
              "data": cfg.spec}
    return images, record, splits.test


def test_images(test: Any) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The first ``REPORT_IMAGES`` test images and labels; None when the split is empty."""
    from torch.utils.data import Subset

    n = min(len(test), REPORT_IMAGES)
    return None if n == 0 else _stack(Subset(test, list(range(n))))
