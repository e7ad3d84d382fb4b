"""The one-file checkpoint: round trips, integrity, and refusals."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import pteenet
from pteenet import PteenetError
from pteenet.backbones.weights import module_sha256
from pteenet.runtime.checkpoint import load_checkpoint, read_metadata, save_checkpoint


def test_round_trip_is_exact(tiny_model, tmp_path: Path) -> None:
    tiny_model.set_thresholds([0.3, 0.6, 0.9], "max-softmax")
    tiny_model.meta["history"] = [{"epoch": 1}]
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, tiny_model, state={"step": torch.tensor(7)})
    ck = load_checkpoint(path)
    m = ck.model
    assert m.thresholds == [0.3, 0.6, 0.9] and m.policy == "max-softmax"
    assert m.meta["history"] == [{"epoch": 1}]
    assert int(ck.state["step"]) == 7
    assert module_sha256(m.backbone) == module_sha256(tiny_model.backbone)
    x = torch.randn(6, 3, 16, 16)
    a, b = tiny_model.predict(x), m.predict(x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.exit_index, b.exit_index)
    assert isinstance(pteenet.load(str(path)), torch.nn.Module)


def test_tensors_are_stored_once_under_two_prefixes(tiny_model, tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, tiny_model)
    keys = load_file(str(path)).keys()
    assert all(k.startswith(("backbone.", "branches.")) for k in keys)
    assert len(keys) == len(tiny_model.state_dict())


def test_truncated_file_is_a_clean_error(tiny_model, tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, tiny_model)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PteenetError):
        load_checkpoint(path)


def test_tampered_backbone_is_detected(tiny_model, tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, tiny_model)
    tensors = load_file(str(path))
    meta = read_metadata(path)
    tensors["backbone.conv1.weight"] += 1
    save_file(tensors, str(path), metadata={"pteenet": json.dumps(meta)})
    with pytest.raises(PteenetError, match="hash"):
        load_checkpoint(path)


def test_newer_schema_is_refused(tiny_model, tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, tiny_model)
    meta = read_metadata(path)
    meta["schema_version"] = 99
    save_file(load_file(str(path)), str(path), metadata={"pteenet": json.dumps(meta)})
    with pytest.raises(PteenetError, match="newer"):
        load_checkpoint(path)


def test_changed_backbone_is_never_saved(tiny_model, tmp_path: Path) -> None:
    with torch.no_grad():
        tiny_model.backbone.bn1.running_mean += 1
    with pytest.raises(PteenetError, match="changed"):
        save_checkpoint(tmp_path / "m.safetensors", tiny_model)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_train_mode_keeps_backbone_in_eval(tiny_model) -> None:
    tiny_model.train()
    assert not tiny_model.backbone.training
    assert all(b.training for b in tiny_model.branches)
