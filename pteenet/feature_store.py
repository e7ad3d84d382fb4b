"""Feature caches on disk: a ``FeatureCache`` saved once and reused by later runs.

A backbone pass over the training set is the one expensive step of branch training; runs that
differ only in what is trained on the cached rows (head width, loss, targets, epochs, ensemble)
read the same rows. A saved cache is found by a key that hashes everything the rows depend on: the
backbone's weights, the exit points, what the branch stems compute, the data split and its record,
the number of augmented views and the seed. Any change gives another key, so a stale cache is never
read. Files are safetensors (no pickle), written atomically.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .batches import Autocast, FeatureCache, build_feature_cache
from .files import atomic_write
from .model import EarlyExitModel
from .progress import Sink


def cache_key(model: EarlyExitModel, split_info: dict[str, Any], split: str, views: int, augment: bool,
              seed: int) -> str:
    """Hash of everything a cached split's rows depend on."""
    bc = model.branch_config
    stem = {"kind": bc.kind, "grid": bc.grid} if bc.cacheable_stem else "taps"
    doc = {"backbone": model.backbone_sha256, "preprocess": model.info.to_dict().get("preprocess"),
           "exits": [p.node for p in model.exit_points], "stem": stem, "data": split_info, "split": split,
           "views": views, "augment": augment and split == "train", "seed": seed, "format": 1}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _path(folder: str | Path, key: str) -> Path:
    return Path(folder).expanduser() / f"features-{key}.safetensors"


def load(folder: str | Path, key: str, batch_size: int, shuffle: bool, stems: bool) -> FeatureCache | None:
    """The saved cache for ``key``, or None when there is none (or it cannot be read)."""
    from safetensors.torch import load_file

    path = _path(folder, key)
    if not path.is_file():
        return None
    try:
        t = load_file(str(path))
    except Exception:  # a truncated or foreign file: rebuild rather than fail
        return None
    taps = [t[f"tap.{k}"] for k in range(sum(1 for name in t if name.startswith("tap.")))]
    return FeatureCache(taps, t["final"], t["labels"], batch_size, shuffle, stems)


def save(folder: str | Path, key: str, cache: FeatureCache) -> Path:
    from safetensors.torch import save_file

    path = _path(folder, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"tap.{k}": v.contiguous() for k, v in enumerate(cache.taps)}
    tensors.update(final=cache.final.contiguous(), labels=cache.labels.contiguous())
    atomic_write(path, lambda tmp: save_file(tensors, tmp))
    return path


def cached_split(model: EarlyExitModel, ds: Dataset, split_info: dict[str, Any], split: str, *, views: int,
                 augment: bool, seed: int, batch_size: int, workers: int, amp: bool, cache_dir: str | None,
                 device: torch.device, sink: Sink) -> FeatureCache:
    """A split's feature cache: read from ``cache_dir`` when a run saved it, else built (and saved)."""
    train = split == "train"
    key = cache_key(model, split_info, split, views, augment, seed)
    if cache_dir:
        found = load(cache_dir, key, batch_size, train, model.branch_config.cacheable_stem)
        if found is not None:
            return found
    # Seeded: the augmented views (torch's global RNG) must be the same again on --resume.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        cache = build_feature_cache(model, ds, batch_size, workers, seed, device, Autocast(device, amp), sink,
                                    train, split, views)
    if cache_dir:
        save(cache_dir, key, cache)
    return cache
