"""Where training batches come from.

Two batch sources give the trainer the same thing, (every exit's outputs, labels): ``ImageSource``
runs the frozen backbone on every batch (augmentation possible); ``FeatureCache`` runs it once per
image (or once per augmented view of each image), keeps what the branches read in float16, and then
serves every epoch from memory. For branches whose stem is parameter-free pooling (pool, pool-mlp)
the cache holds the pooled vectors, not the taps: for CIFAR-10 ResNet-56 with a head after each of
its 27 blocks that is 63 KiB an image instead of 504 KiB (float16), so several augmented views fit.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

from .. import distributed
from ..data import make_loader
from ..distributed import ALONE, Group, ShardBatches
from ..errors import PteenetError
from ..exits.chain import Ensemble, fit_ensemble
from ..progress import Sink
from ..runtime.model import AllExits, EarlyExitModel


class Autocast:
    """``with Autocast(device, amp)():`` -- mixed precision on CUDA when asked, else a no-op."""

    def __init__(self, device: torch.device, amp: bool) -> None:
        self.device = device
        self.dtype: torch.dtype | None = None
        if amp:
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def __call__(self) -> Any:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)



# -- batch sources: images through the backbone, or the cached taps --------------------------------
def _drop_last(n: int, batch_size: int, shuffle: bool) -> bool:
    # In training, a last batch of a few samples would give the branches' BatchNorm noisy statistics.
    return shuffle and n > batch_size


def _num_batches(n: int, batch_size: int, shuffle: bool) -> int:
    return n // batch_size if _drop_last(n, batch_size, shuffle) else -(-n // batch_size)


class ImageSource:
    """Batches of images; every batch runs the backbone (on the augmented input, if any). Under
    several processes (``group``) each rank gets its slice of every global batch."""

    def __init__(self, ds: Dataset, batch_size: int, workers: int, seed: int, shuffle: bool,
                 group: Group = ALONE) -> None:
        self.ds, self.batch_size, self.workers, self.seed, self.shuffle = ds, batch_size, workers, seed, shuffle
        self.size = len(ds)  # type: ignore[arg-type]
        self.group = group

    @property
    def rows(self) -> list[int]:
        """The rows this rank sees, in order, when unshuffled (evaluation)."""
        return distributed.eval_rows(self.size, self.batch_size, self.group)

    def __len__(self) -> int:
        return _num_batches(self.size, self.batch_size, self.shuffle)

    def batches(self, model: EarlyExitModel, device: torch.device, order: torch.Generator,
                autocast: Autocast) -> Iterator[tuple[AllExits, torch.Tensor]]:
        # A fresh loader per epoch whose generator continues ``order``: the shuffle and the worker
        # seeds then depend on nothing but the saved generator state, so resume is exact.
        drop = _drop_last(self.size, self.batch_size, self.shuffle)
        pin = device.type == "cuda"
        if self.group.active:
            sampler = ShardBatches(self.size, self.batch_size, self.shuffle, drop, None, self.group, even=self.shuffle)
            loader = make_loader(self.ds, self.batch_size, self.shuffle, self.workers, self.seed, drop, pin,
                                 batch_sampler=sampler)
            sampler.generator = loader.generator  # the permutation and the worker seeds share it, as alone
        else:
            loader = make_loader(self.ds, self.batch_size, self.shuffle, self.workers, self.seed, drop, pin)
        loader.generator.set_state(order.get_state())
        for x, y in loader:
            with autocast():
                out = model.forward_all(x.to(device, non_blocking=True))
            yield out, y
        order.set_state(loader.generator.get_state())


@dataclass
class FeatureCache:
    """Backbone passes over a split: what each branch reads (float16 halves the memory), logits,
    labels, on the CPU. ``stems``: the rows are the branches' stem outputs, not the taps."""

    taps: list[torch.Tensor]  # E x [N, ...] float16
    final: torch.Tensor  # [N, K] float32
    labels: torch.Tensor  # [N] int64
    batch_size: int
    shuffle: bool
    stems: bool = False
    skipped: dict[str, str] = field(default_factory=dict)  # image files left out as undecodable: path -> reason
    rows: list[int] | None = None  # under several processes: the split's rows this rank's cache holds

    def __len__(self) -> int:
        return _num_batches(len(self.labels), self.batch_size, self.shuffle)

    def batches(self, model: EarlyExitModel, device: torch.device, order: torch.Generator,
                autocast: Autocast) -> Iterator[tuple[AllExits, torch.Tensor]]:
        n = len(self.labels)
        idx = torch.randperm(n, generator=order) if self.shuffle else torch.arange(n)
        for i in range(len(self)):
            rows = idx[i * self.batch_size:(i + 1) * self.batch_size]
            taps = [t.index_select(0, rows).to(device, non_blocking=True).float() for t in self.taps]
            with autocast():
                out = model.branch_outputs(taps, self.final.index_select(0, rows).to(device), self.stems)
            yield out, self.labels[rows]


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def _stem_shapes(model: EarlyExitModel) -> list[tuple[int, ...]]:
    """What each branch's stem makes of one sample's tap (a dry run on zeros)."""
    with torch.no_grad():
        return [tuple(b.stem(torch.zeros(1, *s, device=next(model.parameters()).device)).shape[1:])
                for b, s in zip(model.branches, model.tap_shapes)]


