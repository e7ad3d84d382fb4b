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
import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import PteenetError, describe_error
from ..export.driver import StagedModel, onnx_runner
from ..export.staged import export_pieces
from ..runtime.model import EarlyExitModel


class OnnxPrediction:
    """What the early-exit run returns, shaped like ``runtime.model.Prediction`` for ``bench``."""

    def __init__(self, logits: np.ndarray, exit_index: np.ndarray) -> None:
        self.logits, self.exit_index = torch.from_numpy(logits), torch.from_numpy(exit_index)


def _plain_session(model: EarlyExitModel, path: Path, threads: int) -> Any:
    import onnxruntime as ort

    c, h, w = model.info.preprocess.input_size
    x = torch.zeros(2, c, h, w)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # torch.onnx prints progress; stdout belongs to --json
            ep = torch.export.export(model.backbone.eval(), (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
            torch.onnx.export(ep, f=str(path), dynamo=True, verbose=False, external_data=False, input_names=["x"])
    except Exception as e:
        raise PteenetError(f"cannot export the backbone to ONNX: {describe_error(e)}", "bench in eager time (--runtime eager)") from e
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = threads, 1, 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@contextlib.contextmanager
def onnx_runs(model: EarlyExitModel, work: Path, thresholds: list[float], threads: int
              ) -> Iterator[dict[str, Callable[[torch.Tensor], Any]]]:
    """{"backbone", "early_exit"} as ONNX Runtime calls on CPU tensors (programs written under
    ``work``); ``threads``: ONNX Runtime's intra-op threads, as torch's for eager."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise PteenetError("bench --runtime onnxruntime needs onnx and onnxruntime", "pip install 'pteenet[onnx]'") from None
    if model.runtime != "staged":
        raise PteenetError("a model run by forward hooks has no staged program", "bench in eager time (--runtime eager)")
    plain = _plain_session(model, work / "backbone.onnx", threads)
    export_pieces(model, work / "staged", onnx=True)
    staged = StagedModel(work / "staged", onnx_runner(threads))
    yield {"backbone": lambda x: plain.run(None, {"x": x.numpy()}),
           "early_exit": lambda x: OnnxPrediction(*staged.run(x.numpy(), thresholds))}
