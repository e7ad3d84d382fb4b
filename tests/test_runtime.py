"""The runtime's real early exit (``EarlyExitModel.predict``) against the sweep's cached simulation:
same exit, same prediction, sample by sample, for every policy and batch sizes 1 and > 1.

Other test files import ``make_model`` / ``make_images`` from here (pytest puts tests/ on sys.path).
"""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import pteenet
from pteenet.exits import policies as pol
from pteenet.sweep import ExitCache, ExitCacheBuilder, evaluate

TIE_GAP = 1e-4  # thresholds stay this far from every score: batch shape may move a score by an ulp


def assert_logits_close(got: torch.Tensor, want: torch.Tensor, rel: float = 3e-4) -> None:
    """Equal up to float32 noise: 3e-4 relative to the largest logit. The random backbone's logits
    reach ~30, and a different batch shape may sum them in a different order (oneDNN picks kernels
    by shape), which moves small logits by more than 1e-5 in absolute terms; the heads' BatchNorm
    over pooled features of a random backbone (some nearly constant) amplifies that noise further."""
    torch.testing.assert_close(got, want, atol=rel * max(1.0, float(want.abs().max())), rtol=0)


def make_model(seed: int = 0) -> pteenet.EarlyExitModel:
    """The tiny test model: cifar-resnet20 at 16x16 with 3 exits whose branches are randomised so
    that the exits really differ (fresh branches all output about the same near-uniform logits)."""
    # Seeded here: module-scoped fixtures run before conftest's per-test seed, so the global RNG
    # (which initialises the heads) would otherwise depend on which tests ran first.
    torch.manual_seed(seed)
    model = pteenet.attach(pteenet.AttachConfig(backbone="cifar-resnet20", input_size=(3, 16, 16), exits=3))
    perturb(model, seed)
    return model


def perturb(model: pteenet.EarlyExitModel, seed: int) -> None:
    """Calibrate the branches' BN statistics on random images, then give each head random weights
    scaled to its features, so every policy's scores spread over (0, 1) and differ per exit."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, *model.info.preprocess.input_size, generator=gen)
    bns = [m for m in model.branches.modules() if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d))]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: one pass gives the batch's statistics
    pooled: dict[int, torch.Tensor] = {}
    # What the heads read, whatever the branch type: the classifier's input.
    hooks = [b.classifier.register_forward_pre_hook(lambda mod, args, k=k: pooled.__setitem__(k, args[0]))
             for k, b in enumerate(model.branches)]
    model.train()
    with torch.no_grad():
        model.forward_all(x)
    model.eval()
    for h in hooks:
        h.remove()
    for m in bns:
        m.momentum = 0.1
        # A random backbone leaves some pooled features constant; BatchNorm would then divide by
        # sqrt(eps) and blow float noise up 300-fold. Floor the variance as training data would.
        m.running_var.clamp_(min=1e-2 * float(m.running_var.mean()))
    with torch.no_grad():
        for k, b in enumerate(model.branches):
            z = pooled[k]
            mu, sd = z.mean(0), z.std(0) + 1e-3
            for lin, spread in ((b.classifier, 1.0 + k), (b.confidence, 2.0)):
                w = torch.randn(lin.weight.shape, generator=gen) * spread / (sd * z.shape[1] ** 0.5)
                lin.weight.copy_(w)
                lin.bias.copy_(-(w @ mu))


def make_images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def cache_of(model: pteenet.EarlyExitModel, x: torch.Tensor) -> ExitCache:
    builder = ExitCacheBuilder()
    with torch.no_grad():
        a = model.forward_all(x)
    builder.add(a.exit_logits, a.exit_conf, a.final_logits)
    assert model.cost is not None
    return builder.build(model.cost.costs(), model.cost.costs_paper())


def simulated_exits(cache: ExitCache, policy: str, thresholds: list[float]) -> np.ndarray:
    """First exit whose score passes (policies.passes), else E: what the sweep assumes."""
    s = cache.scores[policy]
    passed = np.stack([pol.passes(policy, s[k], float(t)) for k, t in enumerate(thresholds)])
    return np.where(passed.any(0), passed.argmax(0), cache.num_exits)


def random_thresholds(cache: ExitCache, policy: str, rng: np.random.Generator) -> list[float]:
    """Per-exit thresholds inside each exit's score range, at least TIE_GAP from every score."""
    out = []
    for k in range(cache.num_exits):
        s = np.sort(cache.scores[policy][k].astype(np.float64))
        gaps = np.flatnonzero(np.diff(s) > 2 * TIE_GAP + 1e-6)
        assert gaps.size, "scores too crowded to place a threshold between them"
        i = rng.choice(gaps)
        out.append(float(rng.uniform(s[i] + TIE_GAP, s[i + 1] - TIE_GAP)))
    return out


@pytest.fixture(scope="module")
def model() -> pteenet.EarlyExitModel:
    return make_model()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return make_images(48)


@pytest.mark.parametrize("policy", pol.POLICIES)
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
    for policy in pol.POLICIES:
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
