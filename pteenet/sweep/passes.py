"""One pass of a model over a split into an exit cache (``build_cache``): every exit on every image
once, in one process or sharded over several (``sharded_cache``). The sweep (``run.py``) reads the
split through these; everything after the pass is numpy over the cache."""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from .. import distributed
from ..data import make_loader
from ..distributed import Group
from ..errors import PteenetError
from ..evaluation.cache import ExitCache, ExitCacheBuilder, gather_exit_cache
from ..progress import SILENT, Sink
from ..runtime.model import EarlyExitModel


def _unpack(batch: Any) -> tuple[torch.Tensor, Any]:
    """(images, labels) from a batch of ``(image, label)`` items, or (images, None) from bare images."""
    if isinstance(batch, (list, tuple)):
        return batch[0], batch[1] if len(batch) > 1 else None
    return batch, None


def build_cache(model: EarlyExitModel, dataset: Dataset, batch_size: int = 256,
                device: str | torch.device = "cpu", workers: int = 0, sink: Sink = SILENT,
                description: str = "exits", logits: bool = False) -> ExitCache:
    """Run every exit on every sample of ``dataset`` once (``forward_all``) and cache the results.
    With ``logits`` the cache keeps each exit's logits too (policy eenet fits on them).

    Items are ``(image, label)`` or a bare image (then the cache has no labels and the sweep scores
    agreement with the backbone). ``model`` must already be on ``device``.
    """
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise PteenetError(f"the {description} split is empty", "check the data and its split")
    if model.cost is None:
        raise PteenetError("the checkpoint has no cost table", "attach the branches with `pteenet attach`")
    return _run_exits(model, dataset, batch_size, device, workers, sink, description, logits).build_for(model)


def _run_exits(model: EarlyExitModel, dataset: Dataset, batch_size: int, device: str | torch.device, workers: int,
               sink: Sink, description: str, logits: bool = False) -> ExitCacheBuilder:
    model.eval()
    loader = make_loader(dataset, batch_size, shuffle=False, workers=workers)
    builder, device = ExitCacheBuilder(logits), torch.device(device)
    with sink.task(f"{description} ({len(dataset)} images)", len(loader)) as task, torch.no_grad():  # type: ignore[arg-type]
        for batch in loader:
            x, y = _unpack(batch)
            out = model.forward_all(x.to(device, non_blocking=True))
            builder.add_outputs(out, None if y is None else torch.as_tensor(y))
            task.advance()
    return builder


def sharded_cache(model: EarlyExitModel, dataset: Dataset, batch_size: int, device: torch.device, workers: int,
                  sink: Sink, description: str, group: Group) -> ExitCache:
    """Under several processes: each rank runs its shard of ``dataset``; every rank gets the
    whole split's cache (it is small), so all of them take the same decisions after it."""
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise PteenetError(f"the {description} split is empty", "check the data and its split")
    rows = distributed.eval_rows(len(dataset), batch_size, group)  # type: ignore[arg-type]
    builder = _run_exits(model, Subset(dataset, rows), batch_size, device, workers, sink,
                         f"{description}, rank {group.rank}'s shard")
    cache = gather_exit_cache(builder, rows, model, group, to_main_only=False)
    assert cache is not None
    return cache
