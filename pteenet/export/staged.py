"""Staged programs: the early exit itself as one small program per piece, for any batch size.

A piece runs the backbone stages from one deciding exit to the next, every head computed on the
way (with a cascade or an ensemble, heads of exits that do not decide still feed later ones) and
the decision: ``leave`` [B] (the policy is built in, the threshold is an input). So exit selection
removes whole calls: the driver makes one call per deciding exit, plus one for the backbone's end. The driver
(``driver.StagedModel``, copied into the folder) runs the pieces in order, keeps only the rows still
in flight, and stops once every row has left. Nothing nests: where 27 nested ``torch.cond`` exceed
Dynamo's recursion limit, 28 pieces export one after another.

Inputs of a piece are named ``s0..`` (the backbone state entering it, ``s0`` the image for the
first), ``prev`` / ``acc`` / ``util`` (the carry; ``util``: EENet's utilities of the deciding exits so far) and ``threshold`` [1]; outputs ``next_<input name>`` for
what the next piece reads, ``logits`` and ``leave``. With per-class thresholds ``threshold`` is [C]
and the piece looks it up by the exit's predicted class. ``staged.json`` lists them, with the batch axis
of every value the driver compacts.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import PteenetError, describe_error
from ..exits import eenet, policies
from ..exits.chain import Carry, exit_step
from ..runtime.model import EarlyExitModel
from ..runtime.onnx import quiet_onnx_export
from . import driver


@dataclass
class PieceSpec:
    first: int  # the first backbone stage it runs
    last: int  # the last one: a deciding exit's stage, or E for the backbone's end
    heads: tuple[int, ...]  # the heads it computes (the last one decides; earlier ones feed later exits)
    n_state: int  # backbone values entering it
    prev: bool  # carry layout entering it (cascade logits, ensemble sums, EENet's utilities)
    acc: bool
    state: bool = False  # a stateful policy's state entering it (patience: ``last`` class, ``run`` length)
    emits_state: bool = False  # it passes that state on (a deciding piece before another)
    util: bool = False  # EENet's utilities entering it

    @property
    def decides(self) -> bool:
        return bool(self.heads) and self.heads[-1] == self.last

    def input_names(self) -> list[str]:
        return ([f"s{j}" for j in range(self.n_state)] + ["prev"] * self.prev + ["acc"] * self.acc + ["util"] * self.util
                + ["last", "run"] * self.state + ["threshold"] * self.decides)


def plan(model: EarlyExitModel) -> list[PieceSpec]:
    """The pieces the model runs as: one per exit that decides, holding the stages since the
    previous one and every head computed on them (with a cascade or an ensemble, heads of exits
    that do not decide still feed later ones), then the rest of the backbone. The carry layout and
    state sizes come from one eager pass on two images."""
    computed = model.computed_branches()
    stateful = model.policy in policies.POLICIES and policies.get(model.policy).stateful  # eenet: its own carry
    c, h, w = model.info.preprocess.input_size
    specs: list[PieceSpec] = []
    with torch.no_grad():
        state: tuple[Any, ...] = (torch.zeros(2, c, h, w, device=next(model.parameters()).device),)
        carry, heads, first = Carry(), [], 0
        entering: tuple[int, bool, bool] = (1, False, False)
        eenet_on = model.policy == eenet.NAME  # after the first deciding exit, its utilities are carried
        for k, stage in enumerate(model.stages.modules):
            if any(not isinstance(v, torch.Tensor) for v in state):
                raise PteenetError("a backbone stage passes a non-tensor value on: staged programs carry tensors only",
                                   "export --format static-onnx or safetensors")
            if k == model.num_exits:
                # the end reads no decision state; it takes EENet's utilities, which the piece before passes on
                specs.append(PieceSpec(first, k, tuple(heads), *entering, util=eenet_on and len(specs) > 0))
                break
            out = stage(*state)
            state = tuple(out[:-1])
            if computed[k]:
                _, _, _, carry = exit_step(model.branches[k], model.ensemble, k, out[-1], carry)
                heads.append(k)
            if computed[k] and model.active[k]:
                specs.append(PieceSpec(first, k, tuple(heads), *entering, state=stateful and len(specs) > 0,
                                       util=eenet_on and len(specs) > 0))
                entering, heads, first = (len(state), carry.prev is not None, carry.acc is not None), [], k + 1
    for spec, nxt in zip(specs, specs[1:]):
        spec.emits_state = nxt.state
    return specs


class Piece(nn.Module):
    """One piece (``PieceSpec``) as a module: inputs and outputs as ``PieceSpec.input_names`` says."""

    def __init__(self, model: EarlyExitModel, spec: PieceSpec) -> None:
        super().__init__()
        self.spec, self.policy, self.num_exits = spec, model.policy, model.num_exits
        self.by_class = model.class_thresholds is not None  # the threshold input is [C], looked up by class
        self.scheduler = model.scheduler if model.policy == eenet.NAME else None
        self.stages = nn.ModuleList(model.stages.modules[spec.first:spec.last + 1])
        self.heads = nn.ModuleList(model.branches[k] for k in spec.heads)
        self.ensemble = model.ensemble

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        s = self.spec
        state: tuple[Any, ...] = tuple(inputs[:s.n_state])
        it = iter(inputs[s.n_state:])
        carry = Carry(next(it) if s.prev else None, next(it) if s.acc else None, next(it) if s.util else None)
        decided = (next(it), next(it)) if s.state else None
        branches = dict(zip(s.heads, self.heads))
        logits = conf = None
        for k, stage in enumerate(self.stages, start=s.first):
            if k == self.num_exits:
                return (stage(*state),)
            out = stage(*state)
            state = tuple(out[:-1])
            if k in branches:
                _, logits, conf, carry = exit_step(branches[k], self.ensemble, k, out[-1], carry)
        assert logits is not None and conf is not None and s.decides
        if self.scheduler is not None:  # the float32 threshold compares exactly with the float64 score
            score, util = self.scheduler.step(s.last, logits, carry.util)
            carry = Carry(carry.prev, carry.acc, util)
            return (*state, *carry.tensors(), logits.clone(), score >= next(it)[0].to(score.dtype))
        rule = policies.get(self.policy)
        score, decided = rule.decide(logits, conf, decided)
        threshold = next(it)
        leave = rule.passes(score, threshold[logits.argmax(1)] if self.by_class else threshold[0])
        passed = tuple(v.clone() for v in decided) if s.emits_state else ()  # clone: never an input as is
        return (*state, *carry.tensors(), *passed, logits.clone(), leave)


def _output_names(spec: PieceSpec, nxt: PieceSpec | None) -> list[str]:
    if nxt is None:
        return ["logits"]
    carried = [f"next_{n}" for n in nxt.input_names() if n != "threshold"]
    return carried + ["logits", "leave"]


def _axes(model: EarlyExitModel, spec: PieceSpec) -> list[int | None]:
    """The batch axis of each input but the threshold (None: not batched, never compacted)."""
    flags = model.stages.batched[spec.first]
    return [0 if b else None for b in flags] + [0] * spec.prev + [1] * spec.acc + [0] * spec.util + [0, 0] * spec.state


def _examples(model: EarlyExitModel, specs: list[PieceSpec], batch: int) -> list[tuple[torch.Tensor, ...]]:
    """Inputs for each piece on ``batch`` zero images (torch.export needs one example each)."""
    c, h, w = model.info.preprocess.input_size
    device = next(model.parameters()).device
    values: tuple[torch.Tensor, ...] = (torch.zeros(batch, c, h, w, device=device),)
    examples = []
    with torch.no_grad():
        for i, spec in enumerate(specs):
            width = model.info.num_classes if model.class_thresholds is not None else 1
            args = values + ((torch.full((width,), 0.5, device=device),) if spec.decides else ())
            examples.append(args)
            values = tuple(Piece(model, spec).eval()(*args)[:-2])
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
        assert final != spec.decides
        names = spec.input_names()
        shapes = tuple({a: batch} if a is not None else None for a in _axes(model, spec)) + ((None,) if spec.decides else ())
        file = f"piece_{i:02d}.{'onnx' if onnx else 'pt2'}"
        try:
            ep = torch.export.export(Piece(model, spec).eval(), args, dynamic_shapes=(shapes,))
            if onnx:
                with quiet_onnx_export():
                    torch.onnx.export(ep, f=str(folder / file), dynamo=True, verbose=False, external_data=False,
                                      input_names=names, output_names=_output_names(spec, nxt))
            else:
                torch.export.save(ep, str(folder / file))
        except Exception as e:
            raise PteenetError(f"cannot export piece {i} (stages {spec.first}-{spec.last}) of the staged program: "
                               f"{describe_error(e)}", "export --format static-onnx or safetensors") from e
        next_axes = {} if nxt is None else dict(zip(nxt.input_names(), _axes(model, nxt)))
        pieces.append({"file": file, "stages": [spec.first, spec.last], "heads": list(spec.heads),
                       "exit": None if final else spec.last,
                       "decides": spec.decides, "inputs": names, "outputs": _output_names(spec, nxt),
                       "next_axes": next_axes})
    manifest = {"format": "pteenet staged program", "num_exits": model.num_exits, "policy": model.policy,
                "thresholds": list(model.thresholds), "class_thresholds": model.class_thresholds,
                "shrinkable": model.stages.shrinkable,
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
