"""The two models of ``pteenet bench --runtime onnxruntime``, as a user deploys them: the plain
backbone exported whole, and the early-exit model as the staged program of ``pteenet export
--format staged-onnx`` driven by its own ``run_staged.py`` driver, both in ONNX Runtime on the CPU.

At batch 1 ONNX Runtime runs a CIFAR ResNet-56 in about a quarter of eager PyTorch's time, and the
staged program adds what eager does not have (one session call per deciding exit, the driver's
numpy work): a user who deploys the exported program needs the ratio measured in it, against the
plain backbone exported the same way, not eager's.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import PteenetError
from ..export.driver import StagedModel, onnx_runner
from ..export.quantize import INT8_BACKBONE, INT8_FOLDER, quantize_staged
from ..export.staged import export_pieces
from ..runtime.model import EarlyExitModel
from ..runtime.onnx import export_session, ort_session, require_onnxruntime


class OnnxPrediction:
    """What the early-exit run returns, shaped like ``runtime.model.Prediction`` for ``bench``."""

    def __init__(self, logits: np.ndarray, exit_index: np.ndarray) -> None:
        self.logits, self.exit_index = torch.from_numpy(logits), torch.from_numpy(exit_index)


@contextlib.contextmanager
def onnx_runs(model: EarlyExitModel, work: Path, thresholds: list[float], threads: int,
              int8: tuple[torch.Tensor, dict[str, Any]] | None = None) -> Iterator[dict[str, Callable[[torch.Tensor], Any]]]:
    """{"backbone", "early_exit"} as ONNX Runtime calls on CPU tensors (programs written under
    ``work``); ``threads``: ONNX Runtime's intra-op threads, as torch's for eager. ``int8``
    (calibration images and their record): also "backbone_int8" and "early_exit_int8", the
    programs of ``export --quantize int8``."""
    require_onnxruntime("bench --runtime onnxruntime")
    if model.runtime != "staged":
        raise PteenetError("a model run by forward hooks has no staged program", "bench in eager time (--runtime eager)")
    c, h, w = model.info.preprocess.input_size
    plain = export_session(model.backbone, (torch.zeros(2, c, h, w),), work / "backbone.onnx", threads, dynamic_batch=True,
                           hint="bench in eager time (--runtime eager)")
    export_pieces(model, work / "staged", onnx=True)
    staged = StagedModel(work / "staged", onnx_runner(threads))
    runs = {"backbone": lambda x: plain.run(None, {"in0": x.numpy()})[0],
            "early_exit": lambda x: OnnxPrediction(*staged.run(x.numpy(), thresholds))}
    if int8 is not None:
        quantize_staged(model, work / "staged", work / INT8_FOLDER, *int8)
        staged8 = StagedModel(work / INT8_FOLDER, onnx_runner(threads))
        plain8 = ort_session(str(work / INT8_BACKBONE), threads)
        runs.update(backbone_int8=lambda x: plain8.run(None, {"x": x.numpy()})[0],
                    early_exit_int8=lambda x: OnnxPrediction(*staged8.run(x.numpy(), thresholds)))
    yield runs
