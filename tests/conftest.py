"""Shared fixtures: tiny models only, CPU, no downloads."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import conv2_model
from pteenet import AttachConfig, attach, save_checkpoint
from pteenet.data import DataConfig, load_splits, make_loader
from pteenet.runtime import timing


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tests are tiny; one thread avoids oversubscribing CI's 2 cores


@pytest.fixture(autouse=True)
def _untimed_tail(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep measures its chosen model's no-exit tail on the clock (``sweep/choice.py``); here
    that tail measures as the backbone, so that no test's choice depends on this machine's timing.
    tests/test_tail_check.py replaces it, and times the real function once."""
    monkeypatch.setattr(timing, "measure_tail", lambda model, x, active, **kw: {"ratio": 1.0})


@pytest.fixture
def tiny_model():
    """cifar-resnet20 at 16x16 with 3 exits and random weights: the workhorse of the tests."""
    return attach(AttachConfig(backbone="cifar-resnet20", input_size=(3, 16, 16), exits=3, placement="linear"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An attached, untrained cifar-resnet20 at 16x16 with 2 exits, saved once: read it, never write it."""
    torch.manual_seed(0)  # session fixtures run before the per-test seed: the branches' init must not depend on test order
    path = tmp_path_factory.mktemp("tiny_checkpoint") / "attached.safetensors"
    save_checkpoint(path, attach(AttachConfig(backbone="cifar-resnet20", input_size=(3, 16, 16), exits=2)))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``conv2_model``'s branches fitted for a few steps (random branches make flat, degenerate
    curves), with the training and data records that `pteenet train` leaves: read it, never write it."""
    torch.set_num_threads(1)
    model = conv2_model()
    splits = load_splits(DataConfig(spec="synthetic", calibration_split=0.2, seed=1, augment=False),
                         model.info.preprocess, model.info.num_classes)
    opt = torch.optim.Adam(model.branches.parameters(), 1e-2)
    model.train()
    for _, (x, y) in zip(range(30), make_loader(splits.train, 64, True)):
        out = model.forward_all(x)
        loss = sum(F.cross_entropy(lg, y) + F.binary_cross_entropy_with_logits(c, (lg.argmax(1) == y).float())
                   for lg, c in zip(out.exit_logits, out.exit_conf))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.meta.update(training={"complete": True, "epochs_done": 1}, data=splits.split_info)
    path = tmp_path_factory.mktemp("ckpt") / "trained.safetensors"
    save_checkpoint(path, model)
    return path
