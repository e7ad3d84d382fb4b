"""ONNX export and ONNX Runtime sessions, the helpers every ONNX path in pteenet shares: the
exports of ``export/`` (programs, staged pieces), ``bench --runtime onnxruntime`` and the ONNX
Runtime profile (``ort_timing.py``)."""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import PteenetError, describe_error
from ..exits import policies


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


def export_onnx(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, dynamic_batch: bool | Sequence[bool] = False,
                names: Sequence[str] | None = None, output_names: Sequence[str] | None = None, hint: str = "price in eager time (--deploy-runtime eager) or in MACs (--cost macs)") -> None:
    """``module`` exported to ONNX at ``path`` at the shapes of ``args``; ``dynamic_batch``: the batch
    axis of every input (or of those flagged) dynamic; inputs named ``names`` (default in0..)."""
    names = list(names or [f"in{i}" for i in range(len(args))])
    flags = [dynamic_batch] * len(args) if isinstance(dynamic_batch, bool) else list(dynamic_batch)
    shapes: Any = tuple({0: torch.export.Dim("batch", min=1)} if f else None for f in flags) if any(flags) else None
    params = inspect.signature(module.forward).parameters.values()
    if shapes is not None and any(p.kind is p.VAR_POSITIONAL for p in params):
        shapes = (shapes,)  # forward(*values): torch.export wants the shapes nested as the arguments are
    try:
        with quiet_onnx_export():
            ep = torch.export.export(module.eval(), args, dynamic_shapes=shapes)
            torch.onnx.export(ep, f=str(path), dynamo=True, verbose=False, external_data=False, input_names=names,
                              output_names=None if output_names is None else list(output_names))
    except Exception as e:
        raise PteenetError(f"cannot export {type(module).__name__} to ONNX: {describe_error(e)}", hint) from e


def export_session(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, threads: int | None,
                   dynamic_batch: bool = False, hint: str = "price in eager time (--deploy-runtime eager) or in MACs (--cost macs)") -> Any:
    """``export_onnx`` (inputs named in0..), opened with ``ort_session``."""
    export_onnx(module, args, path, dynamic_batch, hint=hint)
    return ort_session(str(path), threads)


class StageProgram(nn.Module):
    """Backbone stage k alone, as the ONNX Runtime profile and the INT8 parts run it: its input
    values in, (values out..., tap) out."""

    def __init__(self, stage: nn.Module) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.stage(*state)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


class HeadProgram(nn.Module):
    """Exit k's head and decision, as a staged piece ends: (tap, threshold) -> (logits, leave,
    conf), ``conf`` the confidence head's logit (what the exit cache scores every policy from)."""

    def __init__(self, branch: nn.Module, policy: str) -> None:
        super().__init__()
        self.branch, self.policy = branch, policy

    def forward(self, tap: torch.Tensor, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, conf = self.branch(tap)
        leave = policies.passes(self.policy, policies.score(self.policy, logits, conf), threshold[0])
        return logits.clone(), leave, conf.reshape(-1).clone()
