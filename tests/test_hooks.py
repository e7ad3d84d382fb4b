"""The fallback for backbones torch.fx cannot trace: exits on forward hooks. Exits are computed and
decided like the staged runtime's, costs are those of real exits, and every command says that there
is no real early exit."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import pteenet
from pteenet import AttachConfig, PteenetError, attach, load_checkpoint, save_checkpoint
from pteenet.bench.run import BenchConfig, bench
from pteenet.cli import app
from pteenet.exits.policies import never_exit_threshold
from pteenet.tracing.hooks import NO_EARLY_EXIT

SPEC, SIZE = "tiny_models:branchy", (3, 16, 16)


def test_untraceable_model_is_refused_with_the_fallback_named() -> None:
    with pytest.raises(PteenetError, match="--hooks"):
        attach(AttachConfig(backbone=SPEC, input_size=SIZE))
    result = CliRunner().invoke(app, ["attach", SPEC, "--input-size", "3,16,16", "-o", "x.safetensors"])
    assert result.exit_code == 1 and "--hooks" in result.output and "Traceback" not in result.output


def test_hooks_reproduce_logits_and_decide_as_the_simulation() -> None:
    model = attach(AttachConfig(backbone=SPEC, input_size=SIZE, hooks=True))
    assert [p.name for p in model.exit_points] == ["stem.2", "block1.2", "block2.2"]
    x = torch.randn(8, *SIZE)
    with torch.no_grad():
        ref = model.backbone(x)
        every = model.forward_all(x)
    model.set_thresholds(never_exit_threshold("confidence"), "confidence")
    assert torch.equal(model.predict(x).logits, ref)
    h0 = torch.sigmoid(every.exit_conf[0])
    t0 = float(h0.median())
    pred = model.predict(x, [t0, 1.5, 1.5], "confidence")
    left = h0 > t0
    assert 0 < int(left.sum()) < len(x)
    assert torch.equal(pred.exit_index == 0, left)
    torch.testing.assert_close(pred.logits[left], every.exit_logits[0][left])
    torch.testing.assert_close(pred.logits[~left], ref[~left])


def test_costs_are_those_of_real_exits() -> None:
    """On a backbone that traces, the hooks' cost table equals the staged one."""
    staged = attach(AttachConfig(backbone="cifar-resnet20", input_size=SIZE, exits=3))
    hooked = attach(AttachConfig(backbone="cifar-resnet20", input_size=SIZE, exits=3, hooks=True))
    assert [p.name for p in hooked.exit_points] == [p.name for p in staged.exit_points]
    assert staged.cost is not None and hooked.cost is not None
    assert hooked.cost.backbone_macs == staged.cost.backbone_macs
    assert [(e.prefix_macs, e.branch_macs) for e in hooked.cost.exits] == [(e.prefix_macs, e.branch_macs) for e in staged.cost.exits]


def test_unknown_or_unusable_exit_modules() -> None:
    with pytest.raises(PteenetError, match="unknown exit module 'nope'.*stem.2"):
        attach(AttachConfig(backbone=SPEC, input_size=SIZE, hooks=True, at=["nope"]))
    with pytest.raises(PteenetError, match="did not run exactly once"):
        attach(AttachConfig(backbone="torchvision:resnet18", input_size=(3, 32, 32), hooks=True, at=["layer1.0.relu"]))  # runs twice


def test_checkpoint_round_trip_and_bench_say_so(tmp_path: Path) -> None:
    model = attach(AttachConfig(backbone=SPEC, input_size=SIZE, hooks=True, exits=2))
    path = tmp_path / "a.safetensors"
    save_checkpoint(path, model)
    loaded = load_checkpoint(path).model
    assert loaded.runtime == "hooks" and [p.name for p in loaded.exit_points] == [p.name for p in model.exit_points]
    x = torch.randn(4, *SIZE)
    assert torch.equal(loaded.predict(x, 0.5).logits, model.predict(x, 0.5).logits)
    doc = bench(loaded, x, BenchConfig(batch_sizes=(2,), repeats=1, warmup=1))
    assert doc["runtime"] == "hooks" and doc["warnings"][0] == NO_EARLY_EXIT


def test_cli_pipeline_trains_sweeps_and_labels_every_output(tmp_path: Path) -> None:
    run = CliRunner().invoke
    a, t = tmp_path / "a.safetensors", tmp_path / "t.safetensors"
    result = run(app, ["attach", SPEC, "--input-size", "3,16,16", "--hooks", "--exits", "2", "-o", str(a)])
    assert result.exit_code == 0, result.output
    assert "no real early exit" in result.output
    result = run(app, ["attach", SPEC, "--input-size", "3,16,16", "--hooks", "--list", "--json"])
    assert json.loads(result.stdout)["runtime"] == "hooks"
    result = run(app, ["train-branches", str(a), "-o", str(t), "--data", "synthetic", "--limit", "96", "--epochs", "1",
                       "--batch-size", "32", "--device", "cpu", "--cache-features"])
    assert result.exit_code == 0, result.output
    result = run(app, ["sweep-threshold", str(t), "-o", str(tmp_path / "sweep"), "--json"])
    assert result.exit_code == 0, result.output
    result = run(app, ["info", str(t)])
    assert "no real early exit" in result.output
    assert json.loads(run(app, ["info", str(t), "--json"]).stdout)["runtime"] == "hooks"
    result = run(app, ["export", str(t), "-o", str(tmp_path / "prog"), "--format", "torch-export"])
    assert result.exit_code == 1 and "no real early exit" in result.output and not (tmp_path / "prog").exists()
    result = run(app, ["export", str(t), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "no real early exit" in result.output
    assert "no real early exit" in (tmp_path / "out" / "report.md").read_text()
    assert pteenet.load(tmp_path / "out" / "model.safetensors").runtime == "hooks"
    result = run(app, ["bench", str(t), "--limit", "8", "--batch-size", "4", "--repeats", "1"])
    assert result.exit_code == 0, result.output
    assert "no real early exit" in result.output
