"""One interface over the two ways of reading a backbone, so that ``attach`` and the model never
branch on the backend: its torch.fx graph (runtime ``"staged"``: real stages, real early exit) or,
for backbones fx cannot trace, a dry run with forward hooks (runtime ``"hooks"``, see hooks.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from ..configs import check_choice
from . import graph, hooks
from .cost import cumulative_macs, node_macs
from .graph import ExitPoint, Stages

RUNTIMES = ("staged", "hooks")


@dataclass
class Probe:
    """A backbone's exit candidates, tap shapes and cumulative MACs, and how to cut it into stages."""

    runtime: str  # one of RUNTIMES
    candidates: list[ExitPoint]  # the default exit points, in order
    shapes: dict[str, Any]  # ExitPoint.node -> tap shape without batch
    cum: list[int]  # cumulative MACs indexed by ExitPoint.position, cum[-1]: the whole backbone (zeros uncounted)
    resolve: Callable[[list[str]], list[ExitPoint]]  # exit names -> exit points, in order
    stages: Callable[[list[ExitPoint]], Stages]  # the stages the runtime runs for these exit points


def probe(backbone: nn.Module, input_size: tuple[int, ...], runtime: str = "staged", count_macs: bool = True) -> Probe:
    """Read ``backbone`` the way ``runtime`` runs it; MACs counted only with ``count_macs``."""
    check_choice("runtime", runtime, RUNTIMES)
    if runtime == "hooks":
        hb = hooks.probe(backbone, input_size, count_macs=count_macs)
        return Probe(runtime, hooks.candidates(hb), hb.shapes, hb.cum, lambda names: hooks.resolve(hb, names),
                     lambda points: hooks.hook_stages(backbone, points))
    tb = graph.trace(backbone, input_size)
    cum = cumulative_macs(tb, node_macs(tb, input_size)) if count_macs else [0] * len(tb.nodes)
    return Probe(runtime, graph.candidates(tb), tb.shapes, cum, lambda names: graph.resolve(tb, names),
                 lambda points: graph.split(tb, points, backbone))
