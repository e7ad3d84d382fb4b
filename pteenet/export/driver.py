"""Run a staged early-exit program (``pteenet export --format staged-onnx``) without pteenet.

A staged program is one small program per piece of the model (the backbone stages up to an exit
that is computed, that exit's head, and its decision) plus ``staged.json``, which says how the
pieces connect. This driver runs them in order and stops at the first exit every sample has
left: only the rows still in flight go on to the next piece (for any batch size), and at batch 1
a sample that leaves costs one boolean read per exit. Nothing nests, so a model with many exits
exports as easily as one with a few (nested ``If`` / ``torch.cond`` of 27 exits does not export).

This file needs only numpy and, for ``.onnx`` pieces, onnxruntime; it is copied into the
exported folder as ``run_staged.py``::

    from run_staged import StagedModel
    model = StagedModel("export/staged_onnx")
    logits, exit_index = model.run(x)  # x: float32 [B, C, H, W]; exit_index E = ran to the end
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

MANIFEST = "staged.json"
Call = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


def onnx_runner(threads: int | None = None) -> Callable[[Path, dict[str, Any]], Call]:
    """Pieces as ONNX Runtime sessions (``threads``: intra-op threads, None: ONNX Runtime's default)."""
    import onnxruntime as ort

    def make(path: Path, piece: dict[str, Any]) -> Call:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # the exporter leaves unused initialisers that ORT warns about
        if threads is not None:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return lambda feeds: session.run(None, feeds)

    return make


class StagedModel:
    """The pieces of ``folder`` and the loop that runs them (``run``)."""

    def __init__(self, folder: str | Path, runner: Callable[[Path, dict[str, Any]], Call] | None = None) -> None:
        folder = Path(folder)
        manifest = json.loads((folder / MANIFEST).read_text())
        self.pieces: list[dict[str, Any]] = manifest["pieces"]
        self.num_exits: int = manifest["num_exits"]
        self.thresholds: list[float] = list(manifest["thresholds"])
        # Per-class thresholds [E][C] (pieces then read a [C] threshold); absent in older folders.
        self.class_thresholds: list[list[float]] | None = manifest.get("class_thresholds")
        self.policy: str = manifest["policy"]
        self.shrinkable: bool = manifest["shrinkable"]
        make = runner or onnx_runner()
        self.calls = [make(folder / p["file"], p) for p in self.pieces]

    def run(self, x: np.ndarray, thresholds: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(logits [B, K] of the exit each sample left at, exit index [B]: 0..E-1, E = the backbone's end).
        ``thresholds``: one per exit, in place of the recorded setting (and of its per-class table)."""
        t = self.thresholds if thresholds is None else [float(v) for v in thresholds]
        table = self.class_thresholds if thresholds is None else None
        n = x.shape[0]
        values: dict[str, np.ndarray] = {"s0": x}
        rows = np.arange(n)  # original position of each row in flight
        pending = np.ones(n, dtype=bool)  # rows still waiting for an answer
        exit_index = np.full(n, self.num_exits, dtype=np.int64)
        out: np.ndarray | None = None
        for piece, call in zip(self.pieces, self.calls):
            feeds = {name: values[name] for name in piece["inputs"] if name != "threshold"}
            if piece["decides"]:
                k = piece["exit"]
                width = len(self.class_thresholds[0]) if self.class_thresholds else 1
                feeds["threshold"] = np.asarray(table[k] if table else [t[k]] * width, dtype=np.float32)
            outs = dict(zip(piece["outputs"], call(feeds)))
            logits = outs["logits"]
            if out is None:
                out = np.empty((n, logits.shape[1]), dtype=logits.dtype)
            if piece["exit"] is None:  # the backbone's end
                out[rows[pending]] = logits[pending]
                break
            values = {name[len("next_"):]: v for name, v in outs.items() if name.startswith("next_")}
            if not piece["decides"]:
                continue
            leave = outs["leave"].reshape(-1).astype(bool) & pending
            if not leave.any():
                continue
            out[rows[leave]] = logits[leave]
            exit_index[rows[leave]] = piece["exit"]
            pending &= ~leave
            if not pending.any():
                break
            if self.shrinkable:  # else rows that left ride along and their later results are ignored
                keep = np.flatnonzero(pending)
                values = {name: v if axis is None else np.take(v, keep, axis=axis)
                          for (name, v), axis in zip(values.items(), (piece["next_axes"][k] for k in values))}
                rows, pending = rows[keep], pending[keep]
        assert out is not None
        return out, exit_index
