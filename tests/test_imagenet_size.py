"""ImageNet-sized taps: a torchvision ResNet-18 (random weights, 1,000 classes) at 224x224 through
attach -> train (cached features) -> sweep -> export -> bench, which the 16x16 models of the other
tests never exercise (tap sizes, pooling at 56x56, a 1,000-wide cascade, the cache's size).
``benchmarks/imagenet_size.py`` runs the same with more images and records the figures."""
from __future__ import annotations

from typing import Any

import pytest
import torch

import pteenet
from pteenet.bench.run import BenchConfig, bench
from pteenet.exits.policies import never_exit_threshold

SIZE = (3, 224, 224)
DATA = pteenet.DataConfig(spec="synthetic", limit=24, augment=False)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("imagenet")
    model = pteenet.attach(pteenet.AttachConfig(backbone="torchvision:resnet18", input_size=SIZE))
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    history = pteenet.train_exits(model, DATA, pteenet.TrainConfig(epochs=2, batch_size=8, lr=1e-3,
                                                                   cache_features=True, device="cpu"))
    swept = pteenet.sweep_model(model, DATA, pteenet.SweepConfig(thresholds="0:1:0.25", max_drop=100.0,
                                                                 device="cpu", plots=False))
    pteenet.export_model(model, pteenet.ExportConfig(output=root / "export"))
    return {"model": model, "before": before, "history": history, "swept": swept, "root": root}


def test_default_attach_taps_every_block_at_imagenet_size(pipeline: dict[str, Any]) -> None:
    model = pipeline["model"]
    assert model.info.num_classes == 1000
    assert [e.name for e in model.cost.exits] == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert model.tap_shapes[0] == (64, 56, 56) and model.tap_shapes[-1] == (512, 7, 7)
    # The branches stay a small share of a 1.8 GMAC backbone even on 56x56 taps.
    assert sum(e.branch_macs for e in model.cost.exits) < 0.05 * model.cost.backbone_macs


def test_the_feature_cache_holds_pooled_vectors_not_taps(pipeline: dict[str, Any]) -> None:
    model = pipeline["model"]
    with torch.no_grad():
        stems = sum(b.stem(torch.zeros(1, *s)).numel() for b, s in zip(model.branches, model.tap_shapes))
    taps = sum(torch.Size(s).numel() for s in model.tap_shapes)
    assert stems * 10 < taps  # what makes --cache-features affordable at 224x224 (12x here)


def test_training_on_1000_classes_stays_finite_and_leaves_the_backbone_alone(pipeline: dict[str, Any]) -> None:
    losses = [e["train"]["loss"] for e in pipeline["history"]["epochs"]]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(v)) for v in losses)
    after = pipeline["model"].backbone.state_dict()
    assert all(torch.equal(pipeline["before"][k], after[k]) for k in after)


def test_the_exported_model_exits_early_and_matches_the_backbone_when_none_leaves(pipeline: dict[str, Any]) -> None:
    model = pteenet.load(str(pipeline["root"] / "export" / "model.safetensors"))
    x = torch.rand(3, *SIZE)
    with torch.no_grad():
        backbone = model.backbone(x)
        model.set_thresholds(never_exit_threshold(model.policy), model.policy)
        out = model.predict(x)
        model.set_thresholds(0.0 if model.policy != "entropy" else 1.0, model.policy)
        early = model.predict(x)
    assert torch.allclose(out.logits, backbone, atol=1e-4)
    assert (out.exit_index == model.num_exits).all()
    assert (early.exit_index < model.num_exits).all()  # and every sample leaves early when every score passes


def test_bench_times_both_batch_sizes_at_224(pipeline: dict[str, Any]) -> None:
    doc = bench(pipeline["model"], torch.rand(4, *SIZE), BenchConfig(batch_sizes=(1, 2), repeats=1, warmup=0))
    assert [r["batch_size"] for r in doc["results"]] == [1, 2]