# Where a cache's rows go: (tap shapes, rows, classes) -> (taps, final, labels), preallocated.
Allocate = Callable[[list[tuple[int, ...]], int, int], tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]]


def _in_memory(shapes: list[tuple[int, ...]], n: int, k: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    return ([torch.empty(n, *s, dtype=torch.float16) for s in shapes], torch.empty(n, k, dtype=torch.float32),
            torch.empty(n, dtype=torch.int64))


def build_feature_cache(model: EarlyExitModel, ds: Dataset, batch_size: int, workers: int, seed: int,
                        device: torch.device, autocast: Autocast, sink: Sink, shuffle: bool,
                        name: str, views: int = 1, allocate: Allocate | None = None) -> FeatureCache:
    """``views`` passes over ``ds`` (each one a fresh random augmentation when ``ds`` augments).
    ``allocate``: where the rows go (``feature_store``: a memory-mapped file); default memory."""
    stems = model.branch_config.cacheable_stem
    shapes = _stem_shapes(model) if stems else model.tap_shapes
    n = len(ds) * views  # type: ignore[arg-type]
    need = n * sum(2 * math.prod(s) for s in shapes)
    free = _available_memory()
    if allocate is None and free is not None and need > 0.8 * free:
        raise PteenetError(f"the {name} feature cache needs {need / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB is free",
                           "use fewer or later exits, --limit, --cache-dir (on disk), or train without --cache-features")
    # Preallocated: concatenating per-batch pieces would need twice the memory at the end.
    taps, final, labels = (allocate or _in_memory)(list(shapes), n, model.info.num_classes)
    loader = make_loader(ds, batch_size, False, workers, seed)
    description = f"caching {name} features, {need / 2**30:.2f} GiB" + (f" ({views} views)" if views > 1 else "")
    i = 0
    with sink.task(description, len(loader) * views) as task:
        for x, y in (batch for _ in range(views) for batch in loader):
            with autocast(), torch.no_grad():
                tb, fb = model.backbone_taps(x.to(device, non_blocking=True))
                if stems:
                    tb = [b.stem(t) for b, t in zip(model.branches, tb)]
            for k, (dst, t) in enumerate(zip(taps, tb)):
                dst[i:i + len(y)] = t.to("cpu", torch.float16)
                if not bool(torch.isfinite(dst[i:i + len(y)]).all()):
                    raise PteenetError(f"exit {k}'s features overflow float16 (|x| > 65504) in the feature cache",
                                       "train without --cache-features")
            final[i:i + len(y)], labels[i:i + len(y)] = fb.float().cpu(), y
            i += len(y)
            task.advance()
    if i < n:  # image files that could not be decoded were skipped (data.loader)
        taps, final, labels = [t[:i] for t in taps], final[:i], labels[:i]
    return FeatureCache(taps, final, labels, batch_size, shuffle, stems, dict(loader.skipped))


def fit_ensemble_on(model: EarlyExitModel, source: ImageSource | FeatureCache, device: torch.device,
                    autocast: Autocast, use_labels: bool, sink: Sink, group: Group = ALONE) -> Ensemble:
    """Every head's logits on ``source`` (data the heads did not train on), then ``fit_ensemble``
    against the backbone's argmax, or the labels with ``use_labels``. Under several processes the
    logits of every rank's shard are gathered on rank 0, which fits; every rank gets its ensemble."""
    model.eval()
    heads: list[list[torch.Tensor]] = [[] for _ in range(model.num_exits)]
    finals, labels = [], []
    with sink.task("fitting the exit ensemble", len(source)) as task, torch.no_grad():
        for out, y in source.batches(model, device, torch.Generator(), autocast):
            for k, h in enumerate(out.heads):
                heads[k].append(h.float().cpu())
            finals.append(out.final_logits.float().cpu())
            labels.append(y)
            task.advance()
    cat = ([torch.cat(h) for h in heads], torch.cat(finals), torch.cat(labels))
    if group.active:
        cat = distributed.gather_rows(source.rows or [], cat, False, group, to_main_only=True)
    ens = None
    if cat is not None:
        head_logits, final, y = cat
        ens = fit_ensemble(head_logits, y.long() if use_labels else final.argmax(1))
    return distributed.from_main(ens, group)
