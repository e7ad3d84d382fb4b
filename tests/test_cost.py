"""MAC counting, cost-based placement and the cost table."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pteenet import AttachConfig, PteenetError, attach
from pteenet.backbones.specs import load_backbone
from pteenet.tracing.cost import PLACEMENTS, cumulative_macs, node_macs, place
from pteenet.tracing.graph import candidates, trace


# Our count is FlopCounterMode's (every conv, linear and matmul) plus the elementwise work of norms,
# pools and activations (thop's rules), which FlopCounterMode does not count: never below it, and
# above it by that work only. Measured (torch 2.14.1): +1.87%, +0.55%, +7.52% (hardswish and
# squeeze-excitation everywhere); the bounds leave a little room for other torch versions.
@pytest.mark.parametrize("spec,size,excess", [("cifar-resnet20", (3, 32, 32), 0.025),
                                              ("torchvision:resnet18", (3, 64, 64), 0.008),
                                              ("torchvision:mobilenet_v3_small", (3, 64, 64), 0.085)])
def test_macs_agree_with_flop_counter(spec: str, size: tuple[int, int, int], excess: float) -> None:
    backbone, info = load_backbone(spec, input_size=size)
    tb = trace(backbone, size)
    ours = cumulative_macs(tb, node_macs(tb, size))[-1]
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        backbone(torch.zeros(1, *size))
    reference = fc.get_total_flops() / 2  # FlopCounterMode counts 2 FLOPs per MAC
    assert 0 <= (ours - reference) / reference < excess


def test_thop_never_touches_the_backbone() -> None:
    model = attach(AttachConfig(backbone="cifar-resnet20", exits=2))
    assert not any("total_ops" in k or "total_params" in k for k in model.state_dict())


def test_placement_follows_the_paper_fractions() -> None:
    backbone, info = load_backbone("cifar-resnet56")
    tb = trace(backbone, info.preprocess.input_size)
    cum = cumulative_macs(tb, node_macs(tb, info.preprocess.input_size))
    cands = candidates(tb)
    for rule in PLACEMENTS:
        chosen = place(cands, cum, 4, rule)
        for i, p in enumerate(chosen):
            frac = PLACEMENTS[rule](i, 4)
            j = cands.index(p)
            # the chosen candidate reaches the fraction and the one before it did not (or was taken)
            assert cum[p.position] >= frac * cum[-1] or j == len(cands) - (4 - i)
            assert j == 0 or cum[cands[j - 1].position] < frac * cum[-1] or cands[j - 1] in chosen[:i]
        assert len({p.node for p in chosen}) == 4


def test_fine_placement_on_resnet56_matches_hand_check() -> None:
    backbone, info = load_backbone("cifar-resnet56")
    tb = trace(backbone, info.preprocess.input_size)
    cum = cumulative_macs(tb, node_macs(tb, info.preprocess.input_size))
    chosen = place(candidates(tb), cum, 8, "fine")
    # fine: 1 - 0.95^(i+1) = 5%, 9.75%, ... 33.7%; each layer1 block costs ~3.8% of resnet56
    assert [p.name for p in chosen] == [f"layer1.{i}" for i in range(1, 9)]
    assert cum[-1] == pytest.approx(127.6e6, rel=0.001)


def test_too_many_exits_is_an_error() -> None:
    with pytest.raises(PteenetError, match="candidate exit points"):
        attach(AttachConfig(backbone="cifar-resnet20", exits=50))


def test_cost_table_conventions() -> None:
    model = attach(AttachConfig(backbone="cifar-resnet20", exits=3, placement="linear", branch="conv2", cascade=False))
    table = model.cost
    assert table is not None
    passed = 0
    for e in table.exits:
        passed += e.branch_macs
        assert e.cost == pytest.approx((e.prefix_macs + passed) / table.backbone_macs)
        assert e.cost_paper == pytest.approx((e.prefix_macs + e.branch_macs) / table.backbone_macs)
    assert table.final_cost == pytest.approx(1 + passed / table.backbone_macs)
    assert table.costs()[-1] == table.final_cost and table.costs_paper()[-1] == 1.0
    # a conv2 branch at 16 channels, 32x32: two 3x3 convs dominate
    assert table.exits[0].branch_macs >= 2 * 16 * 16 * 9 * 32 * 32


def test_placement_fractions_are_the_documented_ones() -> None:
    # exit i of n goes where the cumulative MACs reach these fractions of the backbone's (--placement)
    by_hand = {"linear": [1 / 4, 2 / 4, 3 / 4], "fine": [0.05, 0.0975, 0.142625], "pareto": [0.2, 0.36, 0.488],
               "golden": [1.618 ** -3, 1.618 ** -2, 1.618 ** -1]}
    assert set(by_hand) == set(PLACEMENTS)
    for rule, want in by_hand.items():
        assert [PLACEMENTS[rule](i, 3) for i in range(3)] == pytest.approx(want, abs=1e-12), rule
