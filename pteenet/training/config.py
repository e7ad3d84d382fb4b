"""What a branch-training run computes (``TrainConfig``) and what a checkpoint records of it: the
record written into ``meta["training"]``, read back in either of its layouts, and the checks a
``--resume`` makes against it (every config field not marked ``resume="free"`` must repeat).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..configs import (
    SCHEMA_VERSION,
    VERSION_KEY,
    Config,
    check_device,
    check_int,
    check_number,
    check_thresholds,
    setting,
)
from ..data import DataConfig
from ..errors import PteenetError
from ..exits.eenet import NAME as EENET
from ..runtime.checkpoint import read_metadata
from .loss import LossConfig


@dataclass(kw_only=True)
class TrainConfig(Config):
    """What a training run computes; a ``--resume`` must repeat every field not marked ``resume="free"``
    (``Config.resume_diffs``)."""

    # None: from the training set's size (``auto_epochs``). The cosine schedule spans all epochs: not
    # free on resume (a resume without --epochs takes the recorded number).
    epochs: int | None = None
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    device: str = setting("auto", resume="free")  # auto (CUDA when present) | cpu | cuda | mps
    workers: int = setting(0, resume="free")
    # CUDA only: bfloat16 autocast where supported, else float16 with loss scaling
    amp: bool = setting(False, resume="free")
    resume: bool = setting(False, saved=False)
    cache_features: bool = False
    views: int = 1  # augmented views of each training image in the feature cache (with augmentation)
    # keep feature caches here and reuse them across runs (``feature_store``)
    cache_dir: str | None = setting(None, resume="free")
    # Fit an exit ensemble on the calibration split after training. Off by default, for the cascade's
    # reason (runtime/attach.py): exit i's answer would need heads 0..i computed.
    ensemble: bool = False
    loss: LossConfig = setting(default_factory=LossConfig, decode=LossConfig.from_dict)
    # Train each head only on the samples that reach it under the checkpoint's chosen setting
    # (CalexNet's survivors): a second round after sweep-threshold --write.
    survivors: bool = False
    # the confidence threshold of the per-epoch early-exit metrics (monitoring only)
    threshold: float = setting(0.5, resume="free")

    def __post_init__(self) -> None:
        if self.epochs is not None:
            check_int("epochs", self.epochs, 1, "e.g. --epochs 20, or leave it out to size it from the data")
        check_int("batch_size", self.batch_size, 1, "e.g. --batch-size 128")
        check_number("lr", self.lr, 0, low_open=True, hint="e.g. --lr 1e-3")
        check_number("weight_decay", self.weight_decay, 0, hint="e.g. 0 or 5e-4")
        check_int("seed", self.seed, None)
        check_device(self.device)
        check_int("workers", self.workers, 0, "0 loads data in the main process")
        check_int("views", self.views, 1, "e.g. --views 4")
        check_thresholds(self.threshold)
        if not isinstance(self.loss, LossConfig):
            raise PteenetError(f"loss must be a LossConfig, got {type(self.loss).__name__}", "e.g. LossConfig(lam=0.5)")
        if self.views > 1 and not self.cache_features:
            raise PteenetError(f"--views {self.views} needs --cache-features with augmentation on",
                               "views are augmented copies of each training image held in the feature cache")
        if self.survivors and self.loss.version != "ce":
            raise PteenetError(f"--survivors trains each head on its own (the ce loss), not with --loss {self.loss.version}",
                               "drop --survivors or pass --loss ce")
        if self.amp and self.device in ("cpu", "mps"):
            raise PteenetError(f"--amp needs a CUDA device, not {self.device}", "drop --amp, or use --device cuda")


def check_survivors(cfg: TrainConfig, meta: dict[str, Any], source: str | None) -> None:
    """``--survivors`` needs the exit rule chosen on the checkpoint (``sweep-threshold --write``)."""
    if cfg.survivors and not ((meta.get("sweep") or {}).get("chosen") or {}).get("policy"):
        raise PteenetError(f"--survivors trains each head on the samples that reach it under the chosen exit rule, and "
                           f"{source or 'the model'} has none",
                           "choose it first: pteenet sweep-threshold CKPT --max-drop P --write CKPT, then train-branches CKPT --survivors")
    if cfg.survivors and meta["sweep"]["chosen"]["policy"] == EENET:  # model.reaching runs the registered policies
        raise PteenetError(f"--survivors trains each head on the samples that reach it under a threshold rule, and "
                           f"{source or 'the model'} exits by eenet's learned scheduler",
                           "choose another --policy with sweep-threshold --write, or drop --survivors")


class Interrupted(PteenetError):
    """Ctrl-C: the output holds the last complete epoch (or nothing new)."""


# Records before the configs were saved whole (no "config" key) were flat: record key -> (config, field).
# A frozen layout, only read; the current record is ``run_settings``'s.
_FLAT_RECORD = {"epochs": ("train", "epochs"), "batch_size": ("train", "batch_size"), "lr": ("train", "lr"),
                "weight_decay": ("train", "weight_decay"), "seed": ("train", "seed"),
                "cache_features": ("train", "cache_features"), "views": ("train", "views"),
                "ensemble": ("train", "ensemble"), "threshold": ("train", "threshold"), "loss": ("loss", "version"),
                "lambda": ("loss", "lam"), "targets": ("loss", "targets"), "temperature": ("loss", "temperature"),
                "exit_ce": ("loss", "exit_ce"), "data": ("data", "spec"), "limit": ("data", "limit"),
                "augment": ("data", "augment"), "val_split": ("data", "calibration_split"), "data_seed": ("data", "seed"),
                "calibration": ("data", "calibration")}


def run_settings(cfg: TrainConfig, data_cfg: DataConfig) -> dict[str, Any]:
    """What ``model.meta["training"]`` records of the configuration: both configs, whole."""
    return {VERSION_KEY: SCHEMA_VERSION, "config": cfg.fields_dict(), "data": data_cfg.fields_dict()}


def recorded_configs(training: dict[str, Any]) -> tuple[TrainConfig, DataConfig]:
    """The configs a ``meta["training"]`` record was trained with (either layout; missing keys get
    the defaults)."""
    if "config" in training:
        version = training.get(VERSION_KEY, SCHEMA_VERSION)
        return (TrainConfig.from_dict({VERSION_KEY: version, **training["config"]}),
                DataConfig.from_dict({VERSION_KEY: version, **training["data"]}))
    parts: dict[str, dict[str, Any]] = {"train": {}, "loss": {}, "data": {}}
    for key, (part, name) in _FLAT_RECORD.items():
        if key in training:
            parts[part][name] = training[key]
    return (TrainConfig(**parts["train"], loss=LossConfig(**parts["loss"])), DataConfig(**parts["data"]))


def check_resume(out_path: Path, src_meta: dict[str, Any], cfg: TrainConfig, data_cfg: DataConfig) -> dict[str, Any]:
    """OUT's metadata, after checking that it is a run of this checkpoint with these settings."""
    hint = "drop --resume to start a new run"
    if not out_path.is_file():
        raise PteenetError(f"nothing to resume: {out_path} does not exist", hint)
    meta = read_metadata(out_path)
    tr = meta.get("training")
    if not tr:
        raise PteenetError(f"{out_path} holds no training run to resume", hint)
    if meta["backbone_sha256"] != src_meta["backbone_sha256"] or meta["exits"] != src_meta["exits"]:
        raise PteenetError(f"{out_path} was not trained from this checkpoint (other backbone or exits)",
                           "pass the checkpoint the run started from, or drop --resume")
    if tr.get("complete"):
        return meta
    was_cfg, was_data = recorded_configs(tr)
    asked = cfg if cfg.epochs is not None else dataclasses.replace(cfg, epochs=was_cfg.epochs)  # none: the run's own
    diffs = asked.resume_diffs(was_cfg) + data_cfg.resume_diffs(was_data, "data.")
    if diffs:
        raise PteenetError("--resume with settings that differ from the run being resumed: " + ", ".join(diffs),
                           "repeat the original options, or drop --resume to start over")
    return meta


