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


@pytest.mark.parametrize("name", list(pol.POLICIES))
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
