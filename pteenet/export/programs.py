"""The exported programs, for runtimes without pteenet, and their writers (torch.export, ONNX).

- ``CondProgram`` (``model.pt2``, ``model.onnx``): batch-1 early exit as nested ``torch.cond``
  (ONNX ``If``); inputs ``x`` and ``thresholds``, outputs ``logits`` and ``exit_index``.
- ``StaticProgram`` (``model_static.pt2``, ``model_static.onnx``): no control flow, any batch
  size; every exit's logits and confidence h, then the final logits.
- ``staged.py`` (``staged_pt2/``, ``staged_onnx/``): the early exit as one program per computed exit
  and a driver, any batch size and any number of exits (nested conditionals stop exporting at a few
  dozen exits: RecursionError in Dynamo at the default 27).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import PteenetError, describe_error
from ..exits import eenet, policies
from ..exits.chain import Carry, exit_step
from ..runtime.model import EarlyExitModel
from ..runtime.onnx import quiet_onnx_export
from .staged import export_pieces


class CondProgram(nn.Module):
    """Batch-1 early exit as nested ``torch.cond``: exit k's score decides between returning its
    logits and running stage k+1 onwards. Non-tensor carried values are constants at batch 1. Exits
    the model does not use (``active``) take no decision, and heads no used exit needs are left out."""

    def __init__(self, model: EarlyExitModel, policy: str) -> None:
        super().__init__()
        self.stages = nn.ModuleList(model.stages.modules)
        self.branches = model.branches
        self.ensemble = model.ensemble
        self.policy = policy
        self.active = list(model.active)
        self.computed = model.computed_branches()

    def forward(self, x: torch.Tensor, thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._from(0, thresholds, (x,), Carry())

    def _from(self, k: int, thresholds: torch.Tensor, state: tuple[Any, ...], carry: Carry) -> tuple[torch.Tensor, torch.Tensor]:
        if k == len(self.branches):
            logits = self.stages[k](*state)
            return logits, torch.full((1,), k, dtype=torch.long, device=logits.device)
        out = self.stages[k](*state)
        state = tuple(out[:-1])
        if not self.computed[k]:
            return self._from(k + 1, thresholds, state, carry)
        _, logits, conf, carry = exit_step(self.branches[k], self.ensemble, k, out[-1], carry)
        if not self.active[k]:
            return self._from(k + 1, thresholds, state, carry)
        leave = policies.passes(self.policy, policies.score(self.policy, logits, conf), thresholds[k]).reshape(())
        is_tensor = [isinstance(v, torch.Tensor) for v in state]
        carried = carry.tensors()

        def exit_here(logits: torch.Tensor, thresholds: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # clone: a cond branch may not return one of its inputs as is.
            return logits.clone(), torch.full((1,), k, dtype=torch.long, device=logits.device)

        def go_on(logits: torch.Tensor, thresholds: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            it = iter(tensors)
            st = tuple(next(it) if t else v for v, t in zip(state, is_tensor))
            return self._from(k + 1, thresholds, st, carry.like(list(it)))

        operands = (logits, thresholds, *(v for v, t in zip(state, is_tensor) if t), *carried)
        return torch.cond(leave, exit_here, go_on, operands)


class StaticProgram(nn.Module):
    """Every exit's logits and confidence h (sigmoid of the head), then the backbone's logits."""

    def __init__(self, model: EarlyExitModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = self.model.forward_all(x)
        outs: list[torch.Tensor] = []
        for logits, conf in zip(a.exit_logits, a.exit_conf):
            outs += [logits, torch.sigmoid(conf)]
        return (*outs, a.final_logits)


def output_names(model: EarlyExitModel, static: bool) -> list[str]:
    if not static:
        return ["logits", "exit_index"]
    return [f"exit{k}_{w}" for k in range(model.num_exits) for w in ("logits", "confidence")] + ["final_logits"]


def exported_program(model: EarlyExitModel, static: bool) -> torch.export.ExportedProgram:
    c, h, w = model.info.preprocess.input_size
    device = next(model.parameters()).device
    if not static and (model.policy == eenet.NAME or policies.get(model.policy).stateful or model.class_thresholds is not None):
        what = (f"the {model.policy} policy carries a state from exit to exit" if model.class_thresholds is None
                else "per-class thresholds are looked up by the predicted class")
        raise PteenetError(f"{what}, which the nested torch.cond program does not do",
                           "export --format staged-onnx or staged-torch-export, or safetensors and run it with pteenet.load")
    try:
        if static:
            x = torch.zeros(2, c, h, w, device=device)
            return torch.export.export(StaticProgram(model).eval(), (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        thresholds = torch.tensor(model.thresholds, dtype=torch.float32, device=device)
        return torch.export.export(CondProgram(model, model.policy).eval(), (torch.zeros(1, c, h, w, device=device), thresholds))
    except Exception as e:
        raise PteenetError(f"torch.export cannot export this model {'statically' if static else 'with torch.cond'}: "
                           f"{describe_error(e)}",
                           "export --format staged-onnx or staged-torch-export (one program per exit, any number "
                           "of exits), or safetensors and run it with pteenet.load") from e


def write_program(model: EarlyExitModel, fmt: str, path: Path, cache: dict[bool, Any]) -> None:
    """Write format ``fmt`` (a key of ``run.FORMATS`` other than safetensors) to ``path``; ``cache``
    keeps each kind's ``torch.export`` program for the next format of that kind."""
    if fmt.startswith("staged"):  # a folder of pieces (staged.py)
        export_pieces(model, path, onnx=fmt.endswith("onnx"))
        return
    static = fmt.startswith("static")
    if static not in cache:  # torch-export and onnx of one kind share one (slow) torch.export
        cache[static] = exported_program(model, static)
    ep = cache[static]
    if not fmt.endswith("onnx"):
        torch.export.save(ep, str(path))
        return
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        # torch.onnx prints progress on stdout, which belongs to --json, and its optimiser logs
        # notes about its own initialisers that mean nothing to a user.
        with quiet_onnx_export():
            torch.onnx.export(ep, f=str(path), dynamo=True, verbose=False, external_data=n_bytes > 1_800_000_000,
                              input_names=["x"] if static else ["x", "thresholds"],
                              output_names=output_names(model, static))
    except Exception as e:
        raise PteenetError(f"torch.onnx cannot convert this model ({fmt}): {describe_error(e)}",
                           "export --format safetensors or torch-export instead") from e
