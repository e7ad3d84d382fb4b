"""The fallback for backbones torch.fx cannot trace: exits on forward hooks. Exits are computed and
decided like the staged runtime's, costs are those of real exits, and every command says that there
is no real early exit."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import pteenet
from helpers import error_line, run_cli
from pteenet import AttachConfig, PteenetError, attach, load_checkpoint, save_checkpoint
from pteenet.bench.run import BenchConfig, bench
from pteenet.exits.policies import never_exit_threshold
from pteenet.tracing.hooks import NO_EARLY_EXIT

SPEC, SIZE = "tiny_models:branchy", (3, 16, 16)


def test_untraceable_model_is_refused_with_the_fallback_named() -> None:
    with pytest.raises(PteenetError, match="--hooks"):
        attach(AttachConfig(backbone=SPEC, input_size=SIZE))
    code, _, stderr = run_cli("attach", SPEC, "--input-size", "3,16,16", "-o", "x.safetensors")
    assert code == 1 and "--hooks" in error_line(stderr)


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
    a, t = tmp_path / "a.safetensors", tmp_path / "t.safetensors"
    code, out, err = run_cli("attach", SPEC, "--input-size", "3,16,16", "--hooks", "--exits", 2, "-o", a)
    assert code == 0, err
    assert "no real early exit" in out + err
    code, out, err = run_cli("attach", SPEC, "--input-size", "3,16,16", "--hooks", "--list", "--json")
    assert json.loads(out)["runtime"] == "hooks"
    code, out, err = run_cli("train-branches", a, "-o", t, "--data", "synthetic", "--limit", 96, "--epochs", 1,
                             "--batch-size", 32, "--device", "cpu", "--cache-features")
    assert code == 0, err
    code, out, err = run_cli("sweep-threshold", t, "-o", tmp_path / "sweep", "--json")
    assert code == 0, err
    code, out, err = run_cli("info", t)
    assert "no real early exit" in out + err
    assert json.loads(run_cli("info", t, "--json")[1])["runtime"] == "hooks"
    code, out, err = run_cli("export", t, "-o", tmp_path / "prog", "--format", "torch-export")
    assert code == 1 and "no real early exit" in out + err and not (tmp_path / "prog").exists()
    code, out, err = run_cli("export", t, "-o", tmp_path / "out")
    assert code == 0, err
    assert "no real early exit" in out + err
    assert "no real early exit" in (tmp_path / "out" / "report.md").read_text()
    assert pteenet.load(tmp_path / "out" / "model.safetensors").runtime == "hooks"
    code, out, err = run_cli("bench", t, "--limit", 8, "--batch-size", 4, "--repeats", 1)
    assert code == 0, err
    assert "no real early exit" in out + err
