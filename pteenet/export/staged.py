"""Staged programs: the early exit itself as one small program per piece, for any batch size.

A piece runs the backbone stages from one computed exit to the next, that exit's head (with what
earlier heads carry: cascade logits, ensemble sums) and, for an exit that decides, its decision:
``leave`` [B] (the policy is built in, the threshold is an input). Stages whose exit is not computed
(exit selection) are folded into the next piece, so they cost no call. The driver
(``driver.StagedModel``, copied into the folder) runs the pieces in order, keeps only the rows still
in flight, and stops once every row has left. Nothing nests: where 27 nested ``torch.cond`` exceed
Dynamo's recursion limit, 28 pieces export one after another.

Inputs of a piece are named ``s0..`` (the backbone state entering it, ``s0`` the image for the
first), ``prev`` / ``acc`` (the carry) and ``threshold`` [1]; outputs ``next_<input name>`` for
what the next piece reads, ``logits`` and ``leave``. ``staged.json`` lists them, with the batch axis
of every value the driver compacts.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import PteenetError
from ..exits import policies
from ..exits.chain import Carry, exit_step
from ..runtime.model import EarlyExitModel
from . import driver


@dataclass
class PieceSpec:
    first: int  # the first backbone stage it runs
    last: int  # the last one: an exit's stage, or E for the backbone's end
    decides: bool  # exit ``last`` takes a decision (else its head only feeds later exits)
    n_state: int  # backbone values entering it
    prev: bool  # carry layout entering it (cascade logits, ensemble sums)
    acc: bool

    def input_names(self) -> list[str]:
        return [f"s{j}" for j in range(self.n_state)] + ["prev"] * self.prev + ["acc"] * self.acc + ["threshold"] * self.decides


def plan(model: EarlyExitModel) -> list[PieceSpec]:
    """The pieces the model runs as: one per computed head, then the rest of the backbone. The carry
    layout and state sizes come from one eager pass on two images."""
    n_exits = model.num_exits
    computed = model.computed_heads()
    c, h, w = model.info.preprocess.input_size
    specs: list[PieceSpec] = []
    with torch.no_grad():
        state: tuple[Any, ...] = (torch.zeros(2, c, h, w, device=next(model.parameters()).device),)
        carry, first = Carry(), 0
        for k, stage in enumerate(model.stages.modules):
            if k == 0 or specs and specs[-1].last == k - 1:
                entering = (len(state), carry.prev is not None, carry.acc is not None)
                first = k
            if any(not isinstance(v, torch.Tensor) for v in state):
                raise PteenetError("a backbone stage passes a non-tensor value on: staged programs carry tensors only",
                                   "export --format static-onnx or safetensors")
            if k == n_exits:
                specs.append(PieceSpec(first, k, False, entering[0], entering[1], entering[2]))
                break
            out = stage(*state)
            state = tuple(out[:-1])
            if computed[k]:
                _, _, _, carry = exit_step(model.branches[k], model.ensemble, k, out[-1], carry)
                specs.append(PieceSpec(first, k, bool(model.active[k]), *entering))
    return specs


class Piece(nn.Module):
    """One piece (``PieceSpec``) as a module: inputs and outputs as ``PieceSpec.input_names`` says."""

    def __init__(self, model: EarlyExitModel, spec: PieceSpec, final: bool) -> None:
        super().__init__()
        self.spec, self.final, self.policy = spec, final, model.policy
        self.stages = nn.ModuleList(model.stages.modules[spec.first:spec.last + 1])
        self.branch = None if final else model.branches[spec.last]
        self.ensemble = model.ensemble

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        s = self.spec
        state: tuple[Any, ...] = tuple(inputs[:s.n_state])
        it = iter(inputs[s.n_state:])
        carry = Carry(next(it) if s.prev else None, next(it) if s.acc else None)
        for stage in self.stages[:-1]:
            state = tuple(stage(*state)[:-1])  # stages whose exit is not computed: the tap is unused
        if self.final:
            return (self.stages[-1](*state),)
        out = self.stages[-1](*state)
        _, logits, conf, carry = exit_step(self.branch, self.ensemble, s.last, out[-1], carry)
        outs = (*out[:-1], *carry.tensors(), logits.clone())
        if s.decides:
            threshold = next(it)
            outs += (policies.passes(self.policy, policies.score(self.policy, logits, conf), threshold[0]),)
        return outs


def _output_names(spec: PieceSpec, nxt: PieceSpec | None) -> list[str]:
    if nxt is None:
        return ["logits"]
    carried = [f"next_{n}" for n in nxt.input_names() if n != "threshold"]
    return carried + ["logits"] + ["leave"] * spec.decides


def _axes(model: EarlyExitModel, spec: PieceSpec) -> list[int | None]:
    """The batch axis of each input but the threshold (None: not batched, never compacted)."""
    flags = model.stages.batched[spec.first]
    return [0 if b else None for b in flags] + [0] * spec.prev + [1] * spec.acc


def _examples(model: EarlyExitModel, specs: list[PieceSpec], batch: int) -> list[tuple[torch.Tensor, ...]]:
    """Inputs for each piece on ``batch`` zero images (torch.export needs one example each)."""
    c, h, w = model.info.preprocess.input_size
    device = next(model.parameters()).device
    values: tuple[torch.Tensor, ...] = (torch.zeros(batch, c, h, w, device=device),)
    examples = []
    with torch.no_grad():
        for i, spec in enumerate(specs):
            args = values + ((torch.tensor([0.5], device=device),) if spec.decides else ())
            examples.append(args)
            outs = Piece(model, spec, i == len(specs) - 1).eval()(*args)
            values = tuple(outs[:-(1 + spec.decides)])
    return examples


def export_pieces(model: EarlyExitModel, folder: Path, onnx: bool) -> list[str]:
    """Write every piece (``.onnx`` or ``.pt2``), ``staged.json`` and ``run_staged.py`` into
    ``folder``; returns the file names. Batch dimension dynamic (min 1) in every piece."""
    specs = plan(model)
    folder.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1)
    pieces = []
    for i, (spec, args) in enumerate(zip(specs, _examples(model, specs, 2))):
        final = i == len(specs) - 1
        nxt = None if final else specs[i + 1]
        names = spec.input_names()
        shapes = tuple({a: batch} if a is not None else None for a in _axes(model, spec)) + ((None,) if spec.decides else ())
        file = f"piece_{i:02d}.{'onnx' if onnx else 'pt2'}"
        try:
            ep = torch.export.export(Piece(model, spec, final).eval(), args, dynamic_shapes=(shapes,))
            if onnx:
                # torch.onnx prints progress on stdout, which belongs to --json.
                with contextlib.redirect_stdout(io.StringIO()):
                    torch.onnx.export(ep, f=str(folder / file), dynamo=True, verbose=False, external_data=False,
                                      input_names=names, output_names=_output_names(spec, nxt))
            else:
                torch.export.save(ep, str(folder / file))
        except Exception as e:
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            raise PteenetError(f"cannot export piece {i} (stages {spec.first}-{spec.last}) of the staged program: "
                               f"{type(e).__name__}: {first}", "export --format static-onnx or safetensors") from e
        next_axes = {} if nxt is None else dict(zip(nxt.input_names(), _axes(model, nxt)))
        pieces.append({"file": file, "stages": [spec.first, spec.last], "exit": None if final else spec.last,
                       "decides": spec.decides, "inputs": names, "outputs": _output_names(spec, nxt),
                       "next_axes": next_axes})
    manifest = {"format": "pteenet staged program", "num_exits": model.num_exits, "policy": model.policy,
                "thresholds": list(model.thresholds), "shrinkable": model.stages.shrinkable,
                "num_classes": model.info.num_classes, "input_size": list(model.info.preprocess.input_size),
                "pieces": pieces}
    (folder / driver.MANIFEST).write_text(json.dumps(manifest, indent=1))
    shutil.copyfile(driver.__file__, folder / "run_staged.py")
    return [p["file"] for p in pieces] + [driver.MANIFEST, "run_staged.py"]


def torch_runner(path: Path, piece: dict[str, Any]) -> driver.Call:
    """Pieces as torch.export programs, for ``driver.StagedModel(folder, torch_runner)``."""
    program = torch.export.load(str(path)).module()

    def call(feeds: dict[str, Any]) -> list[Any]:
        with torch.no_grad():
            outs = program(*(torch.from_numpy(feeds[n]) for n in piece["inputs"]))
        return [o.numpy() for o in (outs if isinstance(outs, (tuple, list)) else (outs,))]

    return call
