"""DataLoaders that survive broken image files.

A file that cannot be decoded must not stop a run over a million images, and must not vanish either.
So a dataset item that fails to decode is returned as an ``Undecodable`` record instead of raising;
the collate function drops it from its batch and passes it along beside the batch; and the loader,
in the main process, hands it to ``SKIPPED``, which warns once per file (``ImageSkipped``, naming it)
and counts. Records travel with the batches because DataLoader workers are other processes: what a
worker noticed reaches the main process only that way. In strict mode (``--strict-images``) the
main process raises instead, naming the file.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.dataloader import default_collate

from ..errors import PteenetError


class ImageSkipped(UserWarning):
    """An image file that could not be decoded was left out of the run."""


@dataclass(frozen=True)
class Undecodable:
    """A dataset item whose file could not be decoded (in place of ``(image, label)``)."""

    path: str
    reason: str
    strict: bool = False


@dataclass
class _WithSkipped:
    batch: Any  # None when every item of the batch was undecodable
    skipped: list[Undecodable]


def collate_skipping(items: list[Any]) -> Any:
    """``default_collate`` of the items that decoded; the others ride along in a ``_WithSkipped``."""
    bad = [it for it in items if isinstance(it, Undecodable)]
    if not bad:
        return default_collate(items)
    good = [it for it in items if not isinstance(it, Undecodable)]
    return _WithSkipped(default_collate(good) if good else None, bad)


class SkippedImages:
    """The undecodable files met in this process so far: ``files``, path -> reason (each warned
    about once), and ``met``, every meeting in order (so that a second run in one process still
    records the files it met, ``since(mark())``)."""

    def __init__(self) -> None:
        self.files: dict[str, str] = {}
        self.met: list[str] = []

    def add(self, item: Undecodable) -> None:
        if item.strict:
            raise PteenetError(f"cannot decode image {item.path}: {item.reason}",
                               "remove or replace the file, or drop --strict-images to skip such files with a warning")
        self.met.append(item.path)
        if item.path not in self.files:
            self.files[item.path] = item.reason
            warnings.warn(f"skipped {item.path}: cannot decode it ({item.reason})", ImageSkipped, stacklevel=2)

    def mark(self) -> int:
        return len(self.met)

    def since(self, mark: int) -> list[str]:
        """The files met after ``mark()`` returned ``mark``, each once."""
        return list(dict.fromkeys(self.met[mark:]))

    def summary(self, files: list[str]) -> str:
        return (f"{len(files)} image file{'s' if len(files) != 1 else ''} could not be decoded and "
                f"{'were' if len(files) != 1 else 'was'} skipped (named above; --strict-images makes this an error)")


SKIPPED = SkippedImages()


class Loader:
    """A DataLoader whose batches leave out undecodable images (recorded in ``SKIPPED``, and in
    ``skipped``: those this loader met, path -> reason). Batches where nothing decoded are not
    yielded, so a pass may yield fewer than ``len()`` batches."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.skipped: dict[str, str] = {}

    @property
    def generator(self) -> torch.Generator:
        return self.loader.generator

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            if isinstance(batch, _WithSkipped):
                for item in batch.skipped:
                    SKIPPED.add(item)
                    self.skipped[item.path] = item.reason
                if batch.batch is None:
                    continue
                batch = batch.batch
            yield batch


def make_loader(ds: Dataset, batch_size: int, shuffle: bool, workers: int = 0, seed: int = 0,
                drop_last: bool = False, pin_memory: bool = False, batch_sampler: Any = None) -> Loader:
    """A loader whose shuffling (and worker seeds) come from a generator seeded with ``seed``.
    ``pin_memory`` for CUDA (page-locked batches copy asynchronously); ``batch_sampler`` replaces
    batching and shuffling (a rank's shard under several processes)."""
    batching: dict[str, Any] = ({"batch_sampler": batch_sampler} if batch_sampler is not None else
                                {"batch_size": batch_size, "shuffle": shuffle, "drop_last": drop_last})
    return Loader(DataLoader(ds, num_workers=workers, generator=torch.Generator().manual_seed(seed),
                             persistent_workers=workers > 0, pin_memory=pin_memory, collate_fn=collate_skipping,
                             **batching))
