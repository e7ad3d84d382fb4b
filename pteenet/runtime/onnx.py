"""ONNX export and ONNX Runtime sessions, the helpers every ONNX path in pteenet shares: the
exports of ``export/`` (programs, staged pieces), ``bench --runtime onnxruntime`` and the ONNX
Runtime profile (``ort_timing.py``)."""
from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import PteenetError, describe_error


@contextlib.contextmanager
def quiet_onnx_export() -> Iterator[None]:
    """torch.onnx prints progress on stdout (which belongs to --json) and its optimiser logs: both
    silenced for the export (every ONNX export in pteenet runs under this)."""
    loggers = [logging.getLogger(n) for n in ("onnx_ir", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def require_onnxruntime(what: str, hint: str = "pip install 'pteenet[onnx]'") -> None:
    """A one-line error naming ``what`` needs onnx and onnxruntime, where they are missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise PteenetError(f"{what} needs onnx and onnxruntime", hint) from None


def ort_session(source: str | bytes, threads: int | None) -> Any:
    """An ONNX Runtime CPU session on a file or a serialised model; ``threads``: intra-op threads
    (None: ONNX Runtime's default), one inter-op thread."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # the exporter leaves unused initialisers that ORT warns about
    if threads is not None:
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def export_session(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, threads: int | None,
                   dynamic_batch: bool = False, hint: str = "price in eager time (--deploy-runtime eager) or in MACs (--cost macs)") -> Any:
    """``module`` exported to ONNX at the shapes of ``args`` (the batch axis of every input dynamic
    with ``dynamic_batch``), inputs named in0.., and opened with ``ort_session``."""
    names = [f"in{i}" for i in range(len(args))]
    shapes = tuple({0: torch.export.Dim("batch", min=1)} for _ in args) if dynamic_batch else None
    try:
        with quiet_onnx_export():
            ep = torch.export.export(module.eval(), args, dynamic_shapes=shapes)
            torch.onnx.export(ep, f=str(path), dynamo=True, verbose=False, external_data=False, input_names=names)
    except Exception as e:
        raise PteenetError(f"cannot export {type(module).__name__} to ONNX: {describe_error(e)}", hint) from e
    return ort_session(str(path), threads)
