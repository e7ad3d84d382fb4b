"""`pteenet attach` and `pteenet info` through the CLI: happy paths, --json, and bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import save_file

from helpers import error_line, run_cli
from pteenet.backbones.cifar_resnet import cifar_resnet


def test_attach_writes_a_checkpoint_and_prints_the_cost_table(tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    code, stdout, stderr = run_cli("attach", "cifar-resnet20", "--exits", 2, "--placement", "linear", "-o", out)
    assert code == 0, stderr
    assert out.is_file() and stdout == ""  # the table goes to stderr
    assert "layer" in stderr and "cost" in stderr


def test_attach_json_document(tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    code, stdout, _ = run_cli("attach", "cifar-resnet20", "--at", "layer1.1,layer2.1", "-o", out, "--json")
    assert code == 0
    doc = json.loads(stdout)
    assert isinstance(doc["backbone_macs"], int) and doc["backbone_macs"] > 0
    assert [e["name"] for e in doc["exits"]] == ["layer1.1", "layer2.1"]
    for e in doc["exits"]:
        assert {"node", "cost", "cost_paper", "prefix_macs", "branch_macs"} <= set(e)
        assert e["cost"] >= e["cost_paper"] > 0


def test_list_candidates_as_json() -> None:
    code, stdout, _ = run_cli("attach", "cifar-resnet20", "--list", "--json")
    assert code == 0
    doc = json.loads(stdout)
    shares = [c["share"] for c in doc["candidates"]]
    assert len(shares) == 9 and shares == sorted(shares) and 0 < shares[0] < shares[-1] < 1


def test_info_shows_the_metadata(tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    assert run_cli("attach", "cifar-resnet20", "--exits", 1, "-o", out)[0] == 0
    code, stdout, stderr = run_cli("info", out)
    assert code == 0 and "cifar-resnet20" in stderr
    code, stdout, _ = run_cli("info", out, "--json")
    assert code == 0 and json.loads(stdout)["backbone"]["spec"] == "cifar-resnet20"


@pytest.fixture
def resnet20_weights(tmp_path: Path) -> Path:
    path = tmp_path / "r20.safetensors"
    save_file(cifar_resnet("cifar-resnet20").state_dict(), str(path))
    return path


@pytest.mark.parametrize("args,needle", [
    (["cifar-resnet57"], "did you mean cifar-resnet56"),
    (["cifar-resnet20", "--at", "layer9.0"], "unknown exit point 'layer9.0'"),
    (["cifar-resnet20", "--exits", 50], "9 candidate exit points"),
    (["torchvision:resnet19"], "unknown torchvision model"),
    (["torchvision:alexnet", "--input-size", "3,8,8", "--num-classes", 10], "cannot take inputs of size 3,8,8"),
    (["cifar-resnet20", "--branch", "conv9"], "unknown branch type"),
])
def test_bad_input_is_one_line_and_leaves_no_file(tmp_path: Path, args: list[object], needle: str) -> None:
    out = tmp_path / "m.safetensors"
    code, _, stderr = run_cli("attach", *args, "-o", out)
    assert code == 1
    assert needle in error_line(stderr)
    assert not list(tmp_path.iterdir())


def test_weights_of_another_architecture(tmp_path: Path, resnet20_weights: Path) -> None:
    code, _, stderr = run_cli("attach", "cifar-resnet32", "--weights", resnet20_weights, "-o", tmp_path / "m.safetensors")
    assert code == 1 and "do not fit this architecture" in error_line(stderr)
    assert not (tmp_path / "m.safetensors").exists()


def test_malformed_input_size_is_a_usage_error(tmp_path: Path) -> None:
    code, _, _ = run_cli("attach", "cifar-resnet20", "--input-size", "32x32", "-o", tmp_path / "m.safetensors")
    assert code == 2


def test_corrupt_checkpoint_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    code, _, stderr = run_cli("info", bad)
    assert code == 1 and "cannot read checkpoint" in error_line(stderr)


def test_info_says_when_the_backbone_hash_does_not_match(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from pteenet.runtime.checkpoint import read_metadata

    out = tmp_path / "m.safetensors"
    assert run_cli("attach", "cifar-resnet20", "--exits", 1, "-o", out)[0] == 0
    code, stdout, stderr = run_cli("info", out, "--json")
    assert code == 0 and json.loads(stdout)["backbone_verified"] is True
    assert "match the recorded hash" in run_cli("info", out)[2]
    tensors, meta = load_file(str(out)), read_metadata(out)
    tensors["backbone.linear.bias"][0] += 1  # one number changed: the file no longer holds the attached backbone
    save_file(tensors, str(out), metadata={"pteenet": json.dumps(meta)})
    code, stdout, stderr = run_cli("info", out, "--json")
    assert code == 1 and json.loads(stdout)["backbone_verified"] is False
    assert "do not match their recorded hash" in error_line(stderr)
    code, _, stderr = run_cli("info", out)
    assert code == 1 and "DO NOT match" in stderr and stderr.strip().splitlines()[-1].startswith("Error: ")  # after the table
