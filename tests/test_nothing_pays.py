"""When no setting saves compute within the constraint (issue 18): sweep-threshold says so in one
warning line with the reason, the written model is the backbone alone (no exit decides, no branch
is computed, cost exactly 1.0), and export and its report say it too."""
from __future__ import annotations

import json
from pathlib import Path

import torch

import pteenet
from helpers import run_cli
from pteenet.exits.branches import Branch
from pteenet.runtime.checkpoint import load_checkpoint


def test_nothing_pays_is_said_and_the_written_model_is_the_backbone(tmp_path: Path, monkeypatch) -> None:
    torch.manual_seed(0)
    ckpt, written = tmp_path / "untrained.safetensors", tmp_path / "tuned.safetensors"
    # Random branches that rarely agree: within a 0-point drop only "almost never exit" qualifies,
    # and that costs the backbone plus every branch.
    pteenet.save_checkpoint(ckpt, pteenet.attach(pteenet.AttachConfig(backbone="cifar-resnet20", input_size=(3, 16, 16),
                                                                      exits=3, branch="conv2", cascade=False)))
    code, stdout, stderr = run_cli("sweep-threshold", ckpt, "-o", tmp_path / "out", "--thresholds", "0:1:0.05",
                                   "--data", "synthetic", "--limit", 40, "--max-drop", 0, "--no-guarantee", "--no-select-exits", "--write", written,
                                   "--json")  # a 0-point drop is never certified
    assert code == 0, stderr
    doc = json.loads(stdout)
    lines = [line for line in stderr.splitlines() if "nothing pays" in line]
    assert len(lines) == 1 and lines[0].startswith("Warning: nothing pays: the cheapest setting")
    assert "the exits agree with the backbone on at most" in lines[0] and "attach fewer, later" in lines[0]
    why = doc["nothing_pays"]
    assert why["cheapest"]["cost"] >= 1.0 and 0 <= why["best_agreement"] < 1
    assert doc["chosen"]["cost"] == 1.0 and doc["chosen"]["exit_fractions"][-1] == 1.0
    assert doc["chosen"]["active_exits"] == [False, False, False]
    model = load_checkpoint(written).model
    assert model.active == [False, False, False] and not any(model.computed_branches())

    def refuse(self: Branch, *a: object, **kw: object) -> None:
        raise AssertionError("a branch was computed")

    monkeypatch.setattr(Branch, "forward", refuse)
    monkeypatch.setattr(Branch, "head", refuse)
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), model.backbone(x))  # the backbone alone, no branch run
    monkeypatch.undo()
    code, stdout, stderr = run_cli("export", written, "-o", tmp_path / "export", "--json")
    assert code == 0, stderr
    assert "no exit takes decisions" in stderr and "did not pay" in stderr
    report = (tmp_path / "export" / "report.md").read_text()
    assert "no exit takes decisions: the model runs the backbone alone (cost 1.000" in report
    code, stdout, stderr = run_cli("export", written, "-o", tmp_path / "export2", "--max-drop", 0, "--json")
    assert code == 0, stderr
    assert load_checkpoint(tmp_path / "export2" / "model.safetensors").model.active == [False, False, False]
