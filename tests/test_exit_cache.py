"""The one exit-cache build step (``ExitCacheBuilder.add_outputs`` / ``build_for``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pteenet.errors import PteenetError
from pteenet.sweep import ExitCacheBuilder, build_cache


def test_build_from_model_outputs(tiny_model) -> None:
    tiny_model.eval()
    x, y = torch.randn(10, 3, 16, 16), torch.arange(10) % 10
    builder = ExitCacheBuilder()
    with torch.no_grad():
        for rows in (slice(0, 4), slice(4, 8), slice(8, 10)):  # build_cache's batches below
            builder.add_outputs(tiny_model.forward_all(x[rows]), y[rows])
    cache = builder.build_for(tiny_model)
    assert (cache.num_exits, cache.num_samples) == (tiny_model.num_exits, 10)
    assert np.array_equal(cache.costs, tiny_model.cost.costs())
    assert np.array_equal(cache.costs_paper, tiny_model.cost.costs_paper())
    # The sweep's own pass over a dataset builds the same cache.
    same = build_cache(tiny_model, torch.utils.data.TensorDataset(x, y), batch_size=4)
    assert np.array_equal(same.preds, cache.preds) and np.array_equal(same.labels, cache.labels)
    assert all(np.array_equal(same.scores[p], cache.scores[p]) for p in cache.scores)


def test_build_for_needs_a_cost_table(tiny_model) -> None:
    builder = ExitCacheBuilder()
    with torch.no_grad():
        builder.add_outputs(tiny_model.forward_all(torch.randn(2, 3, 16, 16)))
    tiny_model.cost = None
    with pytest.raises(PteenetError, match="no cost table"):
        builder.build_for(tiny_model)
