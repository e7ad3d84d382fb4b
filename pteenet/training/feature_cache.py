"""Feature caches on disk: a ``FeatureCache`` saved once and reused by later runs.

A backbone pass over the training set is the one expensive step of branch training; runs that
differ only in what is trained on the cached rows (head width, loss, targets, epochs, ensemble)
read the same rows. A saved cache is found by a key that hashes everything the rows depend on: the
backbone's weights, the exit points, what the branch stems compute, the data split and its record,
the number of augmented views and the seed. Any change gives another key, so a stale cache is never
read. Files are safetensors (no pickle), written atomically. The rows go straight into the file as
the backbone pass makes them, and a saved cache is memory-mapped, not read: with ``--cache-dir`` a
cache need not fit in memory (pages are read as batches need them). Under several processes each
rank caches its own shard, in a file of its own.
"""
from __future__ import annotations

import hashlib
import json
import math
import mmap
import shutil
import struct
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import Dataset

from ..atomic import atomic_write
from ..data import SKIPPED, Undecodable, files_fingerprint, image_files_of
from ..errors import PteenetError
from ..progress import Sink
from ..runtime.model import EarlyExitModel
from .batches import Allocate, Autocast, FeatureCache, build_feature_cache


def cache_key(model: EarlyExitModel, split_info: dict[str, Any], split: str, views: int, augment: bool,
              seed: int, shard: tuple[int, int] | None = None, files: str | None = None) -> str:
    """Hash of everything a cached split's rows depend on (``shard``: rank and world size, when
    each of several processes caches its own part; ``files``: ``data.files_fingerprint`` of the split)."""
    bc = model.branch_config
    stem = {"kind": bc.kind, "grid": bc.grid} if bc.cacheable_stem else "taps"
    doc = {"backbone": model.backbone_sha256, "preprocess": model.info.to_dict().get("preprocess"),
           "exits": [p.node for p in model.exit_points], "stem": stem, "data": split_info, "split": split,
           "files": files, "views": views, "augment": augment and split == "train", "seed": seed, "format": 3}
    if shard is not None:
        doc["shard"] = list(shard)
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _path(folder: str | Path, key: str) -> Path:
    return Path(folder).expanduser() / f"features-{key}.safetensors"


def _record_path(path: Path) -> Path:
    return path.with_suffix(".json")


_DTYPES = {"F16": torch.float16, "F32": torch.float32, "I64": torch.int64}


def _layout(shapes: list[tuple[int, ...]], n: int, k: int) -> tuple[bytes, dict[str, Any], int]:
    """A safetensors header for a cache of ``n`` rows, and the data section's size. Labels (8-byte),
    then logits, then the float16 taps: every tensor starts aligned to its element size."""
    entries = [("labels", "I64", (n,)), ("final", "F32", (n, k))]
    entries += [(f"tap.{i}", "F16", (n, *s)) for i, s in enumerate(shapes)]
    header, offset = {}, 0
    for name, code, shape in entries:
        size = math.prod(shape) * _DTYPES[code].itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw, header, offset


