"""Too few training images for the exits to learn (issue 18): a warning with the numbers."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import StopAfter
from pteenet import AttachConfig, attach
from pteenet.data import DataConfig
from pteenet.progress import Sink
from pteenet.training.config import MIN_IMAGES_PER_CLASS, Interrupted, small_data_warning
from pteenet.training.run import TrainConfig, train_exits


class Warnings(Sink):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def warn(self, message: str) -> None:
        self.seen.append(message)


def test_the_rule_and_its_numbers() -> None:
    assert MIN_IMAGES_PER_CLASS == 20
    text = small_data_warning(800, 1000, labelled=False)  # issue 18's run
    assert text is not None and text.startswith("800 unlabelled training images for a 1000-class backbone (0.8 per class)")
    assert "20000 images" in text
    assert small_data_warning(199, 10, True) is not None and small_data_warning(200, 10, True) is None
    assert small_data_warning(5, 1, True) is None  # one class: nothing to tell apart


def test_training_on_few_images_warns_once(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=1, batch_size=32, device="cpu", ensemble=False)
    for limit, warned in ((64, True), (None, False)):  # 64 images; synthetic's 450 (45 a class)
        model = attach(AttachConfig(backbone="cifar-resnet20", input_size=(3, 16, 16), exits=2))
        sink = Warnings()
        train_exits(model, DataConfig(spec="synthetic", limit=limit, augment=False), cfg, sink)
        few = [w for w in sink.seen if "per class" in w]
        assert len(few) == warned, sink.seen
        if warned:
            assert few[0].startswith("64 training images for a 10-class backbone (6.4 per class)")


def test_auto_epochs_give_small_sets_more_passes_from_the_cache() -> None:
    from pteenet.training.config import auto_epochs
    assert auto_epochs(45_000, True) == 10  # the measured default on CIFAR-10's training split
    assert auto_epochs(20_000, True) == 23 and auto_epochs(10_000, True) == 45
    assert auto_epochs(1_000, True) == 100 and auto_epochs(1_000_000, True) == 10  # clamped
    assert auto_epochs(1_000, True, views=4) == 100 and auto_epochs(10_000, True, views=3) == 15
    assert auto_epochs(1_000, False) == 20  # without the cache an epoch is a backbone pass


def test_a_run_without_epochs_records_the_sized_number_and_a_resume_keeps_it(tmp_path: Path) -> None:
    from pteenet.runtime.checkpoint import load_checkpoint, save_checkpoint
    from pteenet.training.config import auto_epochs
    from pteenet.training.run import train_branches

    torch.manual_seed(0)
    model = attach(AttachConfig(backbone="cifar-resnet20", input_size=(3, 16, 16), exits=1))
    ckpt, out = tmp_path / "a.safetensors", tmp_path / "t.safetensors"
    save_checkpoint(ckpt, model)
    data = DataConfig(spec="synthetic", limit=40, augment=False, calibration_split=0.5)
    cfg = TrainConfig(batch_size=64, device="cpu", ensemble=False, cache_features=True)
    doc = train_branches(ckpt, out, data, cfg)
    assert len(doc["epochs"]) == auto_epochs(20, True) == 100  # 20 training images after the split
    assert load_checkpoint(out).model.meta["training"]["config"]["epochs"] == 100
    # A run started with --epochs 3, stopped after epoch 1 and resumed without --epochs trains 3 in
    # all, not the sized 100.
    out2 = tmp_path / "t3.safetensors"
    kw = dict(batch_size=64, device="cpu", ensemble=False, cache_features=True)
    with pytest.raises(Interrupted):
        train_branches(ckpt, out2, data, TrainConfig(epochs=3, **kw), StopAfter(1))
    done = train_branches(ckpt, out2, data, TrainConfig(resume=True, **kw))
    assert done["final"]["epochs_done"] == 3 and len(done["epochs"]) == 3
