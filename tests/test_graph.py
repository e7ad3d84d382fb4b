"""Stages reproduce the backbone; exit points are named, listed and validated."""
from __future__ import annotations

import pytest
import torch

from pteenet import AttachConfig, PteenetError, attach
from pteenet.backbones.specs import load_backbone
from pteenet.backbones.weights import module_sha256
from pteenet.exits.policies import never_exit_threshold
from pteenet.tracing.graph import candidates, resolve, trace

MODELS = [
    ("cifar-resnet20", (3, 32, 32)),
    ("torchvision:resnet18", (3, 64, 64)),
    ("torchvision:mobilenet_v3_small", (3, 64, 64)),
    ("torchvision:efficientnet_b0", (3, 64, 64)),
    ("torchvision:densenet121", (3, 64, 64)),
    ("torchvision:vgg11_bn", (3, 32, 32)),
]


@pytest.mark.parametrize("spec,size", MODELS)
def test_staged_model_reproduces_backbone(spec: str, size: tuple[int, int, int]) -> None:
    model = attach(AttachConfig(backbone=spec, input_size=size, num_classes=10, exits=3, placement="linear"))
    before = module_sha256(model.backbone)
    x = torch.randn(4, *size)
    with torch.no_grad():
        ref = model.backbone(x)
        for policy in ("confidence", "max-softmax", "entropy"):
            model.set_thresholds(never_exit_threshold(policy), policy)
            for batch in (x, x[:1]):
                pred = model.predict(batch)
                assert torch.allclose(pred.logits, ref[: len(batch)], atol=1e-5)
                assert (pred.exit_index == model.num_exits).all()
        assert torch.allclose(model.forward_all(x).final_logits, ref, atol=1e-5)
    assert module_sha256(model.backbone) == before


def test_stages_call_the_backbones_own_modules_from_the_top_level(tiny_model) -> None:
    # Flat: fx's code for a nested target reads each level of its path on every call (graph._flat_module).
    backbone = dict(tiny_model.backbone.named_modules())
    for stage in tiny_model.stages.modules:
        calls = [n.target for n in stage.graph.nodes if n.op == "call_module"]
        assert calls and all("." not in t for t in calls)
        for t in calls:  # the very module objects: the stages share the backbone's weights
            assert any(getattr(stage, t) is m for m in backbone.values())
    assert not any(p.data_ptr() not in {q.data_ptr() for q in tiny_model.backbone.parameters()}
                   for s in tiny_model.stages.modules for p in s.parameters())


def test_every_sample_leaves_at_first_exit_with_zero_threshold(tiny_model) -> None:
    tiny_model.set_thresholds(0.0, "max-softmax")
    x = torch.randn(5, 3, 16, 16)
    pred = tiny_model.predict(x)
    assert (pred.exit_index == 0).all()
    logits0 = tiny_model.forward_all(x).exit_logits[0]
    assert torch.allclose(pred.logits, logits0, atol=1e-6)


def test_candidates_are_block_outputs_in_graph_order() -> None:
    backbone, info = load_backbone("cifar-resnet20")
    tb = trace(backbone, info.preprocess.input_size)
    names = [c.name for c in candidates(tb)]
    assert names == [f"layer{i}.{j}" for i in (1, 2, 3) for j in range(3)]
    positions = [c.position for c in candidates(tb)]
    assert positions == sorted(positions)


def test_resolve_accepts_module_paths_and_node_names() -> None:
    backbone, info = load_backbone("cifar-resnet20")
    tb = trace(backbone, info.preprocess.input_size)
    by_path = resolve(tb, ["layer2.0", "layer1.1"])
    assert [p.name for p in by_path] == ["layer1.1", "layer2.0"]  # sorted into graph order
    by_node = resolve(tb, [by_path[0].node])
    assert by_node[0].node == by_path[0].node


def test_unknown_exit_point_lists_candidates() -> None:
    backbone, info = load_backbone("cifar-resnet20")
    tb = trace(backbone, info.preprocess.input_size)
    with pytest.raises(PteenetError) as e:
        resolve(tb, ["layer7.0"])
    assert "layer" in str(e.value.hint)


def test_flat_exit_gets_linear_heads() -> None:
    # The flattened pooled vector of resnet20 is a legal (if late) exit: heads only, no convs.
    model = attach(AttachConfig(backbone="cifar-resnet20", input_size=(3, 16, 16), at=["flatten"], branch="pool"))
    assert isinstance(model.branches[0].stem, torch.nn.Identity) and isinstance(model.branches[0].body, torch.nn.Identity)
    out = model.forward_all(torch.randn(2, 3, 16, 16))
    assert out.exit_logits[0].shape == (2, 10)


class Untraceable(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # control flow on a tensor value: torch.fx cannot trace this
            x = x * 2
        return self.fc(self.conv(x).mean((2, 3)))


def untraceable_factory() -> torch.nn.Module:
    return Untraceable()


def test_untraceable_model_is_refused_clearly() -> None:
    with pytest.raises(PteenetError) as e:
        attach(AttachConfig(backbone=f"{__file__}:untraceable_factory", input_size=(3, 8, 8), exits=1))
    assert "cannot trace" in e.value.message


class Block(torch.nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(c, c, 3, padding=1)
        self.act = torch.nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x)) + x


class RootBlocks(torch.nn.Module):
    """Blocks as plain attributes of the root, like torchvision's Inception v3."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.block_a, self.block_b, self.block_c = Block(8), Block(8), Block(8)
        self.head = torch.nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block_c(self.block_b(self.block_a(self.stem(x))))
        return self.head(x.mean((2, 3)))


class Wrapper(torch.nn.Module):
    """A user's wrapper: one composite child is looked into, not taken as the only block."""

    def __init__(self) -> None:
        super().__init__()
        self.net = RootBlocks()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def root_blocks_factory() -> torch.nn.Module:
    return RootBlocks()


def wrapper_factory() -> torch.nn.Module:
    return Wrapper()


@pytest.mark.parametrize("factory,prefix", [("root_blocks_factory", ""), ("wrapper_factory", "net.")])
def test_blocks_held_as_attributes_are_candidates(factory: str, prefix: str) -> None:
    backbone, info = load_backbone(f"{__file__}:{factory}", input_size=(3, 8, 8))
    tb = trace(backbone, info.preprocess.input_size)
    assert [c.name for c in candidates(tb)] == [f"{prefix}block_a", f"{prefix}block_b", f"{prefix}block_c"]
