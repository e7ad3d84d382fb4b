"""The runtime's real early exit (``EarlyExitModel.predict``) against the sweep's cached simulation:
same exit, same prediction, sample by sample, for every policy and batch sizes 1 and > 1.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import pteenet
from helpers import assert_logits_close, cache_of, make_images, make_model, perturb, random_thresholds, simulated_exits
from pteenet.exits import policies as pol
from pteenet.sweep import evaluate


@pytest.fixture(scope="module")
def model() -> pteenet.EarlyExitModel:
    return make_model()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return make_images(48)


@pytest.mark.parametrize("policy", pol.SCORED)  # stateful policies: test_patience.py
def test_runtime_matches_sweep_simulation(model: pteenet.EarlyExitModel, images: torch.Tensor, policy: str) -> None:
    cache = cache_of(model, images)
    with torch.no_grad():
        a = model.forward_all(images)
    per_exit = torch.stack(a.exit_logits + [a.final_logits])  # [E+1, N, K]
    rng = np.random.default_rng(zlib.crc32(policy.encode()))  # hash() varies between runs
    seen_exits: set[int] = set()
    for _ in range(4):
        ts = random_thresholds(cache, policy, rng)
        want = simulated_exits(cache, policy, ts)
        seen_exits.update(want.tolist())
        point = evaluate(cache, policy, ts)
        for bs in (1, 7, len(images)):
            got = [model.predict(images[i:i + bs], ts, policy) for i in range(0, len(images), bs)]
            exit_index = torch.cat([g.exit_index for g in got]).numpy()
            np.testing.assert_array_equal(exit_index, want, err_msg=f"{policy} T={ts} batch {bs}")
            logits = torch.cat([g.logits for g in got])
            assert_logits_close(logits, per_exit[want, np.arange(len(want))])
            assert torch.equal(torch.cat([g.pred for g in got]), logits.argmax(1))
            frac = np.bincount(exit_index, minlength=model.num_exits + 1) / len(images)
            np.testing.assert_allclose(frac, point.exit_fractions)
    assert len(seen_exits) >= 3, "the thresholds should send samples to several exits"


@pytest.mark.parametrize("policy", pol.POLICIES)
def test_never_exit_equals_backbone(model: pteenet.EarlyExitModel, images: torch.Tensor, policy: str) -> None:
    with torch.no_grad():
        want = model.backbone(images)
    never = pol.never_exit_threshold(policy)
    for bs in (1, len(images)):
        p = model.predict(images[:bs], never, policy)
        assert_logits_close(p.logits, want[:bs])
        assert (p.exit_index == model.num_exits).all()


def test_outputs_in_input_order(model: pteenet.EarlyExitModel, images: torch.Tensor) -> None:
    """Rows that leave at different exits still come back where they went in."""
    cache = cache_of(model, images)
    ts = random_thresholds(cache, "max-softmax", np.random.default_rng(3))
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    whole = model.predict(images, ts, "max-softmax")
    shuffled = model.predict(images[perm], ts, "max-softmax")
    assert len(set(whole.exit_index.tolist())) > 1
    assert torch.equal(shuffled.exit_index, whole.exit_index[perm])
    assert_logits_close(shuffled.logits, whole.logits[perm])
    single = torch.cat([model.predict(images[i:i + 1], ts, "max-softmax").logits for i in range(len(images))])
    assert_logits_close(single, whole.logits)


def test_threshold_changes_at_run_time(model: pteenet.EarlyExitModel, images: torch.Tensor) -> None:
    old = (model.policy, list(model.thresholds))
    try:
        model.set_thresholds(0.0, "max-softmax")  # every score >= 0: all leave at exit 0
        assert (model.predict(images).exit_index == 0).all()
        assert (model.predict(images[:1]).exit_index == 0).all()
        model.set_thresholds(pol.never_exit_threshold("max-softmax"))
        assert (model.predict(images).exit_index == model.num_exits).all()
        assert_logits_close(model(images), model.backbone(images))
        # An explicit threshold overrides the stored one for that call only.
        assert (model.predict(images, 0.0).exit_index == 0).all()
        assert model.thresholds == [1.5] * model.num_exits
    finally:
        model.set_thresholds(old[1], old[0])


def test_save_load_round_trip(model: pteenet.EarlyExitModel, images: torch.Tensor, tmp_path: Path) -> None:
    cache = cache_of(model, images)
    ts = random_thresholds(cache, "confidence", np.random.default_rng(5))
    old = (model.policy, list(model.thresholds))
    try:
        model.set_thresholds(ts, "confidence")
        pteenet.save_checkpoint(tmp_path / "m.safetensors", model)
        loaded = pteenet.load(str(tmp_path / "m.safetensors"))
    finally:
        model.set_thresholds(old[1], old[0])
    assert loaded.policy == "confidence" and loaded.thresholds == pytest.approx(ts)
    assert not loaded.training
    a, b = model.predict(images, ts, "confidence"), loaded.predict(images)
    assert torch.equal(a.exit_index, b.exit_index)
    assert torch.equal(a.logits, b.logits)


BATCH_DEPENDENT = '''
import torch
from torch import nn

def block(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

class Net(nn.Module):
    """Reads the batch size at the start and uses it at the end: a carried int, not a tensor."""
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(block(3, 8, 1), block(8, 8, 2), block(8, 16, 2), block(16, 16, 1))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        b = x.size(0)
        y = self.blocks(x).mean((2, 3))
        return self.fc(y.reshape(b, -1))

def make():
    torch.manual_seed(0)
    return Net()
'''


def test_batch_dependent_carried_value(tmp_path: Path) -> None:
    """The batch size travels between stages as an int: the batch cannot shrink, rows ride along."""
    (tmp_path / "net.py").write_text(BATCH_DEPENDENT)
    model = pteenet.attach(pteenet.AttachConfig(backbone=f"{tmp_path / 'net.py'}:make", input_size=(3, 16, 16),
                                                at=["blocks.0", "blocks.1", "blocks.2"]))
    assert not model.stages.shrinkable
    perturb(model, 1)
    x = make_images(24, seed=4)
    cache = cache_of(model, x)
    for policy in pol.SCORED:
        ts = random_thresholds(cache, policy, np.random.default_rng(7))
        want = simulated_exits(cache, policy, ts)
        for bs in (1, len(x)):
            got = torch.cat([model.predict(x[i:i + bs], ts, policy).exit_index for i in range(0, len(x), bs)])
            np.testing.assert_array_equal(got.numpy(), want)
    never = model.predict(x, pol.never_exit_threshold("confidence"), "confidence")
    assert_logits_close(never.logits, model.backbone(x))


def test_bad_thresholds_are_clear_errors(model: pteenet.EarlyExitModel, images: torch.Tensor) -> None:
    with pytest.raises(pteenet.PteenetError, match="2 thresholds given for 3 exits"):
        model.predict(images, [0.5, 0.5])
    with pytest.raises(pteenet.PteenetError, match="unknown policy 'margin'"):
        model.predict(images[:1], 0.5, "margin")
    # numpy scalars are thresholds too (np.float32 is not a Python float)
    assert torch.equal(model.predict(images, np.float32(0.0), "max-softmax").exit_index,
                       model.predict(images, 0.0, "max-softmax").exit_index)
