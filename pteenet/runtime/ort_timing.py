"""Where time goes in ONNX Runtime: the same ``TimeProfile`` as the eager one (runtime/timing.py),
measured on the programs a user deploys (``sweep-threshold --deploy-runtime onnxruntime``).

ONNX Runtime runs the plain ResNet-56 at batch 1 in about a quarter of eager PyTorch's time on a CPU,
and every part gets cheaper by its own factor, so exits priced in eager need not be the ones that pay
in the exported program (on CIFAR-10 ResNet-56 they were close: docs/speed.md). A staged program
(``staged.py``) makes one call per deciding
exit, holding the backbone stages since the previous one, the exit's head and its decision. To price
any exit selection, every backbone stage and every computed head with its decision is exported here
as a program of its own, at the profiled batch size, and timed in full passes in the runtime's
order (as ``timing._full_pass`` does in eager, so a head meets the caches a real pass leaves). A
call's fixed cost, timed on an empty program, is taken out of every stage: a head keeps it, since
each deciding exit adds one call. At batch > 1 the driver's row compaction (``np.take``) is timed
too. Exits without a cascade or an ensemble only (the default): a chained head reads the previous
heads' outputs, which this profile does not carry.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import PteenetError
from .model import EarlyExitModel
from .onnx import HeadProgram, StageProgram, export_session, ort_session, require_onnxruntime
from .ort_quant import QuantizedParts, join
from .timing import TimeProfile, machine

DEPLOY_RUNTIMES = ("eager", "onnxruntime")  # what --deploy-runtime prices in


def _empty_session(threads: int | None) -> Any:
    """A program that only passes one number through: what any call costs."""
    from onnx import TensorProto, helper

    io_ = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("a", "b")]
    graph = helper.make_graph([helper.make_node("Identity", ["a"], ["b"])], "empty", io_[:1], io_[1:])
    return ort_session(helper.make_model(graph).SerializeToString(), threads)


def _check(model: EarlyExitModel) -> None:
    require_onnxruntime("pricing in ONNX Runtime time", "pip install 'pteenet[onnx]', or price in eager time (--deploy-runtime eager)")
    if model.chained or model.runtime != "staged":
        why = "a cascade or an ensemble" if model.chained else "a backbone that could not be traced"
        raise PteenetError(f"ONNX Runtime pricing does not support {why}",
                           "price in eager time (--deploy-runtime eager), or attach without --cascade and train without --ensemble")


def _timed(fn: Callable[[], Any], into: list[float]) -> Any:
    t0 = time.perf_counter()
    out = fn()
    into.append(time.perf_counter() - t0)
    return out


def profile_onnx(model: EarlyExitModel, x: torch.Tensor, repeats: int = 5, warmup: int = 1,
                 threads: int | None = None, parts: QuantizedParts | None = None) -> TimeProfile:
    """``runtime.timing.profile`` in ONNX Runtime: each stage and each computed head (with its
    decision) as its own program at ``x``'s shape, timed in full passes; medians over ``repeats``.
    ``threads``: ONNX Runtime's intra-op threads (None: its default). ``parts``: time these INT8
    programs (``ort_quant.quantize_parts``) instead, against the INT8 backbone joined from them."""
    _check(model)
    stages, computed = model.stages.modules, model.computed_branches()
    thresholds = [np.asarray([t], dtype=np.float32) for t in model.thresholds]
    x = x.detach().float().cpu()
    with tempfile.TemporaryDirectory(prefix="pteenet-ort-") as tmp, torch.no_grad():
        work = Path(tmp)
        state: tuple[torch.Tensor, ...] = (x,)
        stage_s: list[Any] = []
        head_s: dict[int, Any] = {}
        if parts is not None:
            stage_s, head_s = parts.sessions(threads)
            backbone = ort_session(join(parts, 0, len(stages) - 1, False, ["in0"], ["logits"]).SerializeToString(), threads)
        for k, stage in enumerate(stages if parts is None else []):
            stage_s.append(export_session(StageProgram(stage), state, work / f"stage{k}.onnx", threads))
            out = StageProgram(stage)(*state)
            if k < len(stages) - 1:
                if computed[k]:
                    head_s[k] = export_session(HeadProgram(model.branches[k], model.policy),
                                         (out[-1], torch.tensor([0.5])), work / f"head{k}.onnx", threads)
                state = out[:-1]
        if parts is None:
            backbone = export_session(model.backbone, (x,), work / "backbone.onnx", threads)
        empty = _empty_session(threads)
        times = _passes(stage_s, head_s, thresholds, x.numpy(), backbone, empty, repeats + warmup)
    med = {key: 1e3 * statistics.median(v[warmup:]) for key, v in times.items()}
    call = med[("call", 0)]
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = None
    import onnxruntime as ort

    return TimeProfile(
        x.shape[0], [max(med[("stage", k)] - call, 0.0) for k in range(len(stages))],
        [med.get(("head", k), 0.0) for k in range(model.num_exits)], med[("backbone", 0)], 0.0,
        [med.get(("compaction", k), 0.0) for k in range(model.num_exits)] if x.shape[0] > 1 else [],
        {**machine(), "runtime": "onnxruntime", "onnxruntime": ort.__version__,
         "threads": threads if threads is not None else "onnxruntime default",
         "precision": "fp32" if parts is None else "int8",
         "note": "each deciding exit's head includes its decision and one call's fixed cost"}, load)


def _passes(stage_s: Sequence[Any], head_s: dict[int, Any], thresholds: Sequence[np.ndarray], x: np.ndarray,
            backbone: Any, empty: Any, rounds: int) -> dict[tuple[str, int], list[float]]:
    """``rounds`` full passes (stage, head, stage, ... as the staged program runs them), each call
    timed where it runs, with the whole backbone and an empty call between passes."""
    times: dict[tuple[str, int], list[float]] = {}
    one = np.zeros(1, dtype=np.float32)
    keep = np.arange(max(1, (9 * x.shape[0]) // 10))
    for _ in range(rounds):
        values = [x]
        for k, sess in enumerate(stage_s):
            feeds = {f"in{i}": v for i, v in enumerate(values)}
            out = _timed(lambda: sess.run(None, feeds), times.setdefault(("stage", k), []))
            if k == len(stage_s) - 1:
                break
            values = out[:-1]
            if k in head_s:
                tap = out[-1]
                _timed(lambda: head_s[k].run(None, {"in0": tap, "in1": thresholds[k]}), times.setdefault(("head", k), []))
                if x.shape[0] > 1:
                    _timed(lambda: [np.take(v, keep, axis=0) for v in values], times.setdefault(("compaction", k), []))
        _timed(lambda: backbone.run(None, {"in0": x}), times.setdefault(("backbone", 0), []))
        _timed(lambda: empty.run(None, {"a": one}), times.setdefault(("call", 0), []))
    return times
