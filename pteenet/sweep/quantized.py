"""``sweep-threshold --deploy-runtime onnxruntime --quantize int8``: the exit cache and the prices
of the INT8 program that ships, not of the FP32 model.

Every stage is quantized once (``runtime.ort_quant.quantize_parts``; the heads stay FP32) on images of
the calibration split's structure share (``guarantee.structure_rows``: they choose, they never
certify). The calibration and test caches are then computed by running those INT8 programs in ONNX
Runtime, and the profile is timed on them, against the INT8 backbone joined from the same stage
programs. ``export --quantize int8`` composes its pieces from the same programs, quantized on the
same images, so the thresholds certified here are certified on what the exported program computes.

Drops and agreement are measured against the FP32 backbone (``ExitCache.reference``, run in eager
PyTorch): a sample that takes no exit answers with the INT8 backbone's logits, and where those
differ from FP32 that counts against the guarantee too. The promise covers quantization and exits
together.
"""
from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from ..configs import check_choice, check_int
from ..data import make_loader
from ..errors import PteenetError
from ..evaluation.cache import ExitCache, ExitCacheBuilder
from ..progress import SILENT, Sink
from ..runtime.model import EarlyExitModel
from ..runtime.ort_quant import (
    DEFAULT_QUANT_IMAGES,
    PRECISIONS,
    SETTINGS,
    QuantizedParts,
    check_quant_images,
    quantize_parts,
)
from .guarantee import SPLIT_SEED, STRUCTURE_SHARE, structure_rows


def stack(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A dataset's images and labels in memory (labels None where it has none)."""
    xs, ys = [], []
    for x, y in make_loader(dataset, 256, shuffle=False):
        xs.append(x)
        ys.append(torch.as_tensor(y))
    labels = torch.cat(ys)
    return torch.cat(xs), None if bool((labels < 0).all()) else labels


def quantization_images(calibration: Dataset, n: int, spec: str | None) -> tuple[torch.Tensor, dict[str, Any]]:
    """The images INT8 programs are quantized on: the first ``n`` rows of the calibration split's
    structure share; and the record that says so (export reads it to quantize the same way)."""
    rows = structure_rows(len(calibration), SPLIT_SEED)  # type: ignore[arg-type]
    check_quant_images(len(rows), n, f"the structure share ({STRUCTURE_SHARE:.0%}) of the calibration split")
    images, _ = stack(Subset(calibration, rows[:n].tolist()))
    return images, {"images": n, "seed": SPLIT_SEED, "data": spec,
                    "rows": f"the first {n} of the calibration split's structure share (seed {SPLIT_SEED})"}


def check_int8(quantize: str | None, deploy_runtime: str, cost: str, split: str, quant_images: int) -> None:
    """``SweepConfig``'s INT8 fields: int8 needs ONNX Runtime time and the calibration split."""
    check_int("quant_images", quant_images, 1, f"e.g. --quant-images {DEFAULT_QUANT_IMAGES}")
    if quantize is None:
        return
    check_choice("quantize", quantize, PRECISIONS[1:])
    if deploy_runtime != "onnxruntime" or cost != "time":
        raise PteenetError("--quantize int8 runs and prices the INT8 program in ONNX Runtime",
                           "add --deploy-runtime onnxruntime (and price in time: drop --cost macs)")
    if split != "calibration":
        raise PteenetError("--quantize int8 quantizes on calibration images and certifies on others",
                           "sweep the calibration split (--split calibration)")


class Int8Exits:
    """The INT8 stage and head programs of a model, run in ONNX Runtime over a split."""

    def __init__(self, model: EarlyExitModel, parts: QuantizedParts, threads: int | None) -> None:
        self.model, self.parts = model, parts
        self.stages, self.heads = parts.sessions(threads)

    def run(self, x: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
        """Every exit's logits and confidence logit, and the INT8 backbone's logits."""
        logits, conf = [], []
        values = [x]
        for k, sess in enumerate(self.stages):
            out = sess.run(None, {f"in{i}": v for i, v in enumerate(values)})
            if k == len(self.stages) - 1:
                return logits, conf, out[0]
            values = out[:-1]
            lg, _, cf = self.heads[k].run(None, {"in0": out[-1], "in1": np.zeros(1, dtype=np.float32)})
            logits.append(lg)
            conf.append(cf)
        raise AssertionError("a model has a last stage")

    def cache(self, dataset: Dataset, batch_size: int, workers: int, sink: Sink = SILENT, description: str = "exits") -> ExitCache:
        """The exit cache of ``dataset`` on the INT8 programs, measured against the FP32 backbone."""
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise PteenetError(f"the {description} split is empty", "check the data and its split")
        builder = ExitCacheBuilder()
        loader = make_loader(dataset, batch_size, shuffle=False, workers=workers)
        with sink.task(f"{description}, INT8 ({len(dataset)} images)", len(loader)) as task, torch.no_grad():  # type: ignore[arg-type]
            for batch in loader:
                x, y = (batch[0], batch[1]) if isinstance(batch, (list, tuple)) else (batch, None)
                x = x.float().cpu()
                logits, conf, final = self.run(x.numpy())
                reference = self.model.backbone(x).argmax(1)
                builder.add([torch.from_numpy(v) for v in logits], [torch.from_numpy(v) for v in conf],
                            torch.from_numpy(final), None if y is None else torch.as_tensor(y), reference)
                task.advance()
        return builder.build_for(self.model)


@contextlib.contextmanager
def int8_exits(model: EarlyExitModel, calibration: Dataset, n: int, spec: str | None, threads: int | None,
               sink: Sink = SILENT, elsewhere: bool = False) -> Iterator[tuple[Int8Exits, dict[str, Any]]]:
    """Every stage of ``model`` quantized on ``n`` structure-share images of ``calibration`` (the
    heads in FP32), every head computed (exit selection chooses among them); with the record of
    how (``cost_model["quantization"]``). ``elsewhere``: the sweep runs on another device or under
    torchrun, which INT8 programs do not."""
    if elsewhere:
        raise PteenetError("--quantize int8 runs the INT8 program in ONNX Runtime on the CPU, in one process",
                           "pass --device cpu and run without torchrun")
    if model.chained:
        raise PteenetError("INT8 sweeps do not support a cascade or an ensemble",
                           "sweep in FP32 (drop --quantize), or attach without --cascade and train without --ensemble")
    images, record = quantization_images(calibration, n, spec)
    saved = model.active
    model.set_active(None)
    try:
        with tempfile.TemporaryDirectory(prefix="pteenet-int8-") as tmp:
            with sink.task(f"quantizing every stage to INT8 on {n} images", 1) as task:
                parts = quantize_parts(model.cpu(), images, Path(tmp))
                task.advance()
            sink.note("INT8: the exits' answers come from the INT8 programs, drops and agreement are against the FP32 backbone")
            yield Int8Exits(model, parts, threads), {**SETTINGS, **record}
    finally:
        model.set_active(saved)
