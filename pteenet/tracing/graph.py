"""Tracing a backbone with torch.fx, naming its exit points, and cutting it into stages.

Exit points are named by module path (``layer1.0``, ``features.3``: the output of that module, i.e. the
last graph node inside its scope) or by raw fx node name (``add_3``). Stage k runs the graph nodes
after exit k-1 up to and including exit k; every value a later stage still needs (a residual, a
DenseNet concatenation input) is carried in the stage's output tuple, so that stage k needs only what
stage k-1 produced. Parameters and buffers are never carried: each stage reads them from the backbone.

Taps come in four layouts (``LAYOUTS``), told apart by the tap's rank and, for 4-d maps, by the
graph: ``chw`` (B, C, H, W) as convolutions make them; ``hwc`` (B, H, W, C) channels-last, as Swin's
stages and ConvNeXt's blocks inside make them (``x.permute(0, 2, 3, 1)`` after a conv, undone by
``permute(0, 3, 1, 2)``); ``tokens`` (B, N, D), a transformer's token sequence; ``vector`` (B, C).
``_layouts`` follows each value from the input through the graph: convolutions make ``chw``, those
two permutes switch, reshapes and permutes that keep the channels last keep a channels-last value
so, other reshapes and permutes make it unknown (then ``chw``, as before), everything else (norms,
linears on the last dimension, adds, attention functions) keeps the layout of its first input.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import PteenetError, describe_error, unknown_name

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
# In a container of plain layers (VGG's ``features``) the block boundaries are activations and pools.
LEAF_BOUNDARIES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.LeakyReLU, nn.MaxPool2d, nn.AvgPool2d)


LAYOUTS = ("chw", "hwc", "tokens", "vector")
TO_CHANNELS_LAST, TO_CHANNELS_FIRST = (0, 2, 3, 1), (0, 3, 1, 2)
_RESHAPES = {"reshape", "view", "flatten", "unflatten", "transpose", "movedim", "swapaxes", "unfold"}


@dataclass(frozen=True)
class ExitPoint:
    name: str  # what the user sees and types: a module path or an fx node name
    node: str  # the fx node whose value the branch reads
    position: int  # index of that node in graph order
    layout: str = "chw"  # one of LAYOUTS: how the branch must read the tap


@dataclass
class TracedBackbone:
    """The traced graph plus what we learnt from a dry run: per-node output shapes (batch excluded)."""

    root: nn.Module  # the backbone itself: its module tree names the candidates
    gm: fx.GraphModule
    nodes: list[fx.Node]
    shapes: dict[str, tuple[int, ...] | None]  # node name -> shape without batch dim; None: not a batch tensor
    module_outputs: dict[str, fx.Node] = field(default_factory=dict)  # module path -> its last node
    layouts: dict[str, str] = field(default_factory=dict)  # node name -> layout of a 4-d map, if known

    def position(self, node: fx.Node) -> int:
        return self.nodes.index(node)

    def point(self, name: str, node: fx.Node) -> ExitPoint:
        """The exit point reading ``node``, with the layout its branch must expect."""
        shape = self.shapes.get(node.name) or ()
        layout = {1: "vector", 2: "tokens"}.get(len(shape)) or self.layouts.get(node.name) or "chw"
        return ExitPoint(name, node.name, self.position(node), layout)


def trace(backbone: nn.Module, input_size: tuple[int, ...]) -> TracedBackbone:
    """Symbolically trace the backbone in eval mode and record each node's output shape."""
    backbone.eval()
    try:
        tracer = fx.Tracer()
        graph = tracer.trace(backbone)
        gm = fx.GraphModule(backbone, graph)
    except Exception as e:
        raise PteenetError(
            f"torch.fx cannot trace {type(backbone).__name__}: {describe_error(e)}",
            "pteenet needs a traceable forward (no Python control flow on tensor values) to split it into "
            "real stages; wrap the untraceable part in a leaf module, or attach with --hooks (forward hooks: "
            "exits trained and measured, but no real early exit)",
        ) from e
    nodes = list(gm.graph.nodes)
    device = next((p.device for p in backbone.parameters()), torch.device("cpu"))
    shapes: dict[str, tuple[int, ...] | None] = {}
    with torch.no_grad():
        ShapeProp(gm).propagate(torch.zeros(2, *input_size, device=device))
    for n in nodes:
        tm = n.meta.get("tensor_meta")
        ok = tm is not None and hasattr(tm, "shape") and len(tm.shape) >= 1 and tm.shape[0] == 2
        shapes[n.name] = tuple(tm.shape[1:]) if ok else None
    module_outputs: dict[str, fx.Node] = {}
    for n in nodes:
        for path in (n.meta.get("nn_module_stack") or {}).values():
            module_outputs[path[0]] = n  # later nodes overwrite: the last node in the scope wins
    return TracedBackbone(backbone, gm, nodes, shapes, module_outputs, _layouts(gm, nodes, shapes))


