"""pteenet.training.run and `pteenet train-branches`: tiny model, synthetic data, CPU, a few seconds in all."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import pteenet.training.step as trainer_mod
from helpers import StopAfter, error_line, run_cli
from pteenet import AttachConfig, attach, load_checkpoint
from pteenet.backbones.weights import module_sha256
from pteenet.data import DataConfig, load_splits
from pteenet.errors import PteenetError
from pteenet.progress import Sink
from pteenet.runtime.checkpoint import META_KEY, read_metadata
from pteenet.training import feature_cache as feature_store
from pteenet.training.loss import LossConfig, LossOutput
from pteenet.training.run import Interrupted, TrainConfig, train_branches


def data(**kw: Any) -> DataConfig:
    return DataConfig(spec="synthetic", **{"limit": 96, **kw})


def cfg(**kw: Any) -> TrainConfig:
    # the ensemble is off by default; these tests train and resume through its fit too
    return TrainConfig(**{"epochs": 2, "batch_size": 32, "lr": 1e-2, "device": "cpu", "ensemble": True, **kw})


def branch_tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(path)).items() if k.startswith("branches.")}


def test_trains_end_to_end_and_leaves_the_backbone_alone(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    doc = train_branches(tiny_checkpoint, out, data(augment=False), cfg(epochs=4))
    losses = [r["train"]["loss"] for r in doc["epochs"]]
    assert len(losses) == 4 and losses[-1] < losses[0]
    val = doc["epochs"][-1]["val"]
    assert len(val["accuracy"]) == len(val["agreement"]) == len(val["mean_confidence"]) == 2
    assert {"accuracy", "agreement", "cost", "exit_fractions"} <= set(val["early_exit"])
    # Bit-identical backbone (BatchNorm running statistics included) and the recorded hash.
    src, trained = load_checkpoint(tiny_checkpoint).model, load_checkpoint(out)
    assert module_sha256(trained.model.backbone) == module_sha256(src.backbone) == doc["final"]["backbone_sha256"]
    for k, v in src.backbone.state_dict().items():
        assert torch.equal(v, trained.model.backbone.state_dict()[k]), k
    assert not all(torch.equal(a, b) for a, b in zip(src.branches.parameters(), trained.model.branches.parameters()))
    meta = trained.model.meta
    assert meta["history"] == json.loads(json.dumps(doc["epochs"]))
    assert meta["training"]["complete"] and meta["training"]["config"]["loss"] == LossConfig().fields_dict()
    # the ensemble (asked for by cfg) was fitted on the calibration split and saved
    assert trained.model.ensemble is not None and meta["training"]["config"]["ensemble"]
    assert meta["data"]["spec"] == "synthetic" and meta["data"]["sizes"]["val"] == 50
    assert trained.state == {}  # a finished run drops the resume state


@pytest.mark.parametrize("cache_features", [False, True])
def test_resume_ends_where_an_uninterrupted_run_ends(tiny_checkpoint: Path, tmp_path: Path, cache_features: bool) -> None:
    # Augmented (global RNG) unless cached (cache needs it off); shuffled by the data-order generator.
    d, c = data(augment=not cache_features), cfg(cache_features=cache_features)
    straight, split = tmp_path / "straight.safetensors", tmp_path / "split.safetensors"
    train_branches(tiny_checkpoint, straight, d, c)
    with pytest.raises(Interrupted, match="holds epoch 1"):
        train_branches(tiny_checkpoint, split, d, c, StopAfter(1))
    half = load_checkpoint(split)
    assert half.model.meta["training"]["complete"] is False and int(half.state["epoch"]) == 1
    assert {"step", "rng.cpu", "rng.order"} <= set(half.state)
    with pytest.raises(PteenetError, match="unfinished run"):  # no silent restart over an unfinished run
        train_branches(tiny_checkpoint, split, d, c)
    with pytest.raises(PteenetError, match="lr 0.5"):
        train_branches(tiny_checkpoint, split, d, cfg(cache_features=cache_features, lr=0.5, resume=True))
    doc = train_branches(tiny_checkpoint, split, d, cfg(cache_features=cache_features, resume=True))
    assert [r["epoch"] for r in doc["epochs"]] == [1, 2]
    a, b = branch_tensors(straight), branch_tensors(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    before = split.read_bytes()
    done = train_branches(tiny_checkpoint, split, d, cfg(cache_features=cache_features, resume=True))
    assert done["final"]["already_complete"] and split.read_bytes() == before


def test_views_need_an_augmented_feature_cache(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(PteenetError, match="--cache-features"):
        train_branches(tiny_checkpoint, tmp_path / "o.safetensors", data(augment=False), cfg(cache_features=True, views=2))
    with pytest.raises(PteenetError, match="--cache-features"):
        train_branches(tiny_checkpoint, tmp_path / "o.safetensors", data(), cfg(views=2))


def test_augmented_views_are_cached_and_reproducible(tiny_checkpoint: Path, tmp_path: Path) -> None:
    # Two augmented views of each image in the cache: twice the steps of one view, same result twice.
    one = train_branches(tiny_checkpoint, tmp_path / "a.safetensors", data(), cfg(cache_features=True, epochs=1, ensemble=False))
    two = train_branches(tiny_checkpoint, tmp_path / "b.safetensors", data(), cfg(cache_features=True, views=2, epochs=1, ensemble=False))
    again = train_branches(tiny_checkpoint, tmp_path / "c.safetensors", data(), cfg(cache_features=True, views=2, epochs=1, ensemble=False))
    assert one["final"]["complete"] and two["final"]["complete"] and again["final"]["complete"]
    assert branch_tensors(tmp_path / "b.safetensors").keys() == branch_tensors(tmp_path / "c.safetensors").keys()
    b, c = branch_tensors(tmp_path / "b.safetensors"), branch_tensors(tmp_path / "c.safetensors")
    assert all(torch.equal(b[k], c[k]) for k in b)
    a = branch_tensors(tmp_path / "a.safetensors")
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_and_keeps_the_last_good_epoch(tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out.safetensors"
    real, calls = trainer_mod.early_exit_loss, {"n": 0}

    def poisoned(*args: Any, **kw: Any) -> LossOutput:
        res = real(*args, **kw)
        calls["n"] += 1
        return res if calls["n"] <= 2 else LossOutput(loss=res.loss * float("nan"), nll=res.nll, cost=res.cost)

    monkeypatch.setattr(trainer_mod, "early_exit_loss", poisoned)  # 2 batches per epoch: epoch 2 fails
    with pytest.raises(PteenetError, match="loss became nan"):
        train_branches(tiny_checkpoint, out, data(limit=64), cfg(epochs=3))
    kept = load_checkpoint(out)
    assert kept.model.meta["training"]["epochs_done"] == 1 and int(kept.state["epoch"]) == 1


# -- the command -----------------------------------------------------------------------------------
def run(*args: object) -> tuple[int, str, str]:
    return run_cli("train-branches", *args)


def test_cli_json_document(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    code, stdout, stderr = run(tiny_checkpoint, "-o", out, "--data", "synthetic", "--limit", 64, "--epochs", 1, "--batch-size", 32,
            "--device", "cpu", "--loss", "v1", "--lambda", 0.5, "--targets", "soft", "--temperature", 2, "--json")
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert set(doc) == {"epochs", "final"} and len(doc["epochs"]) == 1
    epoch = doc["epochs"][0]
    assert {"epoch", "lr", "seconds", "train", "val"} <= set(epoch)
    assert {"loss", "agreement", "ee_cost"} <= set(epoch["train"])
    assert doc["final"]["complete"] and doc["final"]["output"] == str(out)
    assert read_metadata(out)["training"]["config"]["loss"]["version"] == "v1"


def test_cli_table_goes_to_stderr(tiny_checkpoint: Path, tmp_path: Path) -> None:
    code, stdout, stderr = run(tiny_checkpoint, "-o", tmp_path / "o.safetensors", "--data", "synthetic", "--limit", 32, "--epochs", 1,
            "--no-augment", "--cache-features", "--device", "cpu")
    assert code == 0, stderr
    assert stdout == "" and "cost@T" in stderr


def _no_exits(tiny_checkpoint: Path, path: Path) -> Path:
    with safe_open(str(tiny_checkpoint), framework="pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
    meta.update(exits=[], cost=None)
    tensors = {k: v for k, v in load_file(str(tiny_checkpoint)).items() if not k.startswith("branches.")}
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(meta)})
    return path


def _three_class_folder(root: Path) -> str:
    from PIL import Image

    for split in ("train", "test"):
        for c in ("a", "b", "c"):
            (root / split / c).mkdir(parents=True)
            Image.new("RGB", (16, 16), (40 * len(c), 0, 0)).save(root / split / c / "0.png")
    return f"imagefolder:{root}"


@pytest.mark.parametrize("case", ["negative-lambda", "missing-folder", "class-mismatch", "no-exits", "views-no-cache",
                                  "amp-on-cpu", "empty-dataset"])
def test_cli_bad_input_is_one_line_and_overwrites_nothing(tiny_checkpoint: Path, tmp_path: Path, case: str) -> None:
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    src, spec, extra = tiny_checkpoint, "synthetic", []
    if case == "negative-lambda":
        extra = ["--lambda", "-0.1"]
    elif case == "missing-folder":
        out = tmp_path / "nope" / "out.safetensors"
    elif case == "class-mismatch":
        spec = _three_class_folder(tmp_path / "folder")
    elif case == "no-exits":
        src = _no_exits(tiny_checkpoint, tmp_path / "no_exits.safetensors")
    elif case == "views-no-cache":
        extra = ["--views", "2"]
    elif case == "amp-on-cpu":
        extra = ["--amp"]
    else:
        (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
        (tmp_path / "empty" / "test" / "a").mkdir(parents=True)
        spec = f"imagefolder:{tmp_path / 'empty'}"
    code, stdout, stderr = run(src, "-o", out, "--data", spec, "--epochs", 1, "--device", "cpu", *extra)
    assert code == 1, stderr
    error_line(stderr)
    assert stdout == ""
    if out.parent.exists():
        assert out.read_bytes() == b"precious"


def test_cli_calibration_replaces_the_carved_val_split(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    code, stdout, stderr = run(tiny_checkpoint, "-o", out, "--data", "synthetic", "--limit", 40, "--epochs", 1, "--batch-size", 32,
            "--device", "cpu", "--no-augment", "--calibration", "synthetic#half=0", "--json")
    assert code == 0, stderr
    meta = read_metadata(out)
    assert meta["data"]["calibration"] == "synthetic#half=0" and meta["training"]["data"]["calibration"] == "synthetic#half=0"
    assert meta["data"]["sizes"] == {"train": 40, "val": 40, "test": 40} and meta["data"]["test_half"] == 1
    assert json.loads(stdout)["epochs"][0]["val"]  # the per-epoch report ran on the calibration data
    # The calibration data is part of what a --resume must repeat.
    split = tmp_path / "split.safetensors"
    with pytest.raises(Interrupted):
        train_branches(tiny_checkpoint, split, data(calibration="synthetic#half=0"), cfg(), StopAfter(1))
    with pytest.raises(PteenetError, match="calibration 'synthetic#half=1'"):
        train_branches(tiny_checkpoint, split, data(calibration="synthetic#half=1"), cfg(resume=True))


def test_feature_cache_dir_reuses_the_backbone_pass(tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "features"
    first = tmp_path / "a.safetensors"
    train_branches(tiny_checkpoint, first, data(augment=False), cfg(cache_features=True, cache_dir=str(store)))
    assert len(list(store.glob("features-*.safetensors"))) == 2  # train and val
    calls = []
    real = feature_store.build_feature_cache
    monkeypatch.setattr(feature_store, "build_feature_cache", lambda *a, **k: calls.append(1) or real(*a, **k))
    second = tmp_path / "b.safetensors"
    train_branches(tiny_checkpoint, second, data(augment=False), cfg(cache_features=True, cache_dir=str(store)))
    assert calls == []  # both splits read from the store
    a, b = branch_tensors(first), branch_tensors(second)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # another seed (another split of the data) is another key: built, not read
    train_branches(tiny_checkpoint, tmp_path / "c.safetensors", data(augment=False, seed=3), cfg(cache_features=True, cache_dir=str(store)))
    assert calls and len(list(store.glob("features-*.safetensors"))) == 4


def test_feature_cache_on_disk_is_memory_mapped_safetensors_equal_to_memory(tmp_path: Path) -> None:
    model = attach(AttachConfig(backbone="cifar-resnet20", input_size=(3, 16, 16), exits=2))
    splits = load_splits(data(augment=False), model.info.preprocess, model.info.num_classes)
    notes: list[str] = []

    class Notes(Sink):
        def note(self, message: str) -> None:
            notes.append(message)

    kw: dict[str, Any] = dict(views=1, augment=False, seed=0, batch_size=32, workers=0, amp=False,
                              device=torch.device("cpu"), sink=Notes())
    memory = feature_store.cached_split(model, splits.train, splits.split_info, "train", cache_dir=None, **kw)
    built = feature_store.cached_split(model, splits.train, splits.split_info, "train", cache_dir=str(tmp_path), **kw)
    read = feature_store.cached_split(model, splits.train, splits.split_info, "train", cache_dir=str(tmp_path), **kw)
    [file] = tmp_path.glob("features-*.safetensors")
    assert notes and "GiB on disk" in notes[0]  # the size is said before the pass
    rows = lambda c: [*c.taps, c.final, c.labels]  # noqa: E731
    on_disk = load_file(str(file))  # a plain safetensors file
    for a, b, c in zip(rows(memory), rows(built), rows(read)):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.equal(on_disk["tap.0"], memory.taps[0]) and torch.equal(on_disk["labels"], memory.labels)
    # read in place from the file, not copied into memory: a mapped buffer's storage cannot grow
    assert not read.taps[0].untyped_storage().resizable() and memory.taps[0].untyped_storage().resizable()
    # no temp file left; beside the cache, its record (rows that hold data, files left out)
    assert sorted(tmp_path.iterdir()) == [file.with_suffix(".json"), file]


def test_interrupted_before_the_ensemble_fit_resumes_to_the_same_ensemble(tiny_checkpoint: Path, tmp_path: Path) -> None:
    d, c = data(augment=False), cfg(cache_features=True)
    straight, split = tmp_path / "straight.safetensors", tmp_path / "split.safetensors"
    train_branches(tiny_checkpoint, straight, d, c)
    with pytest.raises(Interrupted, match="holds epoch 2"):  # every epoch done, the ensemble not yet fitted
        train_branches(tiny_checkpoint, split, d, c, StopAfter(2))
    half = load_checkpoint(split)
    assert half.model.ensemble is None and half.model.meta["training"]["complete"] is False
    doc = train_branches(tiny_checkpoint, split, d, cfg(cache_features=True, resume=True))
    assert doc["final"]["complete"] and [r["epoch"] for r in doc["epochs"]] == [1, 2]
    a, b = load_file(str(straight)), load_file(str(split))
    ens = [k for k in a if k.startswith("ensemble.")]
    assert ens and all(torch.equal(a[k], b[k]) for k in ens)


def test_the_pooling_plan_a_clock_picks_cannot_change_what_training_learns(
        tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same command and seed, once timed as this machine times it, then with the timing step
    forced to pick each plan in turn (as load on a busy machine can): bit-identical branches and
    ensemble."""
    from pteenet.exits import branches

    def run(name: str) -> dict[str, torch.Tensor]:
        monkeypatch.setattr(branches, "_chosen_plan", {})  # a fresh process: nothing timed yet
        out = tmp_path / f"{name}.safetensors"
        train_branches(tiny_checkpoint, out, data(augment=True), cfg(epochs=2, seed=3))
        return {k: v for k, v in load_file(str(out)).items() if k.startswith(("branches.", "ensemble."))}

    timed = run("timed")
    assert any(k.startswith("ensemble.") for k in timed)
    for plan in branches.POOL_PLANS:
        monkeypatch.setattr(branches, "_time_plans", lambda x, k, rounds=5, plan=plan: plan)
        forced = run(plan)
        assert forced.keys() == timed.keys()
        assert [k for k in timed if not torch.equal(timed[k], forced[k])] == [], plan
