"""The library on models in memory: attach -> train_exits -> sweep_model -> export_model with no
checkpoint file in between, giving what the path-based functions (the commands) give on the same inputs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import pteenet
import pteenet.runtime.checkpoint as checkpoint_mod
from pteenet.data import DataRequest
from pteenet.export.run import export
from pteenet.sweep import sweep_threshold
from pteenet.training.run import train_branches

DATA = pteenet.DataConfig(spec="synthetic", limit=96, augment=False)
TRAIN = pteenet.TrainConfig(epochs=2, batch_size=32, lr=1e-2, device="cpu", ensemble=True)


def sweep_cfg(**kw: Any) -> pteenet.SweepConfig:
    # confidence 0: 35 calibration images certify no 2-point drop (test_guarantee.py covers the guarantee);
    # MACs: the two ways must give the same document, and a time profile differs run to run
    return pteenet.SweepConfig(**{"thresholds": "0:1:0.05", "max_drop": 2.0, "select_exits": True, "device": "cpu",
                                  "plots": False, "confidence": 0.0, "cost": "macs", **kw})


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(path)).items() if k.startswith(("branches.", "ensemble."))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # as conftest's autouse fixture, which runs after module-scoped ones
    model = pteenet.attach(pteenet.AttachConfig(backbone="cifar-resnet20", input_size=(3, 16, 16), exits=3))
    root = tmp_path_factory.mktemp("library")
    attached = root / "attached.safetensors"
    pteenet.save_checkpoint(attached, model)  # the path-based run's input, written before anything runs

    # In memory: no checkpoint may be read, and the only one written is the export's model.safetensors.
    written: list[Path] = []
    real_write = checkpoint_mod.atomic_write

    def refuse_read(path: Any) -> None:
        raise AssertionError(f"the in-memory pipeline read the checkpoint {path}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint_mod, "read_metadata", refuse_read)
        mp.setattr(checkpoint_mod, "atomic_write",
                   lambda path, write: written.append(Path(path)) or real_write(path, write))
        history = pteenet.train_exits(model, DATA, TRAIN)
        swept = pteenet.sweep_model(model, DATA, sweep_cfg())
        exported = pteenet.export_model(model, pteenet.ExportConfig(output=root / "memory"))

    paths = {"trained": root / "trained.safetensors", "tuned": root / "tuned.safetensors", "export": root / "files"}
    path_history = train_branches(attached, paths["trained"], DATA, TRAIN)
    path_swept = sweep_threshold(paths["trained"], DataRequest(), sweep_cfg(write=str(paths["tuned"])))
    path_exported = export(paths["tuned"], pteenet.ExportConfig(output=paths["export"]))
    return {"model": model, "written": written, "root": root, "memory": (history, swept, exported),
            "files": (path_history, path_swept, path_exported), "paths": paths}


def test_in_memory_pipeline_writes_no_checkpoint_in_between(runs: dict[str, Any]) -> None:
    assert [p.parent.name.endswith(".tmp") and p.name for p in runs["written"]] == ["model.safetensors"]
    assert (runs["root"] / "memory" / "model.safetensors").is_file()


def test_training_gives_the_same_branches_and_history(runs: dict[str, Any]) -> None:
    (history, _, _), (path_history, _, _) = runs["memory"], runs["files"]
    assert [r["train"] for r in history["epochs"]] == [r["train"] for r in path_history["epochs"]]
    assert [r["val"] for r in history["epochs"]] == [r["val"] for r in path_history["epochs"]]
    assert history["final"]["output"] is None and path_history["final"]["output"] == str(runs["paths"]["trained"])
    assert history["final"]["complete"] and runs["model"].meta["training"]["source"] is None


def test_sweep_chooses_the_same_point(runs: dict[str, Any]) -> None:
    (_, swept, _), (_, path_swept, _) = runs["memory"], runs["files"]
    assert swept["chosen"] is not None and swept["chosen"] == path_swept["chosen"]
    assert swept["points"] == path_swept["points"] and swept["data"] == path_swept["data"]
    assert swept["warnings"] == path_swept["warnings"] == []
    assert swept["checkpoint"] is None and path_swept["checkpoint"] == str(runs["paths"]["trained"])


def test_export_writes_the_same_model(runs: dict[str, Any]) -> None:
    (_, _, exported), (_, _, path_exported) = runs["memory"], runs["files"]
    assert exported["operating_point"] == path_exported["operating_point"]
    mem, files = runs["root"] / "memory" / "model.safetensors", runs["paths"]["export"] / "model.safetensors"
    a, b = tensors(mem), tensors(files)
    assert a.keys() == b.keys() and any(k.startswith("ensemble.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    m, f = pteenet.load(str(mem)), pteenet.load(str(files))
    assert (m.policy, m.thresholds, m.active) == (f.policy, f.thresholds, f.active)
    report = json.loads((runs["root"] / "memory" / "report.json").read_text())
    assert report["source_checkpoint"] is None
    assert "from a model in memory" in (runs["root"] / "memory" / "report.md").read_text()


def test_sweep_model_warns_when_the_data_is_not_the_recorded_split(runs: dict[str, Any]) -> None:
    # No budget: nothing is chosen, so the model is left as it is.
    doc = pteenet.sweep_model(runs["model"], pteenet.DataConfig(spec="synthetic", limit=64),
                              sweep_cfg(max_drop=None, select_exits=False))
    assert any("limit 64 (recorded 96)" in w for w in doc["warnings"])


def test_sweep_model_leaves_writing_the_checkpoint_to_the_caller(tiny_model: pteenet.EarlyExitModel) -> None:
    with pytest.raises(pteenet.PteenetError, match="save_checkpoint"):
        pteenet.sweep_model(tiny_model, None, sweep_cfg(write="tuned.safetensors"))


def test_train_exits_resume_needs_the_saved_state(tiny_model: pteenet.EarlyExitModel) -> None:
    with pytest.raises(pteenet.PteenetError, match="resume_state"):
        pteenet.train_exits(tiny_model, DATA, pteenet.TrainConfig(resume=True, device="cpu"))


def test_the_package_exports_the_pipeline_and_keeps_its_modules() -> None:
    for name in pteenet.__all__:
        assert hasattr(pteenet, name), name
    import pteenet.export.run as export_mod
    import pteenet.sweep as sweep_pkg
    import pteenet.training.run as train_mod

    # the functions have names of their own, so the submodules stay reachable as attributes
    assert all(type(m).__name__ == "module" for m in (export_mod, sweep_pkg, train_mod))
