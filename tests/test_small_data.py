"""Too few training images for the exits to learn (issue 18): a warning with the numbers."""
from __future__ import annotations

from pathlib import Path

import torch

from pteenet import AttachConfig, attach
from pteenet.data import DataConfig
from pteenet.progress import Sink
from pteenet.training.config import MIN_IMAGES_PER_CLASS, small_data_warning
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
