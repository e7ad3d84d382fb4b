"""The policy registry: each entry's comparison, never-exit threshold and score."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pteenet.exits import policies as pol


def test_comparisons_are_the_documented_ones() -> None:
    # h > T, max-softmax >= T, normalised entropy <= T: equality leaves for the last two only.
    assert [bool(pol.passes("confidence", s, 0.5)) for s in (0.4, 0.5, 0.6)] == [False, False, True]
    assert [bool(pol.passes("max-softmax", s, 0.5)) for s in (0.4, 0.5, 0.6)] == [False, True, True]
    assert [bool(pol.passes("entropy", s, 0.5)) for s in (0.4, 0.5, 0.6)] == [True, True, False]
    with pytest.raises(ValueError, match="unknown policy"):
        pol.passes("nope", 0.5, 0.5)


@pytest.mark.parametrize("name", pol.SCORED)
def test_registry_entry(name: str) -> None:
    p = pol.POLICIES[name]
    assert p.name == name and p.rule
    g = torch.Generator().manual_seed(0)
    logits, conf = 8 * torch.randn(64, 10, generator=g), 30 * torch.randn(64, generator=g)
    s = pol.score(name, logits, conf)
    assert s.dtype == torch.float32 and s.shape == (64,)
    assert torch.equal(s, pol.scores(logits, conf)[name])  # the cache's score is the runtime's
    edge = torch.tensor([0.0, 1.0, *s.tolist()])
    assert not pol.passes(name, edge, pol.never_exit_threshold(name)).any()
    # The numpy path (the sweep) decides exactly as the torch path (the runtime).
    ts = np.float32(s[7].item())
    assert np.array_equal(pol.passes(name, s.numpy(), float(ts)), pol.passes(name, s, float(ts)).numpy())


def _logits(k: int, n: int, scale: float, offset: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return offset + scale * torch.randn(n, k, generator=g), offset + scale * torch.randn(n, generator=g)


@pytest.mark.parametrize("name", pol.SCORED)
@pytest.mark.parametrize("k,scale,offset", [(2, 0.01, 0.0), (10, 1.0, 0.0), (10, 8.0, 0.0), (10, 1.0, 1e3),
                                            (64, 3.0, 0.0), (pol.HOST_MAX_CLASSES + 36, 2.0, 0.0)])
def test_the_batch_1_decision_is_the_tensor_scores(name: str, k: int, scale: float, offset: float) -> None:
    # ``leaves_one`` decides from Python floats where it can: it must agree with the tensor score
    # everywhere, above all at thresholds equal to the float32 score and one float32 step either side.
    p = pol.POLICIES[name]
    logits, conf = _logits(k, 64, scale, offset, seed=k)
    s = p.score(logits, conf)
    for i in range(len(s)):
        z, c = logits[i:i + 1], conf[i:i + 1]
        s32 = np.float32(s[i].item())
        ts = [float(s32), float(np.nextafter(s32, np.float32(2))), float(np.nextafter(s32, np.float32(-1))),
              float(s32) + 1e-3, float(s32) - 1e-3, 0.5, p.never_exit]
        for t in ts:
            assert p.leaves_one(z, c, t) == bool(p.passes(p.score(z, c), t)), (i, t)


def test_the_batch_1_decision_leaves_odd_logits_to_the_tensor_ops() -> None:
    for name, p in ((n, pol.POLICIES[n]) for n in pol.SCORED):
        for row in ([float("nan")] * 3, [float("inf"), 0.0, 1.0], [-float("inf"), 0.0, 1.0], [3e38, -3e38, 0.0]):
            z, c = torch.tensor([row]), torch.tensor([row[0]])
            for t in (0.0, 0.5, 1.0):
                assert p.leaves_one(z, c, t) == bool(p.passes(p.score(z, c), t)), (name, row, t)


def test_the_python_score_is_the_tensor_score_well_within_the_margin() -> None:
    # What the margin rests on: measured, the float64 score and the float32 tensor score differ by
    # at most 3.3e-7 (the margin is 8 times the rounding bound, and far more than that).
    worst = 0.0
    for k, scale, offset in [(2, 1.0, 0.0), (10, 0.01, 0.0), (10, 10.0, 0.0), (10, 1.0, 1e5), (64, 1.0, 100.0)]:
        logits, conf = _logits(k, 200, scale, offset, seed=7)
        for p in (pol.POLICIES[n] for n in pol.SCORED):
            s = p.score(logits, conf)
            assert p.host is not None
            for i in range(len(s)):
                z, c = logits[i].tolist(), float(conf[i])
                score, size = p.host(z, c)
                diff = abs(score - s[i].item())
                assert diff < 4e-7 and diff < pol._margin(k, size) / 8, (p.name, k, scale, offset, i, diff)
                worst = max(worst, diff)
    assert worst > 0.0  # the two really are computed apart


def test_the_batch_1_decision_takes_no_tensor_ops_clear_of_the_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    # The point of ``leaves_one``: the tensor score is not computed at all where the float64 score
    # is clear of the threshold, in the policy and in the batch-1 runtime that calls it.
    import dataclasses

    import pteenet

    def no_tensor_score(logits: torch.Tensor, conf: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the tensor score ran")

    for name in pol.POLICIES:
        monkeypatch.setitem(pol.POLICIES, name, dataclasses.replace(pol.POLICIES[name], score=no_tensor_score))
    logits, conf = _logits(10, 8, 1.0, 0.0, seed=3)
    p = pol.POLICIES["entropy"]
    assert [p.leaves_one(logits[i:i + 1], conf[i:i + 1], 2.0) for i in range(8)] == [True] * 8
    assert not any(p.leaves_one(logits[i:i + 1], conf[i:i + 1], -1.0) for i in range(8))
    model = pteenet.attach(pteenet.AttachConfig(backbone="cifar-resnet20", input_size=(3, 16, 16), exits=3,
                                                branch="pool-mlp")).eval()
    x = torch.randn(1, 3, 16, 16)
    assert int(model.predict(x, [-1.0] * 3, "entropy").exit_index) == 3
    assert int(model.predict(x, [2.0] * 3, "entropy").exit_index) == 0
