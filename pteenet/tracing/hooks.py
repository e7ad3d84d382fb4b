"""The fallback for backbones torch.fx cannot trace (Python control flow on tensor values): exits read
module outputs through forward hooks during one whole backbone pass.

Clearly a fallback: there are no stages, so every sample runs the whole backbone and every exit is
computed; only the answer is the early exit's (the first exit whose score passes). Branches train,
the sweep measures accuracy against cost, and the cost table says what real exits would cost (MACs
counted in call order up to each exit module's output), but nothing runs faster: ``bench``,
``export``, ``info`` and ``attach`` say so. The runtime code of ``runtime/model.py`` runs unchanged on
``hook_stages``: "stage" 0 runs the backbone once and keeps every tap; stage k hands out tap k.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from thop.profile import register_hooks
from torch import nn

from ..errors import PteenetError, unknown_name
from .cost import OWN_RULES, flop_counter, ruled_macs
from .graph import ExitPoint, Stages, block_modules

NO_EARLY_EXIT = ("this model has no real early exit: torch.fx cannot trace it, so its exits read forward hooks "
                 "during a whole backbone pass (every sample pays the whole backbone; costs are what real exits would cost)")


@dataclass
class HookedBackbone:
    """What a dry run told about the candidate modules: output shape, call order, MACs before them."""

    root: nn.Module
    shapes: dict[str, tuple[int, ...]]  # module path -> output shape without batch
    order: list[str]  # every module that can be an exit, in the order their outputs appear
    cum: list[int]  # cumulative MACs at each module of ``order``, then the whole backbone's
    blocks: list[str]  # the default candidates (``graph.block_modules``)

    def point(self, path: str) -> ExitPoint:
        layout = {1: "vector", 2: "tokens"}.get(len(self.shapes[path]), "chw")  # no graph: no permutes seen
        return ExitPoint(path, path, self.order.index(path), layout)


class _Capture:
    """Forward hooks on ``paths`` keeping each module's output of one call of the backbone."""

    def __init__(self, root: nn.Module, paths: list[str]) -> None:
        self.outputs: dict[str, list[Any]] = {p: [] for p in paths}
        self.order: list[str] = []  # paths in the order their outputs appeared
        modules = dict(root.named_modules())
        self.handles = [modules[p].register_forward_hook(lambda m, a, out, p=p: self._keep(p, out)) for p in paths]

    def _keep(self, path: str, out: Any) -> None:
        self.outputs[path].append(out)
        self.order.append(path)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _eager_macs(root: nn.Module, x: torch.Tensor, paths: list[str]) -> dict[str, int]:
    """MACs up to each module of ``paths`` (at its output) and under "" the whole pass, by the same
    rules as ``cost.node_macs`` (thop's for leaf modules it knows, ours for attention, FlopCounterMode
    for the rest), on a copy (thop adds buffers)."""
    m = copy.deepcopy(root)
    mods = dict(m.named_modules())
    state = {"rules": 0.0, "inside": 0.0}  # MACs by the rules; flops the flop counter saw inside ruled modules
    at: dict[str, int] = {}
    handles = []
    with flop_counter() as fc:

        def total() -> int:
            return int(state["rules"] + (fc.get_total_flops() - state["inside"]) // 2)

        for mod in mods.values():
            ruled = type(mod) in OWN_RULES or (type(mod) in register_hooks and not list(mod.children()))
            if ruled:
                def pre(mod: nn.Module, args: Any, kwargs: Any) -> None:
                    mod._flops_before = fc.get_total_flops()  # type: ignore[assignment]

                def post(mod: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
                    state["inside"] += fc.get_total_flops() - mod._flops_before  # type: ignore[operator]
                    state["rules"] += ruled_macs(mod, args, kwargs, out) or 0
                handles += [mod.register_forward_pre_hook(pre, with_kwargs=True),
                            mod.register_forward_hook(post, with_kwargs=True)]
        for p in paths:
            handles.append(mods[p].register_forward_hook(lambda mod, a, out, p=p: at.__setitem__(p, total())))
        with torch.no_grad():
            m(x)
        at[""] = total()
    for h in handles:
        h.remove()
    return at


def probe(root: nn.Module, input_size: tuple[int, ...], count_macs: bool = True) -> HookedBackbone:
    """A dry run at batch 2 with hooks on every module; MACs at batch 1 (``count_macs``; else zeros)."""
    device = next((p.device for p in root.parameters()), torch.device("cpu"))
    cap = _Capture(root, [name for name, _ in root.named_modules() if name])
    try:
        with torch.no_grad():
            root(torch.zeros(2, *input_size, device=device))
    finally:
        cap.remove()
    # Exits need a module that runs once per pass and returns a batch tensor.
    order = [p for p in cap.order if len(cap.outputs[p]) == 1 and isinstance(cap.outputs[p][0], torch.Tensor)
             and cap.outputs[p][0].dim() >= 2 and cap.outputs[p][0].shape[0] == 2]
    shapes = {p: tuple(cap.outputs[p][0].shape[1:]) for p in order}
    macs = _eager_macs(root, torch.zeros(1, *input_size, device=device), order) if count_macs else dict.fromkeys(order + [""], 0)
    return HookedBackbone(root, shapes, order, [macs[p] for p in order] + [macs[""]], block_modules(root))


def candidates(hb: HookedBackbone) -> list[ExitPoint]:
    """Block outputs that are feature maps or token sequences, in call order."""
    blocks = set(hb.blocks)
    return [hb.point(p) for p in hb.order if p in blocks and len(hb.shapes[p]) in (2, 3)]


def resolve(hb: HookedBackbone, names: list[str]) -> list[ExitPoint]:
    """Exit points for module paths (no fx node names without a graph), in call order."""
    points = []
    for name in names:
        if name not in hb.shapes:
            known = list(dict.fromkeys([p.name for p in candidates(hb)] + hb.order))
            if name in dict(hb.root.named_modules()):
                raise PteenetError(f"module '{name}' cannot be an exit with forward hooks: it did not run exactly once "
                                   "with a batch tensor as its output in a dry run",
                                   f"exits that can: {', '.join(known[:20])}")
            raise unknown_name("exit module", name, known)
        points.append(hb.point(name))
    return sorted(points, key=lambda p: p.position)


@dataclass
class _Pass:
    """One whole backbone pass: the taps at every exit and the logits."""

    taps: list[torch.Tensor]
    final: torch.Tensor


class HookStage:
    """Stage k of ``hook_stages``: same call convention as the fx stages of ``graph.split``."""

    def __init__(self, root: nn.Module, paths: list[str], k: int) -> None:
        self.root, self.paths, self.k = root, paths, k

    def __call__(self, *state: Any) -> Any:
        run = self._run(state[0]) if self.k == 0 else state[0]
        return run.final if self.k == len(self.paths) else (run, run.taps[self.k])

    def _run(self, x: torch.Tensor) -> _Pass:
        cap = _Capture(self.root, self.paths)
        try:
            final = self.root(x)
        finally:
            cap.remove()
        taps = []
        for p in self.paths:
            if len(cap.outputs[p]) != 1:
                raise PteenetError(f"exit module '{p}' ran {len(cap.outputs[p])} times on this batch, not once "
                                   "(the backbone's control flow depends on its input)",
                                   "choose exit modules that run once on every input")
            taps.append(cap.outputs[p][0])
        return _Pass(taps, final)


def hook_stages(root: nn.Module, points: list[ExitPoint]) -> Stages:
    paths = [p.name for p in points]
    stages = [HookStage(root, paths, k) for k in range(len(paths) + 1)]
    # Nothing carried is filtered by rows: the pass is done before the first exit decides.
    return Stages(stages, [[True]] + [[False]] * len(paths), shrinkable=False)  # type: ignore[arg-type]