def _views(mm: mmap.mmap, base: int, header: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Tensors that read (and write) the mapped file in place: nothing is copied into memory."""
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape = _DTYPES[info["dtype"]], tuple(info["shape"])
        start, end = info["data_offsets"]
        if (base + start) % dtype.itemsize or end - start != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"tensor {name} is misaligned or of the wrong size")
        count = math.prod(shape)
        out[name] = (torch.frombuffer(mm, dtype=dtype, count=count, offset=base + start).view(shape) if count
                     else torch.empty(shape, dtype=dtype))
    return out


def _cache(t: dict[str, torch.Tensor], batch_size: int, shuffle: bool, stems: bool, record: dict[str, Any]) -> FeatureCache:
    n = int(record["rows"])  # rows past it were preallocated for images that could not be decoded
    taps = [t[f"tap.{k}"][:n] for k in range(sum(1 for name in t if name.startswith("tap.")))]
    return FeatureCache(taps, t["final"][:n], t["labels"][:n], batch_size, shuffle, stems, dict(record["skipped"]))


def load(folder: str | Path, key: str, batch_size: int, shuffle: bool, stems: bool) -> FeatureCache | None:
    """The saved cache for ``key``, memory-mapped (pages are read as batches need them, so it need
    not fit in memory), or None when there is none (or it cannot be read)."""
    path = _path(folder, key)
    if not path.is_file() or not _record_path(path).is_file():
        return None
    try:
        record = json.loads(_record_path(path).read_text())
        with open(path, "rb") as f:
            # Copy-on-write: writable views (torch wants them) that never write the file.
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        (length,) = struct.unpack("<Q", mm[:8])
        header = json.loads(mm[8:8 + length])
        if max(i["data_offsets"][1] for n, i in header.items() if n != "__metadata__") + 8 + length != len(mm):
            return None
        return _cache(_views(mm, 8 + length, header), batch_size, shuffle, stems, record)
    except Exception:  # a truncated or foreign file: rebuild rather than fail
        return None


def _build_on_disk(path: Path, build: Callable[[Allocate], FeatureCache], name: str, sink: Sink) -> FeatureCache:
    """Build a cache straight into its file (atomically renamed when whole): rows go to a
    memory-mapped file as they come, so the cache may be larger than memory."""
    held: dict[str, Any] = {}

    def write(tmp: str) -> None:
        def allocate(shapes: list[tuple[int, ...]], n: int, k: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
            head, header, size = _layout(shapes, n, k)
            free = shutil.disk_usage(path.parent).free
            if len(head) + size > free:
                raise PteenetError(f"the {name} feature cache needs {(len(head) + size) / 2**30:.1f} GiB in {path.parent} "
                                   f"but only {free / 2**30:.1f} GiB is free", "use fewer exits, --limit, or another --cache-dir")
            sink.note(f"the {name} feature cache takes {(len(head) + size) / 2**30:.2f} GiB on disk: {path}")
            with open(tmp, "r+b") as f:
                f.write(head)
                f.truncate(len(head) + size)
                held["mm"] = mmap.mmap(f.fileno(), 0)
            t = _views(held["mm"], len(head), header)
            return [t[f"tap.{i}"] for i in range(len(shapes))], t["final"], t["labels"]

        cache = held["cache"] = build(allocate)
        held["mm"].flush()
        record = {"rows": len(cache.labels), "skipped": cache.skipped}
        atomic_write(_record_path(path), lambda t: Path(t).write_text(json.dumps(record)))

    atomic_write(path, write)
    return held["cache"]


def cached_split(model: EarlyExitModel, ds: Dataset, split_info: dict[str, Any], split: str, *, views: int,
                 augment: bool, seed: int, batch_size: int, workers: int, amp: bool, cache_dir: str | None,
                 device: torch.device, sink: Sink, shard: tuple[int, int] | None = None) -> FeatureCache:
    """A split's feature cache: memory-mapped from ``cache_dir`` when a run saved it there, else
    built (into ``cache_dir``, memory-mapped, when given; else in memory)."""
    train = split == "train"
    stems = model.branch_config.cacheable_stem
    key = cache_key(model, split_info, split, views, augment, seed, shard, files_fingerprint(ds) if cache_dir else None)
    if cache_dir:
        found = load(cache_dir, key, batch_size, train, stems)
        if found is not None:
            sink.note(f"{split} features read from {_path(cache_dir, key)}")
            files = image_files_of(ds)
            strict = files is not None and files[0].strict
            for path, reason in found.skipped.items():  # left out of the cache: as if met again now
                SKIPPED.add(Undecodable(path, f"{reason}; left out of the cached features", strict))
            return found

    def build(allocate: Allocate | None) -> FeatureCache:
        # Seeded: the augmented views (torch's global RNG) must be the same again on --resume.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            return build_feature_cache(model, ds, batch_size, workers, seed, device, Autocast(device, amp), sink,
                                       train, split, views, allocate)

    if not cache_dir:
        return build(None)
    path = _path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _build_on_disk(path, build, split, sink)