def unfinished_run(out_path: Path) -> dict[str, Any] | None:
    if not out_path.is_file():
        return None
    try:
        tr = read_metadata(out_path).get("training")
    except PteenetError:
        return None  # not ours, or unreadable: nothing to protect
    return tr if tr and not tr.get("complete", True) else None


# Fewer training images than this per class of the backbone and the exits learn little: a head is a
# linear classifier over hundreds to thousands of pooled features, and distilling K classes needs
# examples of each (the backbone's answers spread over up to K classes, labelled or not). 20 is the
# usual floor of few-shot linear probes; 800 images for 1,000 classes (0.8 a class)
# trained nothing, while CIFAR-10's thousands a class train exits that pay.
MIN_IMAGES_PER_CLASS = 20


def small_data_warning(n_train: int, num_classes: int, labelled: bool) -> str | None:
    """The warning for a training split too small for the exits to learn, with its numbers; None
    when it is large enough."""
    if num_classes < 2 or n_train >= MIN_IMAGES_PER_CLASS * num_classes:
        return None
    what = "training images" if labelled else "unlabelled training images"
    return (f"{n_train} {what} for a {num_classes}-class backbone ({n_train / num_classes:.1f} per class): the exits "
            f"learn little from fewer than about {MIN_IMAGES_PER_CLASS} per class "
            f"({MIN_IMAGES_PER_CLASS * num_classes} images); use more images if you can, keep augmentation on, "
            "and train more epochs from the feature cache (--cache-features --views 4)")


# Epochs from the cache cost only the heads, so a small set gets more of them: as many sample
# presentations as the measured default (10 epochs over CIFAR-10's 45,000 training images), between
# 10 and 100 epochs. Without the cache every epoch is a backbone pass, and the old fixed 20 stays.
# The learning curve (benchmarks/learning_curve.py) measures it against a fixed 10.
AUTO_PRESENTATIONS = 450_000
AUTO_EPOCHS_RANGE = (10, 100)
UNCACHED_EPOCHS = 20


def auto_epochs(n_train: int, cache_features: bool, views: int = 1) -> int:
    """The epochs a run without ``--epochs`` trains for, from its number of training images."""
    if not cache_features:
        return UNCACHED_EPOCHS
    low, high = AUTO_EPOCHS_RANGE
    return min(high, max(low, math.ceil(AUTO_PRESENTATIONS / max(1, n_train * views))))


def with_epochs(cfg: TrainConfig, n_train: int, resumed: dict[str, Any] | None = None) -> TrainConfig:
    """``cfg`` with its epochs resolved: as given; else, continuing the run recorded in ``resumed``
    (a ``meta["training"]``), that run's own number; else ``auto_epochs``."""
    if cfg.epochs is not None:
        return cfg
    recorded = recorded_configs(resumed)[0].epochs if resumed else None
    return dataclasses.replace(cfg, epochs=recorded if recorded is not None
                               else auto_epochs(n_train, cfg.cache_features, cfg.views))
