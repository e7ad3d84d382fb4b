"""``pteenet attach``: load a backbone, choose exit points, build ConvX branches and the cost table."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .backbones import load_backbone
from .branches import BranchConfig
from .cost import cost_table, cumulative_macs, module_macs, node_macs, place
from .errors import PteenetError
from .graph import candidates, resolve, trace
from .model import EarlyExitModel


@dataclass
class AttachConfig:
    backbone: str  # torchvision:NAME | cifar-resnetN | path/file.py:factory | package.module:factory
    weights: str | None = None  # a local file; for torchvision also DEFAULT or an enum name
    num_classes: int | None = None
    input_size: tuple[int, int, int] | None = None  # (C, H, W)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    at: list[str] | None = None  # exit points by module path or node name ...
    exits: int | None = None  # ... or this many, placed by `placement`
    placement: str = "linear"  # fine | pareto | linear | golden
    branch: str = "conv2"  # conv0..conv3


DEFAULT_EXITS = 4


def _load(cfg: AttachConfig) -> tuple[Any, Any, Any, list[int]]:
    backbone, info = load_backbone(cfg.backbone, cfg.weights, cfg.num_classes, cfg.input_size, cfg.mean, cfg.std)
    tb = trace(backbone, info.preprocess.input_size)
    cum = cumulative_macs(tb, node_macs(tb, info.preprocess.input_size))
    return backbone, info, tb, cum


def list_candidates(cfg: AttachConfig) -> dict[str, Any]:
    """The default exit candidates with their cumulative share of the backbone's MACs."""
    _, info, tb, cum = _load(cfg)
    rows = [
        {"name": c.name, "node": c.node, "shape": list(tb.shapes[c.node] or ()), "prefix_macs": cum[c.position],
         "share": cum[c.position] / cum[-1]}
        for c in candidates(tb)
    ]
    return {"backbone": info.spec, "backbone_macs": cum[-1], "candidates": rows}


def attach(cfg: AttachConfig) -> EarlyExitModel:
    """Build the early-exit model (untrained branches) with its cost table."""
    branch = BranchConfig.parse(cfg.branch)
    if cfg.at and cfg.exits is not None:
        raise PteenetError("give either --at or --exits, not both", "--at names the exits; --exits N places N by cost")
    backbone, info, tb, cum = _load(cfg)
    if cfg.at:
        points = resolve(tb, cfg.at)
    else:
        cands = candidates(tb)
        if not cands:
            raise PteenetError(f"found no candidate exit points in {cfg.backbone}",
                               "name them with --at (module paths or node names)")
        points = place(cands, cum, cfg.exits if cfg.exits is not None else DEFAULT_EXITS, cfg.placement)
    model = EarlyExitModel(backbone, info, [p.name for p in points], branch)
    branch_macs = [module_macs(b, model.tap_shapes[k]) for k, b in enumerate(model.branches)]
    model.cost = cost_table(model.exit_points, cum, branch_macs)
    model.meta["attach"] = {"placement": None if cfg.at else cfg.placement, "requested": cfg.at or cfg.exits or DEFAULT_EXITS}
    return model
