"""Train / calibration / test splits of a dataset spec (``sources.py``), preprocessed for the backbone.

A source with its own test split (torchvision's datasets, ``imagefolder:PATH`` with ``PATH/train``
and ``PATH/test``, ``synthetic``) keeps it. A single folder (``imagefolder:PATH`` of class folders,
``images:PATH``) is split in two first: a seeded random ``test_split`` of its images (seed
``DataConfig.seed``; 10% by default) is test, and the rest is the training data.

Calibration (``DataConfig.calibration``): by default the calibration split is a seeded
``calibration_split`` carved out of the training data. A calibration spec takes it from other data instead, and then all of it trains:

- ``SPEC``, any dataset spec: that dataset's test split (``imagefolder:PATH`` with ``PATH/train``:
  ``PATH/test``, else ``PATH/val``);
- ``imagefolder:PATH`` where PATH is itself a folder of class folders, or ``images:PATH``: every image
  in it;
- either, followed by ``#half=0`` or ``#half=1``: a seeded random half of it (seed ``DataConfig.seed``),
  the two halves disjoint and together the whole. Only a final ``#half=0|1`` is read as this suffix,
  so a ``#`` elsewhere in a path is just part of the path.

When the calibration data is the test split of ``spec``, a half calibrates and test becomes the
other half (``split_info["test_half"]``); the whole test split calibrates only with the overlap
recorded (``split_info["calibration_overlap"] == "test"``), which the sweep warns about.

Images without labels (``images:PATH``) carry the label ``files.UNLABELLED``; ``split_info["labelled"]``
says whether the split has labels, and without them only agreement with the backbone is measured.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from ..backbones.specs import Preprocess
from ..errors import PteenetError
from .config import DataConfig, parse_calibration
from .sources import folder_images, folder_of, has_splits, load_source, test_dir
from .transform import ImageTransform

# Left/right mirroring changes what a digit means; clothes and objects survive it.
_NO_FLIP = {"mnist", "svhn"}

SPLITS = ("train", "calibration", "test")  # the names users pick a split by (``Splits`` fields)
SPLIT_ALIASES = {"val": "calibration"}  # the calibration split's earlier name, still accepted


def split_name(name: str) -> str:
    """The split ``name`` stands for (``val`` is ``calibration``); unknown names pass through for the caller's check."""
    return SPLIT_ALIASES.get(name, name)


@dataclass
class Splits:
    """``train`` is augmented (if asked); ``calibration`` (carved from train, or from
    ``DataConfig.calibration``) and ``test`` are not. ``class_names`` None: the data has no labels.

    ``split_info`` is JSON-able and, with the same data, rebuilds the same split (``DataConfig.from_split_info``).
    """

    train: Dataset
    calibration: Dataset
    test: Dataset
    class_names: list[str] | None
    split_info: dict[str, Any]

    @property
    def val(self) -> Dataset:
        """The calibration split by its earlier name."""
        warnings.warn("Splits.val is Splits.calibration", DeprecationWarning, stacklevel=2)
        return self.calibration


def _cap(n: int, limit: int | None, gen: torch.Generator) -> list[int]:
    """All indices in order, or the first ``limit`` of a seeded shuffle."""
    if limit is None or limit >= n:
        return list(range(n))
    return torch.randperm(n, generator=gen)[:limit].tolist()


def _folder_id(path: Any) -> str:
    return str(path.expanduser().resolve())


def _is_folder(spec: str) -> bool:
    return spec.startswith(("imagefolder:", "images:"))


def _split_ids(spec: str) -> tuple[str | None, str]:
    """What identifies the images of ``spec``'s train and test splits: a resolved folder for a
    folder spec (so two spellings of one path compare equal), else the spec (train None: a
    calibration spec never names a torchvision train split). A single folder is its training data;
    its test split is carved from it and no calibration spec names it."""
    if not _is_folder(spec):
        return None, spec
    base = folder_of(spec)
    if not has_splits(spec):
        return _folder_id(base), _folder_id(base) + "#test"
    return _folder_id(base / "train"), _folder_id(test_dir(base) or base / "test")


def _calibration_folder(base: str) -> Any:
    """The images an ``imagefolder:PATH`` calibration spec means: the test folder when PATH has train/, else PATH itself."""
    path = folder_of(base)
    return test_dir(path) if has_splits(base) else path


def _calibration_source(base: str, cfg: DataConfig, pre: Preprocess, num_classes: int | None,
                        plain_tf: ImageTransform) -> tuple[Dataset, list[str] | None]:
    if _is_folder(base):
        return folder_images(base, pre, plain_tf, cfg.strict_images, _calibration_folder(base))
    # Its own generator seeded like the main one: `synthetic` then yields the very images it would as --data.
    src = load_source(base, cfg, pre, num_classes, torch.Generator().manual_seed(cfg.seed), plain_tf, plain_tf)
    assert src.test is not None
    return src.test, src.class_names


def _check_classes(what: str, names: list[str] | None, expected: int | None, against: str = "the backbone outputs") -> None:
    if names is not None and expected is not None and len(names) != expected:
        raise PteenetError(f"{what} has {len(names)} classes but {against} {expected}",
                           "pick the dataset the backbone was trained on, or a backbone with that many classes "
                           "(or images:PATH to use the images without their labels)")


