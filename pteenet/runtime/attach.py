"""``pteenet attach``: load a backbone, choose exit points, build the exit branches and the cost table.

The default is what measured best on the clock on CIFAR-10 ResNet-56 (docs/speed.md): a cheap pooled
MLP head after every block, each on its own (no cascade), so that a head is computed only where its
exit decides. ``cascade=True`` (with the ensemble) saves more MACs and measures better at batch 256.
The paper's setting is ``exits=4, placement="fine", branch="conv2"``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..backbones.specs import load_backbone
from ..configs import Config, check_choice, check_int
from ..errors import PteenetError
from ..exits.branches import BranchConfig
from ..tracing.cost import PLACEMENTS, cost_table, module_macs, place
from ..tracing.probe import Probe, probe
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
    # Each head also reads the previous exit's logits. Off by default: a chain makes every head up to
    # the last deciding exit run, which at batch 1 costs more than it saves (benchmarks/cifar10_time.py:
    # 0.82 against 0.91 of the backbone's mean latency at <= 1 pt, docs/speed.md).
    cascade: bool = False
    grid: int = 4  # G of the G x G pooling of pool / pool-mlp / conv-lite heads
    hidden: int = 128  # hidden width of pool-mlp heads
    hooks: bool = False  # untraceable backbones: exits on forward hooks, no real early exit (hooks.py)

    @property
    def runtime(self) -> str:
        """The runtime the model will have: "hooks" with ``hooks``, else "staged" (tracing/probe.py)."""
        return "hooks" if self.hooks else "staged"

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


def _load(config: AttachConfig) -> tuple[Any, Any, Probe]:
    backbone, info = load_backbone(config.backbone, config.weights, config.num_classes, config.input_size, config.mean, config.std)
    return backbone, info, probe(backbone, info.preprocess.input_size, config.runtime)


def list_candidates(config: AttachConfig) -> dict[str, Any]:
    """The default exit candidates with their cumulative share of the backbone's MACs."""
    _, info, pb = _load(config)
    cum = pb.cum
    rows = [
        {"name": c.name, "node": c.node, "shape": list(pb.shapes[c.node] or ()), "layout": c.layout,
         "prefix_macs": cum[c.position], "share": cum[c.position] / cum[-1]}
        for c in pb.candidates
    ]
    return {"backbone": info.spec, "backbone_macs": cum[-1], "candidates": rows, "runtime": pb.runtime}


def attach(config: AttachConfig) -> EarlyExitModel:
    """Build the early-exit model (untrained branches) with its cost table."""
    branch = config.branch_config()
    backbone, info, pb = _load(config)
    cum = pb.cum
    if config.at:
        points = pb.resolve(config.at)
    else:
        cands = pb.candidates
        if not cands:
            raise PteenetError(f"found no candidate exit points in {config.backbone}",
                               "name them with --at (module paths or node names)")
        n = config.exits if config.exits is not None else DEFAULT_EXITS
        points = cands if n == "all" else place(cands, cum, int(n), config.placement)
    model = EarlyExitModel(backbone, info, [p.name for p in points], branch, runtime=pb.runtime)
    branch_macs = [module_macs(b, model.tap_shapes[k]) for k, b in enumerate(model.branches)]
    model.cost = cost_table(model.exit_points, cum, branch_macs)
    placement = None if config.at or isinstance(config.exits or DEFAULT_EXITS, str) else config.placement
    model.meta["attach"] = {"placement": placement, "requested": config.at or config.exits or DEFAULT_EXITS}
    return model
