"""The config discipline (pteenet/configs.py): keyword-only, checked when built, a JSON round trip
from the fields, and old records (checkpoint schemas 1 and 2, flat training records) still read."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import StopAfter
from pteenet import (
    AttachConfig,
    DataConfig,
    DataRequest,
    ExportConfig,
    LossConfig,
    PteenetError,
    SweepConfig,
    TrainConfig,
    attach,
    load_checkpoint,
    save_checkpoint,
)
from pteenet.bench.run import BenchConfig
from pteenet.configs import SCHEMA_VERSION, Config
from pteenet.exits.branches import BranchConfig
from pteenet.runtime.checkpoint import META_KEY, read_metadata
from pteenet.training.config import recorded_configs
from pteenet.training.run import Interrupted, train_branches

BAD: list[tuple[Callable[[], Any], str]] = [
    (lambda: TrainConfig(epochs=0), "epochs"),
    (lambda: TrainConfig(epochs=2.5), "epochs"),
    (lambda: TrainConfig(batch_size=0), "batch_size"),
    (lambda: TrainConfig(lr=0.0), "lr"),
    (lambda: TrainConfig(lr=math.nan), "lr"),
    (lambda: TrainConfig(weight_decay=-1e-4), "weight_decay"),
    (lambda: TrainConfig(seed=0.5), "seed"),
    (lambda: TrainConfig(device="gpu"), "device"),
    (lambda: TrainConfig(workers=-1), "workers"),
    (lambda: TrainConfig(views=0), "views"),
    (lambda: TrainConfig(views=2), "--views"),  # needs the feature cache
    (lambda: TrainConfig(threshold=1.5), "threshold"),
    (lambda: TrainConfig(amp=True, device="cpu"), "--amp"),
    (lambda: TrainConfig(loss="ce"), "loss"),
    (lambda: LossConfig(version="v3"), "loss version"),
    (lambda: LossConfig(targets="hard"), "loss target"),
    (lambda: LossConfig(lam=-0.1), "lam"),
    (lambda: LossConfig(lam=math.nan), "lambda"),
    (lambda: LossConfig(temperature=0.0), "temperature"),
    (lambda: LossConfig(exit_ce=-1.0), "exit_ce"),
    (lambda: DataConfig(spec="cifar11"), "dataset 'cifar11'"),
    (lambda: DataConfig(spec="synthetic", limit=0), "limit"),
    (lambda: DataConfig(spec="synthetic", calibration_split=1.0), "calibration_split"),
    (lambda: DataConfig(spec="synthetic", seed="1"), "seed"),
    (lambda: DataConfig(spec="synthetic", crop_padding=-1), "crop_padding"),
    (lambda: DataConfig(spec="synthetic", calibration="cifar11"), "calibration"),
    (lambda: DataConfig(spec="synthetic", calibration="synthetic#half=2"), "calibration"),
    (lambda: DataRequest(limit=0), "limit"),
    (lambda: AttachConfig(backbone=""), "backbone"),
    (lambda: AttachConfig(backbone="cifar-resnet20", num_classes=0), "num_classes"),
    (lambda: AttachConfig(backbone="cifar-resnet20", input_size=(3, 0, 8)), "input_size"),
    (lambda: AttachConfig(backbone="cifar-resnet20", input_size=(3, 8)), "input_size"),
    (lambda: AttachConfig(backbone="cifar-resnet20", at=["layer1"], exits=2), "--exits"),
    (lambda: AttachConfig(backbone="cifar-resnet20", exits=0), "exits"),
    (lambda: AttachConfig(backbone="cifar-resnet20", exits="most"), "exits"),
    (lambda: AttachConfig(backbone="cifar-resnet20", placement="middle"), "placement"),
    (lambda: AttachConfig(backbone="cifar-resnet20", branch="conv9"), "branch"),
    (lambda: AttachConfig(backbone="cifar-resnet20", grid=0), "grid"),
    (lambda: AttachConfig(backbone="cifar-resnet20", hidden=0), "hidden"),
    (lambda: BranchConfig(kind="mlp"), "branch type"),
    (lambda: BranchConfig(convs=4), "convs"),
    (lambda: BenchConfig(batch_sizes=()), "batch_sizes"),
    (lambda: BenchConfig(batch_sizes=(1, 0)), "batch_sizes"),
    (lambda: BenchConfig(threshold=2.0), "threshold"),
    (lambda: BenchConfig(policy="margin"), "policy"),
    (lambda: BenchConfig(threads=0), "threads"),
    (lambda: BenchConfig(repeats=0), "repeats"),
    (lambda: BenchConfig(warmup=-1), "warmup"),
    (lambda: ExportConfig(output="o", formats=("tflite",)), "format"),
    (lambda: ExportConfig(output="o", threshold=[0.5, 1.5]), "threshold"),
    (lambda: ExportConfig(output="o", threshold=0.5, budget=0.5), "--budget"),
    (lambda: ExportConfig(output="o", budget=0.0), "budget"),
    (lambda: ExportConfig(output="o", max_drop=-1.0), "max_drop"),
    (lambda: ExportConfig(output="o", policy="margin"), "policy"),
    (lambda: SweepConfig(device="gpu"), "device"),
    (lambda: SweepConfig(split="holdout"), "split"),
    (lambda: SweepConfig(policy="margin"), "policy"),
    (lambda: SweepConfig(thresholds="abc"), "threshold"),
    (lambda: SweepConfig(budget=0.5, max_drop=1.0), "--max-drop"),
    (lambda: SweepConfig(budget=-0.5), "budget"),
    (lambda: SweepConfig(max_drop=math.inf), "max_drop"),
    (lambda: SweepConfig(select_exits=True), "--select-exits"),
    (lambda: SweepConfig(write="x.safetensors"), "--write"),
    (lambda: SweepConfig(batch_size=0), "batch_size"),
    (lambda: SweepConfig(workers=-1), "workers"),
]


@pytest.mark.parametrize("make, field", BAD)
def test_a_bad_value_is_one_error_naming_the_field(make: Callable[[], Any], field: str) -> None:
    with pytest.raises(PteenetError) as err:
        make()
    assert field in str(err.value) and "\n" not in str(err.value)


def test_replace_checks_again_and_positional_arguments_are_refused() -> None:
    with pytest.raises(PteenetError, match="epochs"):
        dataclasses.replace(TrainConfig(), epochs=0)
    with pytest.raises(TypeError):
        TrainConfig(20)  # type: ignore[misc]
    with pytest.raises(TypeError):
        DataConfig("synthetic")  # type: ignore[misc]


EVERY: list[Config] = [
    TrainConfig(epochs=3, batch_size=16, lr=2e-3, weight_decay=1e-4, seed=4, device="cpu", workers=2, amp=False,
                cache_features=True, views=2, cache_dir="/tmp/features", ensemble=False, threshold=0.7,
                loss=LossConfig(version="v2", lam=0.5, targets="labels", exit_ce=0.25, temperature=3.0)),
    LossConfig(version="v1", lam=0.1),
    DataConfig(spec="imagefolder:/data", data_dir="/d", limit=64, augment=False, calibration_split=0.2, seed=3, download=False,
               crop_padding=2, calibration="synthetic#half=1"),
    AttachConfig(backbone="cifar-resnet20", weights="w.th", num_classes=10, input_size=(3, 16, 16), mean=(0.5, 0.5, 0.5),
                 std=(0.25, 0.25, 0.25), at=["layer1", "layer2"], placement="fine", branch="conv2", cascade=False,
                 grid=2, hidden=64),
    AttachConfig(backbone="torchvision:resnet18", exits=3),
    BranchConfig(kind="pool-mlp", grid=2, hidden=32, cascade=True),
    BenchConfig(batch_sizes=(1, 8), threshold=[0.4, 0.6], policy="entropy", threads=2, repeats=3, warmup=1,
                extra={"data": "synthetic", "split": "test"}, tune_allocator=False),
    ExportConfig(output=Path("out/export"), max_drop=1.0, policy="max-softmax", formats=["onnx"], force=True),
    ExportConfig(output="o", threshold=[0.2, 0.3]),
    SweepConfig(outdir="sw", split="test", policy="entropy", thresholds="0:1:0.1", per_exit=True, select_exits=True,
                budget=0.6, write="w.safetensors", batch_size=8, device="cpu", workers=1, plots=False),
]


@pytest.mark.parametrize("cfg", EVERY, ids=lambda c: type(c).__name__)
def test_json_round_trip(cfg: Config) -> None:
    doc = json.loads(json.dumps(cfg.to_dict()))  # plain JSON: no tuples, paths or dataclasses left
    assert doc["schema_version"] == SCHEMA_VERSION
    assert type(cfg).from_dict(doc) == cfg


def test_every_config_is_keyword_only_checked_and_round_tripped() -> None:
    configs = set(Config.__subclasses__())
    assert {c.__name__ for c in configs} == {"AttachConfig", "BenchConfig", "BranchConfig", "DataConfig", "ExportConfig",
                                             "LossConfig", "SweepConfig", "TrainConfig"}
    for c in configs:
        assert all(f.kw_only for f in dataclasses.fields(c)) and "__post_init__" in vars(c), c.__name__
    assert {type(c) for c in EVERY} == configs  # test_json_round_trip covers each


def test_from_dict_fills_defaults_and_refuses_unknown_or_newer() -> None:
    assert TrainConfig.from_dict({"epochs": 3}) == TrainConfig(epochs=3)
    assert TrainConfig.from_dict({"loss": {"lam": 0.2}}).loss == LossConfig(lam=0.2)
    with pytest.raises(PteenetError, match="unknown TrainConfig setting 'epoch'") as err:
        TrainConfig.from_dict({"epoch": 3})
    assert "epochs" in str(err.value)  # the hint lists the known settings
    with pytest.raises(PteenetError, match="unknown LossConfig setting 'lambda'"):
        TrainConfig.from_dict({"loss": {"lambda": 0.2}})
    with pytest.raises(PteenetError, match="resume"):
        TrainConfig.from_dict({"resume": True})  # not saved, so not read either
    with pytest.raises(PteenetError, match="upgrade pteenet"):
        TrainConfig.from_dict({"schema_version": SCHEMA_VERSION + 1})
    with pytest.raises(PteenetError, match="epochs"):
        TrainConfig.from_dict({"epochs": 0})  # checked like any other construction


def test_the_calibration_split_reads_its_earlier_name_val_split() -> None:
    new = DataConfig(spec="synthetic", calibration_split=0.3)
    record = {k: v for k, v in new.to_dict().items() if k != "calibration_split"}
    assert DataConfig.from_dict({**record, "val_split": 0.3}) == new  # a checkpoint's data config before the rename
    assert DataConfig.from_dict({**record, "val_split": 0.5, "calibration_split": 0.3}) == new  # the new key wins
    assert "val_split" not in new.to_dict() and dataclasses.replace(new, seed=1).calibration_split == 0.3
    with pytest.warns(DeprecationWarning, match="calibration_split"):
        assert DataConfig(spec="synthetic", val_split=0.3) == new
    assert DataConfig(spec="synthetic") == DataConfig(spec="synthetic", calibration_split=0.1)


def test_resume_diffs_come_from_the_field_metadata() -> None:
    base = TrainConfig(epochs=2, device="cpu")
    free = dataclasses.replace(base, device="auto", workers=3, cache_dir="/elsewhere", threshold=0.9, resume=True)
    assert free.resume_diffs(base) == []
    changed = dataclasses.replace(base, epochs=3, loss=LossConfig(lam=0.5))
    assert changed.resume_diffs(base) == ["epochs 3 (was 2)", "loss.lam 0.5 (was 0.9)"]
    data = DataConfig(spec="synthetic")
    assert dataclasses.replace(data, data_dir="/moved", download=False).resume_diffs(data) == []
    assert dataclasses.replace(data, crop_padding=2).resume_diffs(data, "data.") == ["data.crop_padding 2 (was None)"]


# -- records written before the configs were saved whole -------------------------------------------
def _flat(record: dict[str, Any]) -> dict[str, Any]:
    """A schema 3 training record in the flat layout schema 2 files have (pteenet before configs.py)."""
    c, d = record["config"], record["data"]
    loss = c["loss"]
    return {"epochs": c["epochs"], "batch_size": c["batch_size"], "lr": c["lr"], "weight_decay": c["weight_decay"],
            "seed": c["seed"], "cache_features": c["cache_features"], "views": c["views"], "ensemble": c["ensemble"],
            "loss": loss["version"], "lambda": loss["lam"], "targets": loss["targets"],
            "temperature": loss["temperature"], "exit_ce": loss["exit_ce"], "data": d["spec"], "limit": d["limit"],
            "augment": d["augment"], "val_split": d["calibration_split"], "data_seed": d["seed"],
            "calibration": d["calibration"], "threshold": c["threshold"], "device": record["device"],
            "amp": c["amp"], "workers": c["workers"], "epochs_done": record["epochs_done"],
            "complete": record["complete"], "source": record["source"], "seconds": record["seconds"]}


def _rewrite(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    meta = read_metadata(path)
    edit(meta)
    save_file(load_file(str(path)), str(path), metadata={META_KEY: json.dumps(meta)})


def _as_schema_2(meta: dict[str, Any]) -> None:
    meta["schema_version"] = 2
    meta["backbone"]["extra"] = {}
    meta["branch"].pop("schema_version")
    meta["training"] = _flat(meta["training"])


def test_a_schema_2_unfinished_run_resumes_to_the_same_branches(tmp_path: Path) -> None:
    model = attach(AttachConfig(backbone="cifar-resnet20", input_size=(3, 16, 16), exits=2))
    src = tmp_path / "attached.safetensors"
    save_checkpoint(src, model)
    data = DataConfig(spec="synthetic", limit=64, augment=False, seed=2)
    cfg = TrainConfig(epochs=2, batch_size=32, lr=1e-2, device="cpu", ensemble=False, loss=LossConfig(lam=0.5))
    straight, old = tmp_path / "straight.safetensors", tmp_path / "old.safetensors"
    train_branches(src, straight, data, cfg)
    with pytest.raises(Interrupted):
        train_branches(src, old, data, cfg, StopAfter(1))
    record = read_metadata(old)["training"]
    renamed = {**record, "data": {("val_split" if k == "calibration_split" else k): v for k, v in record["data"].items()}}
    assert recorded_configs(renamed) == (cfg, data)  # a schema 3 record written before calibration_split was named
    _rewrite(old, _as_schema_2)
    assert recorded_configs(record) == (cfg, data)
    old_cfg, old_data = recorded_configs(read_metadata(old)["training"])
    assert old_data == data and cfg.resume_diffs(old_cfg) == []  # device, amp, workers (free) are not read from it
    with pytest.raises(PteenetError, match=r"loss.lam 0.9 \(was 0.5\)"):  # the old record is checked field by field
        train_branches(src, old, data, dataclasses.replace(cfg, loss=LossConfig(), resume=True))
    doc = train_branches(src, old, data, dataclasses.replace(cfg, resume=True))
    assert [r["epoch"] for r in doc["epochs"]] == [1, 2]
    a, b = load_file(str(straight)), load_file(str(old))
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("branches."))
    assert read_metadata(old)["training"]["config"] == cfg.fields_dict()  # rewritten in the new layout


def test_a_schema_1_checkpoint_loads(tmp_path: Path) -> None:
    model = attach(AttachConfig(backbone="cifar-resnet20", input_size=(3, 16, 16), exits=2, branch="conv2", cascade=False))
    path = tmp_path / "v1.safetensors"
    save_checkpoint(path, model)

    def as_schema_1(meta: dict[str, Any]) -> None:
        meta.update(schema_version=1, branch={"type": "conv2", "convs": 2})
        meta["backbone"]["extra"] = {}
        del meta["ensemble"], meta["active_exits"]

    _rewrite(path, as_schema_1)
    loaded = load_checkpoint(path).model
    assert loaded.branch_config == model.branch_config
    x = torch.randn(4, 3, 16, 16)
    assert torch.equal(loaded.predict(x, 0.5).logits, model.predict(x, 0.5).logits)