def _calibration_split(cfg: DataConfig, cal_base: str, half: int | None, test: Dataset, class_names: list[str] | None,
                       pre: Preprocess, num_classes: int | None, plain_tf: ImageTransform,
                       gen: torch.Generator) -> tuple[Subset, list[int], int, dict[str, Any]]:
    """Val from the calibration data; the test indices (the other half where val is a half of test);
    the calibration data's size; and what ``split_info`` records of it."""
    spec = cfg.spec
    train_id, test_id = _split_ids(spec)
    cal_id = _folder_id(_calibration_folder(cal_base)) if _is_folder(cal_base) else cal_base
    same_as_test = cal_id == test_id
    cal_ds, cal_names = (test, class_names) if same_as_test else \
        _calibration_source(cal_base, cfg, pre, num_classes, plain_tf)
    _check_classes(f"calibration data {cal_base}", cal_names, num_classes)
    if class_names is not None:
        _check_classes(f"calibration data {cal_base}", cal_names, len(class_names), f"dataset {spec} has")
    if _is_folder(spec) and _is_folder(cal_base) and None not in (cal_names, class_names) and cal_names != class_names:
        # Labels are indices of sorted folder names: other names would silently mean other labels.
        raise PteenetError(f"calibration folder has classes {cal_names[:5]}... but {spec} has {class_names[:5]}...",  # type: ignore[index]
                           "the calibration folder must have the same class folders as the training data")
    n_cal = len(cal_ds)  # type: ignore[arg-type]
    # A generator of its own, so a half depends on the seed and the data only.
    order = torch.randperm(n_cal, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    halves = (order[:n_cal // 2], order[n_cal // 2:])
    cal_idx = order if half is None else halves[half]
    if not cal_idx:
        raise PteenetError(f"calibration data {cfg.calibration} is empty", "check the calibration folder")
    test_half = None if not same_as_test or half is None else 1 - half
    # A half of the test split calibrates and the other half is the test split: nothing reported was tuned on.
    test_idx = _cap(len(test), cfg.limit, gen) if test_half is None else halves[test_half][:cfg.limit]  # type: ignore[arg-type]
    overlap = "test" if same_as_test and half is None else "train" if cal_id == train_id else None
    return Subset(cal_ds, cal_idx[:cfg.limit]), test_idx, n_cal, {
        "calibration": cfg.calibration, "test_half": test_half, "calibration_overlap": overlap,
        "calibration_labelled": cal_names is not None}


def _carve_test(train_aug: Dataset, train_plain: Dataset, fraction: float, seed: int) -> tuple[Subset, Subset, Subset]:
    """A single folder split in two: a seeded ``fraction`` of it is test, the rest trains (its own
    generator: the test images depend on the seed and the folder only)."""
    n = len(train_aug)  # type: ignore[arg-type]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = min(n - 1, max(1, round(fraction * n))) if n > 1 else 0
    rest = order[n_test:]
    return Subset(train_aug, rest), Subset(train_plain, rest), Subset(train_plain, order[:n_test])


def load_splits(cfg: DataConfig, preprocess: Preprocess, num_classes: int | None = None) -> Splits:
    """Load ``cfg.spec`` preprocessed for the backbone and split it into train, calibration and
    test: calibration carved from train, or taken from ``cfg.calibration`` (module docstring)."""
    spec = cfg.spec
    cal_base, half = parse_calibration(cfg.calibration) if cfg.calibration is not None else (None, None)
    aug_tf = ImageTransform(preprocess, cfg.augment, spec not in _NO_FLIP, cfg.crop_padding)
    plain_tf = ImageTransform(preprocess)
    gen = torch.Generator().manual_seed(cfg.seed)
    src = load_source(spec, cfg, preprocess, num_classes, gen, aug_tf, plain_tf)
    class_names = src.class_names
    _check_classes(f"dataset {spec}", class_names, num_classes)
    train_aug, train_plain, test = src.train_aug, src.train_plain, src.test
    carved = test is None
    if test is None:
        train_aug, train_plain, test = _carve_test(train_aug, train_plain, cfg.test_split, cfg.seed)
    n_train, n_test = len(train_aug), len(test)  # type: ignore[arg-type]
    # Calibration is carved from the full train set before the cap, so the calibration images do not depend on limit.
    perm = torch.randperm(n_train, generator=gen).tolist()
    source_sizes = {"train": n_train, "test": n_test}
    extra: dict[str, Any] = {"calibration": None}
    if cal_base is None:
        n_val = min(n_train - 1, max(1, round(cfg.calibration_split * n_train))) if cfg.calibration_split > 0 and n_train > 1 else 0
        val, train_idx = Subset(train_plain, perm[:n_val][:cfg.limit]), perm[n_val:][:cfg.limit]
        test_idx = _cap(n_test, cfg.limit, gen)
    else:
        train_idx = perm[:cfg.limit]
        val, test_idx, n_cal, extra = _calibration_split(cfg, cal_base, half, test, class_names, preprocess,
                                                         num_classes, plain_tf, gen)
        source_sizes["calibration"] = n_cal
    if not train_idx or not test_idx:
        raise PteenetError(f"dataset {spec} is empty (train {len(train_idx)}, test {len(test_idx)} images)",
                           "check the data folder")
    info = {
        "spec": spec, "val_split": cfg.calibration_split, "seed": cfg.seed, "limit": cfg.limit,
        "num_classes": len(class_names) if class_names is not None else num_classes,
        "labelled": class_names is not None,
        "test_split": cfg.test_split if carved else None,
        "source_sizes": source_sizes,
        "sizes": {"train": len(train_idx), "val": len(val), "test": len(test_idx)},  # type: ignore[arg-type]
        **extra,
    }
    return Splits(train=Subset(train_aug, train_idx), calibration=val, test=Subset(test, test_idx),
                  class_names=class_names, split_info=info)


NO_LABELS = ("these images have no labels (images:PATH), so accuracy cannot be measured: only agreement with the "
             "backbone is (the share of images where the early-exit answer is the backbone's)")
