"""``pteenet attach``: load a backbone, choose exit points, build the exit branches and the cost table.

The default is what measured best on CIFAR-10 ResNet-56 (docs/benchmarks.md): a cheap pooled MLP head
after every block, cascaded. The paper's setting is ``exits=4, placement="fine", branch="conv2",
cascade=False``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..backbones.specs import load_backbone
from ..configs import Config, check_choice, check_int
from ..errors import PteenetError
from ..exits.branches import BranchConfig
from ..tracing import hooks
from ..tracing.cost import PLACEMENTS, cost_table, cumulative_macs, module_macs, node_macs, place
from ..tracing.graph import ExitPoint, candidates, resolve, trace
from .model import EarlyExitModel


@dataclass(kw_only=True)
class AttachConfig(Config):
    backbone: str  # torchvision:NAME | timm:NAME[.TAG] | cifar-resnetN | path/file.py:factory | package.module:factory
    weights: str | None = None  # a local file; for torchvision also DEFAULT or an enum name, for timm pretrained
    num_classes: int | None = None
    input_size: tuple[int, int, int] | None = None  # (C, H, W)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    at: list[str] | None = None  # exit points by module path or node name ...
    exits: int | str | None = None  # ... or this many, placed by `placement`, or "all" candidates
    placement: str = "linear"  # fine | pareto | linear | golden
    branch: str = "pool-mlp"  # conv0..conv3 | pool | pool-mlp | conv-lite
    cascade: bool = True  # each head also reads the previous exit's logits
    grid: int = 4  # G of the G x G pooling of pool / pool-mlp / conv-lite heads
    hidden: int = 128  # hidden width of pool-mlp heads
    hooks: bool = False  # untraceable backbones: exits on forward hooks, no real early exit (hooks.py)

    def __post_init__(self) -> None:
        if not isinstance(self.backbone, str) or not self.backbone.strip():
            raise PteenetError(f"backbone must name a model, got {self.backbone!r}", "e.g. cifar-resnet56 or torchvision:resnet18")
        check_int("num_classes", self.num_classes, 1, optional=True)
        if self.input_size is not None:
            self.input_size = tuple(self.input_size)  # type: ignore[assignment]
            if len(self.input_size) != 3:
                raise PteenetError(f"input_size must be (C, H, W), got {self.input_size!r}", "e.g. --input-size 3,224,224")
            for v in self.input_size:
                check_int("input_size", v, 1, "e.g. --input-size 3,224,224")
        for name in ("mean", "std"):
            if getattr(self, name) is not None:
                setattr(self, name, tuple(float(v) for v in getattr(self, name)))
        if self.at is not None:
            self.at = list(self.at)
        if self.at and self.exits is not None:
            raise PteenetError("give either --at or --exits, not both", "--at names the exits; --exits N places N by cost")
        if isinstance(self.exits, str):
            text = self.exits.strip().lower()
            if text != "all":
                raise PteenetError(f"--exits takes a number or 'all', got '{self.exits}'", "e.g. --exits 4, or --exits all")
            self.exits = text
        else:
            check_int("exits", self.exits, 1, "or name the exits with --at", optional=True)
        check_choice("placement", self.placement, PLACEMENTS)
        self.branch_config()  # the branch name, grid and hidden width

    def branch_config(self) -> BranchConfig:
        return BranchConfig.parse(self.branch, grid=self.grid, hidden=self.hidden, cascade=self.cascade)


DEFAULT_EXITS = "all"  # cheap heads make every block a candidate; the sweep decides which ones pay


@dataclass
class _Probed:
    """A backbone's exit candidates, shapes and cumulative MACs: from its fx graph, or with ``hooks``
    from a dry run with forward hooks (see hooks.py)."""

    backbone: Any
    info: Any
    candidates: list[ExitPoint]
    shapes: dict[str, Any]  # ExitPoint.node -> tap shape without batch
    cum: list[int]  # cumulative MACs indexed by ExitPoint.position; cum[-1]: the whole backbone
    resolve: Callable[[list[str]], list[ExitPoint]]


def _load(cfg: AttachConfig) -> _Probed:
    backbone, info = load_backbone(cfg.backbone, cfg.weights, cfg.num_classes, cfg.input_size, cfg.mean, cfg.std)
    size = info.preprocess.input_size
    if cfg.hooks:
        hb = hooks.probe(backbone, size)
        return _Probed(backbone, info, hooks.candidates(hb), hb.shapes, hb.cum, lambda names: hooks.resolve(hb, names))
    tb = trace(backbone, size)
    cum = cumulative_macs(tb, node_macs(tb, size))
    return _Probed(backbone, info, candidates(tb), tb.shapes, cum, lambda names: resolve(tb, names))


def list_candidates(cfg: AttachConfig) -> dict[str, Any]:
    """The default exit candidates with their cumulative share of the backbone's MACs."""
    pb = _load(cfg)
    cum = pb.cum
    rows = [
        {"name": c.name, "node": c.node, "shape": list(pb.shapes[c.node] or ()), "layout": c.layout,
         "prefix_macs": cum[c.position], "share": cum[c.position] / cum[-1]}
        for c in pb.candidates
    ]
    return {"backbone": pb.info.spec, "backbone_macs": cum[-1], "candidates": rows,
            "runtime": "hooks" if cfg.hooks else "staged"}


def attach(cfg: AttachConfig) -> EarlyExitModel:
    """Build the early-exit model (untrained branches) with its cost table."""
    branch = cfg.branch_config()
    pb = _load(cfg)
    cum = pb.cum
    if cfg.at:
        points = pb.resolve(cfg.at)
    else:
        cands = pb.candidates
        if not cands:
            raise PteenetError(f"found no candidate exit points in {cfg.backbone}",
                               "name them with --at (module paths or node names)")
        n = cfg.exits if cfg.exits is not None else DEFAULT_EXITS
        points = cands if n == "all" else place(cands, cum, int(n), cfg.placement)
    model = EarlyExitModel(pb.backbone, pb.info, [p.name for p in points], branch, hooks=cfg.hooks)
    branch_macs = [module_macs(b, model.tap_shapes[k]) for k, b in enumerate(model.branches)]
    model.cost = cost_table(model.exit_points, cum, branch_macs)
    placement = None if cfg.at or isinstance(cfg.exits or DEFAULT_EXITS, str) else cfg.placement
    model.meta["attach"] = {"placement": placement, "requested": cfg.at or cfg.exits or DEFAULT_EXITS}
    return model