def _permute_dims(n: fx.Node) -> tuple[int, ...] | None:
    if n.op == "call_method" and n.target == "permute" or n.op == "call_function" and n.target is torch.permute:
        dims = n.args[1:]
    else:
        return None
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = tuple(dims[0])
    rank = len(dims)
    return tuple(d % rank if isinstance(d, int) else -1 for d in dims)


def _is_conv(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(gm.get_submodule(str(n.target)), nn.Conv2d)
    return n.op == "call_function" and n.target in (torch.conv2d, torch.nn.functional.conv2d)


def _layouts(gm: fx.GraphModule, nodes: list[fx.Node], shapes: dict[str, tuple[int, ...] | None]) -> dict[str, str]:
    """``chw`` or ``hwc`` for the 4-d values whose layout the graph shows (see the module doc).

    Values of other ranks are followed too, as ``last`` where the channels are their last dimension:
    Swin blocks flatten a channels-last map to tokens, or cut it into windows (reshapes and permutes
    that keep the last dimension), and reshape it back to (B, H, W, C) (timm's do)."""
    tags: dict[str, str] = {}  # node -> chw (4-d, channels first) | last (channels in the last dim)
    for n in nodes:
        shape = shapes.get(n.name)
        if shape is None or len(shape) < 2:
            continue
        inputs = [a for a in n.all_input_nodes if a.name in tags]
        known = tags[inputs[0].name] if inputs else None
        src = shapes.get(inputs[0].name) if inputs else None
        dims = _permute_dims(n)
        reshape = n.op in ("call_method", "call_function") and getattr(n.target, "__name__", n.target) in _RESHAPES
        tag = None
        if n.op == "placeholder" or _is_conv(gm, n):
            tag = "chw" if len(shape) == 3 else None
        elif dims is not None:
            if (known, dims) == ("chw", TO_CHANNELS_LAST):
                tag = "last"
            elif known == "last" and dims == TO_CHANNELS_FIRST:
                tag = "chw"
            elif known == "last" and dims[-1] == len(dims) - 1:  # the channels stay last
                tag = "last"
        elif reshape:
            # A reshape keeps channels-last values channels-last when it keeps the last dimension or
            # merges others into it (patch merging: (B, H/2, 2, W/2, 2, C) -> (B, H/2, W/2, 4C)).
            if known == "last" and src and shape[-1] % src[-1] == 0:
                tag = "last"
        elif known is not None and (known == "last" or len(shape) == 3):
            tag = known  # norms, linears on the last dimension, adds, attention functions
        if tag is not None:
            tags[n.name] = tag
    return {k: ("hwc" if v == "last" else v) for k, v in tags.items() if len(shapes.get(k) or ()) == 3}


def block_modules(root: nn.Module) -> list[str]:
    """Module paths of the backbone's repeated blocks: composite children of containers (ResNet
    ``layer1.0``, MobileNet ``features.3``), or activation/pool outputs in containers of plain layers."""
    found: list[str] = []

    def visit(module: nn.Module, path: str) -> None:
        children = list(module.named_children())
        if isinstance(module, CONTAINERS):
            composite = any(list(c.children()) for _, c in children)
            for name, child in children:
                p = f"{path}.{name}" if path else name
                if list(child.children()):
                    found.append(p)
                    if isinstance(child, CONTAINERS):
                        visit(child, p)
                elif not composite and isinstance(child, LEAF_BOUNDARIES):
                    found.append(p)
        else:
            # Blocks held as plain attributes (Inception's Mixed_5b, GoogLeNet's inception3a): two or
            # more composite children that are not containers are a sequence of blocks. One alone
            # is a wrapper (a user's ``self.backbone``), so look inside it instead.
            blocks = [(n, c) for n, c in children if list(c.children()) and not isinstance(c, CONTAINERS)]
            for name, child in children:
                p = f"{path}.{name}" if path else name
                if len(blocks) >= 2 and (name, child) in blocks:
                    found.append(p)
                else:
                    visit(child, p)

    visit(root, "")
    return found


def candidates(tb: TracedBackbone) -> list[ExitPoint]:
    """Default exit candidates in graph order: block outputs that are feature maps (4-d) or token
    sequences (3-d) of the batch.

    When several module paths end on the same node (``features.12`` and its activation
    ``features.12.2``) the shallowest one names it. The very last block (whose output only feeds the classifier) is kept: an exit there
    is legal, if rarely useful.
    """
    by_node: dict[str, ExitPoint] = {}
    for path in block_modules(tb.root):
        node = tb.module_outputs.get(path)
        if node is None or node.op == "output":
            continue
        shape = tb.shapes.get(node.name)
        if shape is None or len(shape) not in (2, 3):
            continue
        prev = by_node.get(node.name)
        if prev is None or path.count(".") < prev.name.count("."):
            by_node[node.name] = tb.point(path, node)
    return sorted(by_node.values(), key=lambda e: e.position)


def resolve(tb: TracedBackbone, names: list[str]) -> list[ExitPoint]:
    """Exit points for user-given module paths or node names, in graph order, checked for use."""
    by_node_name = {n.name: n for n in tb.nodes}
    points: list[ExitPoint] = []
    for name in names:
        node = tb.module_outputs.get(name) or by_node_name.get(name)
        if node is None or node.op in ("placeholder", "output"):
            known = [c.name for c in candidates(tb)] + [n for n in tb.module_outputs]
            raise unknown_name("exit point", name, list(dict.fromkeys(known)))
        shape = tb.shapes.get(node.name)
        if shape is None or len(shape) not in (1, 2, 3):
            raise PteenetError(
                f"exit point '{name}' gives {'no batch tensor' if shape is None else 'a tensor of shape (B, ' + ', '.join(map(str, shape)) + ')'}",
                "exits need a feature map (B, C, H, W) or (B, H, W, C), tokens (B, N, D) or a vector (B, C); "
                "see `pteenet attach BACKBONE --list`",
            )
        points.append(tb.point(name, node))
    points.sort(key=lambda e: e.position)
    dup = [p.name for a, p in zip(points, points[1:]) if a.node == p.node]
    if dup:
        raise PteenetError(f"exit point '{dup[0]}' names the same place as another exit", "give each exit once")
    return points


@dataclass
class Stages:
    """The backbone cut at the exits. ``modules[k]`` for k < E returns ``(*carried, tap)``; the last
    returns the backbone's output. ``batched[k][j]`` says whether carried value j of the state that
    enters stage k has the batch as its first dimension (only those are filtered when samples leave)."""

    modules: list[fx.GraphModule]
    batched: list[list[bool]]
    shrinkable: bool  # False when a carried non-tensor value depends on the batch size


def split(tb: TracedBackbone, points: list[ExitPoint], root: nn.Module) -> Stages:
    """Cut the traced graph after each exit point; ``root`` (the backbone) owns every parameter."""
    positions = [p.position for p in points]
    stage_of = {n: bisect.bisect_left(positions, i) for i, n in enumerate(tb.nodes)}
    n_stages = len(points) + 1
    last_use = {n: max((stage_of[u] for u in n.users), default=stage_of[n]) for n in tb.nodes}
    # carried[k]: values made before stage k (not parameters) that stage k or a later one still reads.
    inputs = [n for n in tb.nodes if n.op == "placeholder"]
    # Optional arguments of forward (timm's ``attn_mask=None``): every stage has them, at their
    # defaults, as the backbone called with the image alone has them; they are never carried.
    optional = inputs[1:]
    carried: list[list[fx.Node]] = [
        [n for n in tb.nodes if n.op not in ("get_attr", "placeholder") and stage_of[n] < k <= last_use[n]]
        for k in range(n_stages)
    ]
    carried[0] = inputs[:1]
    modules = []
    for k in range(n_stages):
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {n: g.placeholder(n.name) for n in carried[k]}
        env.update({n: g.node_copy(n) for n in optional})

        def lookup(a: fx.Node, g: fx.Graph = g, env: dict[fx.Node, fx.Node] = env) -> fx.Node:
            if a not in env:  # a parameter/buffer read from an earlier stage: read it again here
                env[a] = g.node_copy(a)
            return env[a]

        for n in tb.nodes:
            if stage_of[n] != k or n.op == "placeholder":
                continue
            if n.op == "output":
                g.output(fx.map_arg(n.args[0], lookup))
            else:
                env[n] = g.node_copy(n, lookup)
        if k < len(points):
            tap = next(n for n in tb.nodes if n.name == points[k].node)
            g.output(tuple(lookup(n) for n in carried[k + 1]) + (lookup(tap),))
        modules.append(_flat_module(root, g, f"Stage{k}"))
    batched, shrinkable = _batch_layout(modules, tb, carried)
    return Stages(modules, batched, shrinkable)


def _flat_module(root: nn.Module, g: fx.Graph, name: str) -> fx.GraphModule:
    """A GraphModule whose submodules sit at the top level (``layer1_0_conv1``, the same module
    objects as ``root``'s): fx's code for a nested target reads every level of the path through
    ``nn.Module.__getattr__`` on each call. Measured interleaved on CIFAR ResNet-56 it saves little:
    0.001 of the backbone's time at the batch-1 setting, 0.002 with no exit taken
    (``benchmarks/batch1_ab.py``)."""
    owners: dict[str, Any] = {}
    for n in g.nodes:
        if n.op == "call_module":
            flat = n.target.replace(".", "_")
            while flat in owners and owners[flat] is not root.get_submodule(n.target):
                flat += "_"
            owners[flat] = root.get_submodule(n.target)
            n.target = flat
        elif n.op == "get_attr":
            owners[n.target] = _attr(root, n.target)
    return fx.GraphModule(owners, g, class_name=name)


def _attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _batch_layout(modules: list[fx.GraphModule], tb: TracedBackbone, carried: list[list[fx.Node]]) -> tuple[list[list[bool]], bool]:
    """Run the stages at batch sizes 2 and 3 to learn which carried values are per-sample tensors."""
    device = next((p.device for p in tb.gm.parameters()), torch.device("cpu"))
    input_size = tuple(tb.nodes[0].meta["tensor_meta"].shape[1:])
    states: list[list[list[object]]] = []
    with torch.no_grad():
        for b in (2, 3):
            state: list[object] = [torch.zeros(b, *input_size, device=device)]
            per_stage = [state]
            for m in modules[:-1]:
                state = list(m(*state))[:-1]
                per_stage.append(state)
            states.append(per_stage)
    batched: list[list[bool]] = []
    shrinkable = True
    for k in range(len(modules)):
        flags = []
        for v2, v3 in zip(states[0][k], states[1][k]):
            is_b = isinstance(v2, torch.Tensor) and isinstance(v3, torch.Tensor) and v2.dim() > 0 and v2.shape[0] == 2 and v3.shape[0] == 3
            if not isinstance(v2, torch.Tensor) and v2 != v3:
                shrinkable = False
            flags.append(is_b)
        batched.append(flags)
    return batched, shrinkable
