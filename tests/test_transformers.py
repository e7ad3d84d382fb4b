"""Token (B, N, D) and channels-last (B, H, W, C) taps: a tiny torchvision ViT and Swin attach, split
into stages, reproduce their logits, shrink batches, count attention, and cache features."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset
from torch.utils.flop_counter import FlopCounterMode

import pteenet
from pteenet.exits.branches import ChannelsFirst, TokenPool
from pteenet.exits.policies import never_exit_threshold
from pteenet.progress import SILENT
from pteenet.tracing.cost import attention_macs, cumulative_macs, node_macs
from pteenet.tracing.graph import candidates, trace
from pteenet.training.batches import Autocast, build_feature_cache
from tiny_models import SIZE, swin, vit

BRANCHES = ("pool-mlp", "pool", "conv-lite", "conv1")


def _attach(factory: str, branch: str = "pool-mlp", **kw: object) -> pteenet.EarlyExitModel:
    return pteenet.attach(pteenet.AttachConfig(backbone=f"tiny_models:{factory}", input_size=SIZE, branch=branch, **kw))  # type: ignore[arg-type]


def test_layouts_come_from_the_graph() -> None:
    vit_points = candidates(trace(vit().eval(), SIZE))
    assert [p.name for p in vit_points] == ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"]
    assert {p.layout for p in vit_points} == {"tokens"}
    swin_points = candidates(trace(swin().eval(), SIZE))
    assert swin_points and {p.layout for p in swin_points} == {"hwc"}  # permute(0, 2, 3, 1) after the patch conv
    resnet = candidates(trace(pteenet.backbones.specs.load_backbone("cifar-resnet20")[0], (3, 32, 32)))
    assert {p.layout for p in resnet} == {"chw"}


@pytest.mark.parametrize("factory", ["vit", "swin"])
@pytest.mark.parametrize("branch", BRANCHES)
def test_logits_exact_and_rows_leave_mid_way(factory: str, branch: str) -> None:
    model = _attach(factory, branch)
    x = torch.randn(6, *SIZE)
    with torch.no_grad():
        ref = model.backbone(x)
        model.set_thresholds(never_exit_threshold("confidence"), "confidence")
        assert torch.equal(model.predict(x).logits, ref)
        assert torch.equal(model.predict(x[:1]).logits, model.backbone(x[:1]))  # batch 1: its own path
        everything = model.forward_all(x)
    assert model.stages.shrinkable
    # Half the rows leave at exit 0 (threshold at the median score), no one at later exits.
    scores = everything.exit_conf[0]
    t0 = float(torch.sigmoid(scores).median())
    thresholds = [t0] + [never_exit_threshold("confidence")] * (model.num_exits - 1)
    pred = model.predict(x, thresholds, "confidence")
    left = torch.sigmoid(scores) > t0
    assert 0 < int(left.sum()) < len(x)
    assert torch.equal(pred.exit_index == 0, left)
    torch.testing.assert_close(pred.logits[left], everything.exit_logits[0][left])
    torch.testing.assert_close(pred.logits[~left], ref[~left], atol=1e-5, rtol=0)


def test_token_branch_reads_layernormed_class_token_and_mean() -> None:
    model = _attach("vit", "pool")
    tap = torch.randn(3, 17, 16)
    z = model.branches[0].stem(tap)
    normed = nn.functional.layer_norm(tap, (16,))
    torch.testing.assert_close(z, torch.cat([normed[:, 0], normed.mean(1)], 1))
    assert isinstance(model.branches[0].stem, TokenPool)


def test_channels_last_branch_sees_channels_first_and_pays_for_the_permute() -> None:
    model = _attach("swin", "pool")
    h, w, c = model.tap_shapes[0]
    stem = model.branches[0].stem
    assert isinstance(stem[0], ChannelsFirst)
    tap = torch.randn(2, h, w, c)
    torch.testing.assert_close(stem(tap), stem[1](tap.permute(0, 3, 1, 2)))
    plain = pteenet.exits.branches.Branch((c, h, w), 10, model.branch_config)
    assert model.cost.exits[0].branch_macs - pteenet.tracing.cost.module_macs(plain, (c, h, w)) == h * w * c


def test_attention_rule_matches_flop_counter_on_the_unfused_path() -> None:
    for batch_first in (True, False):
        m = nn.MultiheadAttention(16, 2, batch_first=batch_first, kdim=12, vdim=8).train()
        q, k, v = torch.randn(3, 17, 16), torch.randn(3, 5, 12), torch.randn(3, 5, 8)
        if not batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        with FlopCounterMode(display=False) as fc:
            m(q, k, v, need_weights=True)  # the path with explicit matmuls, all of which it counts
        assert attention_macs(m, (q, k, v), {}) == fc.get_total_flops() // 2


@pytest.mark.parametrize("factory", ["vit", "swin"])
def test_backbone_macs_include_attention(factory: str) -> None:
    backbone = (vit if factory == "vit" else swin)().eval()
    tb = trace(backbone, SIZE)
    ours = cumulative_macs(tb, node_macs(tb, SIZE))[-1]
    # The reference: every matmul and conv, with nn.MultiheadAttention on its unfused path. In eval
    # mode its fused path hides attention from FlopCounterMode (ViT: 84,128 of 137,440 MACs).
    mha = [m for m in backbone.modules() if isinstance(m, nn.MultiheadAttention)]
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        if mha:
            hooks = [m.register_forward_pre_hook(lambda mod, a, kw: (a, {**kw, "need_weights": True}), with_kwargs=True)
                     for m in mha]
        backbone.train()  # dropout is 0 in both models; train mode leaves the fused path
        backbone(torch.zeros(1, *SIZE))
        backbone.eval()
        for h in hooks if mha else []:
            h.remove()
    reference = fc.get_total_flops() / 2
    # ours also counts norms' elementwise work (thop's rules), which the flop counter does not
    assert reference <= ours <= 1.10 * reference


@pytest.mark.parametrize("factory,branch", [("vit", "pool-mlp"), ("vit", "conv1"), ("swin", "pool-mlp")])
def test_feature_cache_on_token_and_channels_last_taps(factory: str, branch: str) -> None:
    model = _attach(factory, branch)
    x = torch.randn(8, *SIZE)
    ds = TensorDataset(x, torch.zeros(8, dtype=torch.long))
    cache = build_feature_cache(model, ds, 4, 0, 0, torch.device("cpu"), Autocast(torch.device("cpu"), False),
                                SILENT, False, "test")
    stems = branch.startswith("pool")
    assert cache.stems == stems
    if stems and factory == "vit":
        assert cache.taps[0].shape == (8, 32)  # 2D values an image, not 17 x 16
    with torch.no_grad():
        want = model.forward_all(x)
        got = model.branch_outputs([t.float() for t in cache.taps], cache.final, features=stems)
    for a, b in zip(got.exit_logits, want.exit_logits):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)  # float16 cache


class _SdpaBlock(nn.Module):
    """Attention as timm writes it: F.scaled_dot_product_attention on (B, heads, N, d)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.flatten(2).transpose(1, 2)[..., :16]  # (B, N, 16) tokens from a (B, 16, H, W) input
        q, k, v = self.qkv(t).reshape(t.shape[0], t.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.head(a.transpose(1, 2).reshape(t.shape).mean(1))


def test_cpu_scaled_dot_product_attention_is_counted() -> None:
    size = (16, 4, 5)  # 20 tokens of 16
    tb = trace(_SdpaBlock().eval(), size)
    macs = node_macs(tb, size)
    sdpa = [n.name for n in tb.nodes if n.target is nn.functional.scaled_dot_product_attention]
    assert len(sdpa) == 1
    assert macs[sdpa[0]] == 2 * 2 * 20 * 20 * 8  # Q K^T and A V, 2 heads of width 8


def test_channels_last_through_reshapes_and_optional_forward_arguments() -> None:
    model = _attach("timm_style", "pool")
    assert [(p.name, p.layout) for p in model.exit_points] == [("stage1", "hwc"), ("merge", "hwc"), ("stage2", "hwc")]
    assert model.tap_shapes[1] == (4, 4, 16)
    x = torch.randn(5, *SIZE)
    with torch.no_grad():
        ref = model.backbone(x)
        assert torch.equal(model.predict(x, never_exit_threshold("confidence"), "confidence").logits, ref)
    assert model.stages.shrinkable
