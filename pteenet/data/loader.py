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
    """The undecodable files met in this process so far: path -> reason."""

    def __init__(self) -> None:
        self.files: dict[str, str] = {}

    def add(self, item: Undecodable) -> None:
        if item.strict:
            raise PteenetError(f"cannot decode image {item.path}: {item.reason}",
                               "remove or replace the file, or drop --strict-images to skip such files with a warning")
        if item.path not in self.files:
            self.files[item.path] = item.reason
            warnings.warn(f"skipped {item.path}: cannot decode it ({item.reason})", ImageSkipped, stacklevel=2)

    def since(self, mark: int) -> list[str]:
        """The files added after ``len(self.files)`` was ``mark``."""
        return list(self.files)[mark:]

    def summary(self, files: list[str]) -> str:
        return (f"{len(files)} image file{'s' if len(files) != 1 else ''} could not be decoded and "
                f"{'were' if len(files) != 1 else 'was'} skipped (named above; --strict-images makes this an error)")


SKIPPED = SkippedImages()


class Loader:
    """A DataLoader whose batches leave out undecodable images (recorded in ``SKIPPED``). Batches
    where nothing decoded are not yielded, so a pass may yield fewer than ``len()`` batches."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

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
                if batch.batch is None:
                    continue
                batch = batch.batch
            yield batch


def make_loader(ds: Dataset, batch_size: int, shuffle: bool, workers: int = 0, seed: int = 0,
                drop_last: bool = False) -> Loader:
    """A loader whose shuffling (and worker seeds) come from a generator seeded with ``seed``."""
    return Loader(DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers, drop_last=drop_last,
                             generator=torch.Generator().manual_seed(seed), persistent_workers=workers > 0,
                             collate_fn=collate_skipping))
