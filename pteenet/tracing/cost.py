"""MAC accounting, the paper's cost-based exit placement, and the per-exit cost table.

We count multiply-accumulates (MACs) node by node while an fx Interpreter runs a deep copy of the
traced backbone at batch 1. Per-node counts (rather than thop.profile's per-module totals) give the
cumulative cost at any node, and count a module that is called twice (torchvision ResNet's shared
ReLU) twice. thop adds ``total_ops`` buffers to what it profiles, so it only ever sees copies.

Which counter, where: thop's per-layer rules for the modules it knows (convs, linears, norms, pools,
activations: it also counts the elementwise work of norms and pools), and torch's own
``FlopCounterMode`` (FLOPs / 2) for every other node. thop has no rule for ``nn.MultiheadAttention``
and cannot see inside functions such as torchvision Swin's ``shifted_window_attention`` (its qkv and
projection weights are passed in as tensors): thop alone counts none of a ViT's or Swin's attention
(the projections and both attention matmuls). FlopCounterMode counts every matmul, linear, conv and
``scaled_dot_product_attention`` at the dispatcher, whatever the Python around it, but no
elementwise work, and it misses attention too where ``nn.MultiheadAttention`` takes its fused
inference path (eval mode without grad: ``torch._native_multi_head_attention`` has no flop formula;
on a 2-layer ViT it counted 84,128 of about 137,000 MACs). So ``nn.MultiheadAttention`` has its own
rule here (``attention_macs``), checked against FlopCounterMode on the unfused path (train mode) in
tests/test_transformers.py. Nor does it count ``F.scaled_dot_product_attention`` on the CPU (no
formula for that kernel: timm's ViTs), so ``flop_counter`` adds one. Trusted: thop where it has a
rule (the same numbers as before for CNNs), our attention rules, the flop counter for everything else.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx
from thop.profile import register_hooks
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ..errors import PteenetError, unknown_name
from ..exits import fold
from ..exits.branches import ChannelsFirst
from .graph import ExitPoint, TracedBackbone

PLACEMENTS = {
    "fine": lambda i, n: 1 - 0.95 ** (i + 1),
    "pareto": lambda i, n: 1 - 0.8 ** (i + 1),
    "linear": lambda i, n: (i + 1) / (n + 1),
    "golden": lambda i, n: 1.618 ** (i - n),
}


def attention_macs(m: nn.MultiheadAttention, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """q, k, v projections, Q K^T, attention x V (over all heads: the width E each), output projection."""
    q = args[0] if args else kwargs["query"]
    k = args[1] if len(args) > 1 else kwargs.get("key", q)
    batch = 1 if q.dim() == 2 else q.shape[0 if m.batch_first else 1]
    seq = 0 if q.dim() == 2 else (1 if m.batch_first else 0)
    lq, lk, e = q.shape[seq], k.shape[seq], m.embed_dim
    return batch * (lq * e * e + lk * (m.kdim + m.vdim) * e + 2 * lq * lk * e + lq * e * e)


OWN_RULES = {nn.MultiheadAttention: attention_macs}


def _cpu_attention_flops(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(q, k, v)


# FlopCounterMode has formulas for the CUDA kernels of F.scaled_dot_product_attention but counts 0
# for the CPU one (timm's ViTs call it: both attention matmuls would go uncounted).
_SDPA_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
FLOP_FORMULAS = {} if _SDPA_CPU is None else {_SDPA_CPU: _cpu_attention_flops}


def flop_counter() -> FlopCounterMode:
    """torch's FlopCounterMode (FLOPs = 2 x MACs) with the formulas it lacks (``FLOP_FORMULAS``)."""
    return FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)


