"""Shared fixtures: tiny models only, CPU, no downloads."""
from __future__ import annotations

import pytest
import torch

from pteenet import AttachConfig, attach


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tests are tiny; one thread avoids oversubscribing CI's 2 cores


@pytest.fixture
def tiny_model():
    """cifar-resnet20 at 16x16 with 3 exits and random weights: the workhorse of the tests."""
    return attach(AttachConfig(backbone="cifar-resnet20", input_size=(3, 16, 16), exits=3, placement="linear"))