def ruled_macs(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int | None:
    """MACs of one call of ``module`` by our own rules or thop's; None where neither has a rule
    (then the flop counter counts it). The one choice of counter, for the fx count and the hooks one."""
    own = OWN_RULES.get(type(module))
    if own is not None:
        return int(own(module, args, kwargs))
    rule = register_hooks.get(type(module))
    if rule is None:
        return None
    module.total_ops = torch.zeros(1, dtype=torch.float64)  # thop's rules add to this buffer (on copies only)
    rule(module, args, out)
    return int(float(module.total_ops.item()))  # type: ignore[union-attr]


class _MacCounter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.macs: dict[str, int] = {}

    def run_node(self, n: fx.Node) -> Any:
        module = self.fetch_attr(n.target) if n.op == "call_module" else None
        if module is None or (type(module) not in OWN_RULES and type(module) not in register_hooks):
            # Attention modules, functional linears and matmuls, wrapped functions: see the module doc.
            with flop_counter() as fc:
                out = super().run_node(n)
            self.macs[n.name] = int(fc.get_total_flops()) // 2
            return out
        out = super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        self.macs[n.name] = ruled_macs(module, args, kwargs, out) or 0
        return out


def node_macs(tb: TracedBackbone, input_size: tuple[int, ...]) -> dict[str, int]:
    """MACs of every graph node for one sample."""
    gm = copy.deepcopy(tb.gm)
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    counter = _MacCounter(gm)
    with torch.no_grad():
        counter.run(torch.zeros(1, *input_size, device=device))
    return counter.macs


def module_macs(module: nn.Module, in_shape: tuple[int, ...]) -> int:
    """MACs of a small module (a branch) for one sample, profiled on a copy."""
    import thop

    m = copy.deepcopy(module).eval()
    device = next((p.device for p in m.parameters()), torch.device("cpu"))
    # The trained layers, which thop's module hooks can count (the folded inference form is plain
    # functions, and does no more work: its BatchNorms are counted here but not run).
    with fold.unfolded():
        macs, _ = thop.profile(m, inputs=(torch.zeros(1, *in_shape, device=device),), verbose=False,
                               custom_ops={ChannelsFirst: _count_permute})
    return int(macs)


def _count_permute(m: nn.Module, x: tuple[torch.Tensor, ...], y: torch.Tensor) -> None:
    # A view, free where the next kernel reads channels-last strides; counted as one copy of the tap
    # (one operation per element, thop's unit for elementwise work) so that it is never free on paper.
    m.total_ops += torch.DoubleTensor([int(y.numel())])


def cumulative_macs(tb: TracedBackbone, macs: dict[str, int]) -> list[int]:
    """Cumulative MACs up to and including each node, in graph order."""
    out, total = [], 0
    for n in tb.nodes:
        total += macs.get(n.name, 0)
        out.append(total)
    return out


def place(candidates: list[ExitPoint], cum: list[int], n_exits: int, rule: str) -> list[ExitPoint]:
    """The paper's rule: exit i after the first candidate whose cumulative MACs reach fraction f(i).

    Two exits never share a candidate: a later exit that would land on a taken one moves to the next.
    """
    if rule not in PLACEMENTS:
        raise unknown_name("placement", rule, list(PLACEMENTS))
    if n_exits < 1:
        raise PteenetError("--exits must be at least 1", "or name the exits with --at")
    if n_exits > len(candidates):
        raise PteenetError(
            f"{n_exits} exits asked for but the backbone has {len(candidates)} candidate exit points",
            "use fewer --exits, or see `pteenet attach BACKBONE --list`",
        )
    total = cum[-1]
    chosen: list[ExitPoint] = []
    start = 0
    for i in range(n_exits):
        frac = PLACEMENTS[rule](i, n_exits)
        j = start
        while j < len(candidates) and cum[candidates[j].position] < frac * total:
            j += 1
        # Leave room for the exits still to place; past the end means "as late as possible".
        j = min(j, len(candidates) - (n_exits - i))
        chosen.append(candidates[j])
        start = j + 1
    return chosen


@dataclass
class ExitCost:
    name: str
    node: str
    prefix_macs: int  # backbone MACs up to and including the exit point
    branch_macs: int  # this exit's branch alone
    cost: float  # cumulative: prefix + every branch evaluated up to and including this one, / backbone
    cost_paper: float  # the paper's convention: prefix + own branch, / backbone


@dataclass
class CostTable:
    backbone_macs: int
    exits: list[ExitCost]

    @property
    def final_cost(self) -> float:
        """Cost of a sample that passes every exit and runs to the end: 1 + all branches."""
        return 1.0 + sum(e.branch_macs for e in self.exits) / self.backbone_macs

    def costs(self, computed: Sequence[bool] | None = None) -> list[float]:
        """Per exit, then the end: the cumulative cost of a sample that leaves there. ``computed``
        says which heads the runtime evaluates (exit selection); by default every one is."""
        if computed is None:
            return [e.cost for e in self.exits] + [self.final_cost]
        out, passed = [], 0
        for e, c in zip(self.exits, computed):
            passed += e.branch_macs if c else 0
            out.append((e.prefix_macs + passed) / self.backbone_macs)
        return out + [1.0 + passed / self.backbone_macs]

    def costs_paper(self) -> list[float]:
        return [e.cost_paper for e in self.exits] + [1.0]

    def to_dict(self) -> dict[str, Any]:
        return {"backbone_macs": self.backbone_macs, "exits": [asdict(e) for e in self.exits], "final_cost": self.final_cost}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CostTable":
        return cls(int(d["backbone_macs"]), [ExitCost(**e) for e in d["exits"]])


def cost_table(points: list[ExitPoint], cum: list[int], branch_macs: list[int]) -> CostTable:
    total = cum[-1]
    if total <= 0:
        raise PteenetError("could not count any MACs in the backbone", "is it built from standard torch.nn layers?")
    exits, passed = [], 0
    for p, b in zip(points, branch_macs):
        prefix = cum[p.position]
        passed += b
        exits.append(ExitCost(p.name, p.node, prefix, b, (prefix + passed) / total, (prefix + b) / total))
    return CostTable(total, exits)
