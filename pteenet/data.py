"""Datasets for training exits and sweeping thresholds: train / held-out calibration (val) / test splits.

Specs: ``cifar10``, ``cifar100``, ``svhn``, ``mnist``, ``fashion-mnist`` (torchvision), ``imagefolder:PATH``
(``PATH/train`` plus ``PATH/test`` or ``PATH/val``) and ``synthetic`` (generated, for tests and quick tries).
Every item is ``(float tensor C x H x W normalised as the backbone expects, int label)``.
"""
from __future__ import annotations

import functools
import gzip
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from .backbones import Preprocess
from .errors import PteenetError, unknown_name

DEFAULT_DATA_DIR = Path("~/.cache/pteenet/data")
# Debian's dataset-fashion-mnist package installs the four original idx .gz files here.
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
SYNTHETIC_SIZES = {"train": 500, "test": 100}
# Folder under the data dir and the files torchvision needs there, for the "not found" message.
_TORCHVISION = {
    "cifar10": ("cifar-10-batches-py", ["data_batch_1..5", "test_batch"]),
    "cifar100": ("cifar-100-python", ["train", "test", "meta"]),
    "svhn": (".", ["train_32x32.mat", "test_32x32.mat"]),
    "mnist": ("MNIST/raw", ["train-images-idx3-ubyte", "t10k-images-idx3-ubyte", "(+ labels)"]),
    "fashion-mnist": ("FashionMNIST/raw", ["train-images-idx3-ubyte", "t10k-images-idx3-ubyte", "(+ labels)"]),
}
# Left/right mirroring changes what a digit means; clothes and objects survive it.
_NO_FLIP = {"mnist", "svhn"}
KNOWN_SPECS = [*_TORCHVISION, "imagefolder:PATH", "synthetic"]


@dataclass
class DataConfig:
    """Which data to load and how to split it; ``limit`` caps every split (for quick tries and tests)."""

    spec: str
    data_dir: str | None = None
    limit: int | None = None
    augment: bool = True
    val_split: float = 0.1
    seed: int = 0
    download: bool = True
    crop_padding: int | None = None  # random-crop padding; None: 4 px at 32 px, scaled with the image size

    @classmethod
    def from_split_info(cls, info: dict[str, Any], data_dir: str | None = None, download: bool = True) -> "DataConfig":
        """The config that rebuilds the split recorded in a checkpoint (``Splits.split_info``)."""
        return cls(spec=info["spec"], data_dir=data_dir, limit=info["limit"], val_split=info["val_split"],
                   seed=info["seed"], download=download)


@dataclass
class Splits:
    """``train`` is augmented (if asked); ``val`` (calibration, carved from train) and ``test`` are not.

    ``split_info`` is JSON-able and, with the same data, rebuilds the same split (``DataConfig.from_split_info``).
    """

    train: Dataset
    val: Dataset
    test: Dataset
    class_names: list[str]
    split_info: dict[str, Any]


class ImageTransform:
    """uint8 image tensor (c, h, w) -> normalised float tensor ``preprocess.input_size``.

    Working on tensors rather than PIL images keeps the in-memory datasets free of PIL round trips.
    """

    def __init__(self, pre: Preprocess, augment: bool = False, flip: bool = True, crop_padding: int | None = None) -> None:
        self.channels, self.height, self.width = pre.input_size
        self.mean = torch.tensor(pre.mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(pre.std, dtype=torch.float32).view(-1, 1, 1)
        self.augment, self.flip = augment, flip
        self.padding = crop_padding if crop_padding is not None else max(1, round(4 * self.height / 32))

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        x = img.float().div_(255)
        if x.shape[0] != self.channels:
            if x.shape[0] == 1 and self.channels == 3:
                x = x.expand(3, -1, -1)
            elif x.shape[0] == 3 and self.channels == 1:
                # ITU-R 601 luma, the weights PIL uses for convert("L").
                x = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)
            else:
                raise PteenetError(f"cannot turn {x.shape[0]}-channel images into {self.channels} channels",
                                   "use --input-size with 1 or 3 channels")
        if tuple(x.shape[1:]) != (self.height, self.width):
            x = F.interpolate(x[None], size=(self.height, self.width), mode="bilinear", antialias=True,
                              align_corners=False)[0].clamp_(0, 1)
        if self.augment:
            p = self.padding
            top, left = torch.randint(0, 2 * p + 1, (2,)).tolist()
            x = F.pad(x, (p, p, p, p))[:, top:top + self.height, left:left + self.width]
            if self.flip and torch.rand(()) < 0.5:
                x = x.flip(-1)
        return (x - self.mean) / self.std


class TensorImages(Dataset):
    """Images held in memory as one uint8 tensor (N, c, h, w), transformed per item."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), int(self.labels[i])


def _data_root(cfg: DataConfig) -> Path:
    return Path(cfg.data_dir).expanduser() if cfg.data_dir else DEFAULT_DATA_DIR.expanduser()


def _install_debian_fashion(root: Path) -> None:
    """Unpack Debian's Fashion-MNIST files into torchvision's layout, so no download is needed."""
    raw = root / "FashionMNIST" / "raw"
    sources = sorted(DEBIAN_FASHION_DIR.glob("*-ubyte.gz"))
    if len(sources) != 4 or all((raw / s.stem).is_file() for s in sources):
        return
    raw.mkdir(parents=True, exist_ok=True)
    for src in sources:
        if not (raw / src.stem).is_file():
            tmp = raw / (src.stem + ".tmp")
            with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout)
            os.replace(tmp, raw / src.stem)


def _torchvision_split(spec: str, root: Path, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """One split of a torchvision dataset as (uint8 images N x c x h x w, int64 labels, class names)."""
    import torchvision.datasets as tvd

    if spec == "svhn":
        try:
            import scipy  # noqa: F401  (torchvision's SVHN reads .mat files with scipy)
        except ImportError:
            raise PteenetError("the svhn dataset needs scipy", "pip install scipy") from None
        ds: Any = tvd.SVHN(str(root), split="train" if train else "test", download=download)
        return torch.from_numpy(ds.data), torch.as_tensor(ds.labels, dtype=torch.long), [str(d) for d in range(10)]
    cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST}[spec]
    ds = cls(str(root), train=train, download=download)
    data = torch.as_tensor(ds.data)
    images = data.unsqueeze(1) if data.dim() == 3 else data.permute(0, 3, 1, 2)  # MNIST: N,h,w; CIFAR: N,h,w,c
    return images, torch.as_tensor(ds.targets, dtype=torch.long), list(ds.classes)


def _load_torchvision(spec: str, cfg: DataConfig) -> tuple[Any, Any, list[str]]:
    root = _data_root(cfg)
    if spec == "fashion-mnist":
        _install_debian_fashion(root)
    try:
        train = _torchvision_split(spec, root, True, cfg.download)
        test = _torchvision_split(spec, root, False, cfg.download)
    except PteenetError:
        raise
    except Exception as e:  # torchvision raises RuntimeError, URLError, ... for missing or unreachable files
        folder, files = _TORCHVISION[spec]
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:120].rstrip(":")
        # torchvision's own "use download=True" advice means nothing to a CLI user, so it is left out.
        reason = f"download failed: {detail}" if cfg.download else "downloads are off"
        raise PteenetError(
            f"{spec} not found in {(root / folder).resolve()} (looked for {', '.join(files)}); {reason}",
            "run once online with downloads on, or put the files there, or pass --data-dir"
            + (" (apt-get install dataset-fashion-mnist also works)" if spec == "fashion-mnist" else ""),
        ) from None
    return train, test, train[2]


def _read_image(path: str, mode: str) -> torch.Tensor:
    """A module-level loader (not a closure) so that DataLoader workers can pickle it."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    with Image.open(path) as im:
        return pil_to_tensor(im.convert(mode))


def _load_imagefolder(path: str, pre: Preprocess, transforms: tuple[Callable, Callable]) -> tuple[Any, Any, Any, list[str]]:
    from torchvision.datasets import ImageFolder

    base = Path(path).expanduser()
    test_dir = next((base / d for d in ("test", "val") if (base / d).is_dir()), None)
    if not (base / "train").is_dir() or test_dir is None:
        raise PteenetError(f"imagefolder needs {base / 'train'} and {base / 'test'} (or {base / 'val'})",
                           "lay it out as PATH/train/CLASS/*.png and PATH/test/CLASS/*.png")
    loader = functools.partial(_read_image, mode="L" if pre.input_size[0] == 1 else "RGB")
    try:
        train_aug, train_plain, test = (ImageFolder(str(d), transform=t, loader=loader) for d, t in
                                        ((base / "train", transforms[0]), (base / "train", transforms[1]), (test_dir, transforms[1])))
    except (FileNotFoundError, OSError) as e:
        raise PteenetError(f"cannot read the image folders under {base}: {e}", "PATH/train/CLASS/ must hold images") from None
    if test.classes != train_aug.classes:
        raise PteenetError(f"{test_dir} has classes {test.classes[:5]}... but {base / 'train'} has {train_aug.classes[:5]}...",
                           "the test folder must have the same class folders as train")
    return train_aug, train_plain, test, list(train_aug.classes)


def _synthetic(pre: Preprocess, n: int, gen: torch.Generator, templates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class templates (coarse random blobs) plus coarse and fine noise: learnable, but not trivially."""
    c, h, w = pre.input_size
    labels = torch.arange(n) % len(templates)
    coarse = templates[labels] + 0.15 * torch.randn(n, c, 4, 4, generator=gen)
    images = torch.empty(n, c, h, w, dtype=torch.uint8)
    for i in range(0, n, 64):  # chunks keep memory small at 224 x 224
        x = F.interpolate(coarse[i:i + 64], size=(h, w), mode="bilinear", align_corners=False)
        x = x + 0.1 * torch.randn(x.shape, generator=gen)
        images[i:i + 64] = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return images, labels


def _cap(n: int, limit: int | None, gen: torch.Generator) -> list[int]:
    """All indices in order, or the first ``limit`` of a seeded shuffle."""
    if limit is None or limit >= n:
        return list(range(n))
    return torch.randperm(n, generator=gen)[:limit].tolist()


def load_splits(cfg: DataConfig, preprocess: Preprocess, num_classes: int | None = None) -> Splits:
    """Load ``cfg.spec`` preprocessed for the backbone and split train into train + calibration (val)."""
    spec = cfg.spec
    if not 0 <= cfg.val_split < 1:
        raise PteenetError(f"val split must be in [0, 1), got {cfg.val_split}", "e.g. --val-split 0.1")
    if cfg.limit is not None and cfg.limit < 1:
        raise PteenetError(f"limit must be at least 1, got {cfg.limit}", "leave it out to use all the data")
    aug_tf = ImageTransform(preprocess, cfg.augment, spec not in _NO_FLIP, cfg.crop_padding)
    plain_tf = ImageTransform(preprocess)
    gen = torch.Generator().manual_seed(cfg.seed)
    if spec in _TORCHVISION:
        (tr_x, tr_y, _), (te_x, te_y, _), class_names = _load_torchvision(spec, cfg)
        train_aug, train_plain = TensorImages(tr_x, tr_y, aug_tf), TensorImages(tr_x, tr_y, plain_tf)
        test: Dataset = TensorImages(te_x, te_y, plain_tf)
    elif spec.startswith("imagefolder:"):
        train_aug, train_plain, test, class_names = _load_imagefolder(spec.split(":", 1)[1], preprocess, (aug_tf, plain_tf))
    elif spec == "synthetic":
        k = num_classes or 10
        templates = torch.rand(k, preprocess.input_size[0], 4, 4, generator=gen)
        tr_x, tr_y = _synthetic(preprocess, SYNTHETIC_SIZES["train"], gen, templates)
        te_x, te_y = _synthetic(preprocess, SYNTHETIC_SIZES["test"], gen, templates)
        train_aug, train_plain = TensorImages(tr_x, tr_y, aug_tf), TensorImages(tr_x, tr_y, plain_tf)
        test = TensorImages(te_x, te_y, plain_tf)
        class_names = [f"class{i}" for i in range(k)]
    else:
        raise unknown_name("dataset", spec, KNOWN_SPECS)

    if num_classes is not None and len(class_names) != num_classes:
        raise PteenetError(f"dataset {spec} has {len(class_names)} classes but the backbone outputs {num_classes}",
                           "pick the dataset the backbone was trained on, or a backbone with that many classes")
    n_train, n_test = len(train_aug), len(test)  # type: ignore[arg-type]
    # Val is carved from the full train set before the cap, so the calibration images do not depend on limit.
    perm = torch.randperm(n_train, generator=gen).tolist()
    n_val = min(n_train - 1, max(1, round(cfg.val_split * n_train))) if cfg.val_split > 0 and n_train > 1 else 0
    val_idx, train_idx = perm[:n_val][:cfg.limit], perm[n_val:][:cfg.limit]
    test_idx = _cap(n_test, cfg.limit, gen)
    if not train_idx or not test_idx:
        raise PteenetError(f"dataset {spec} is empty (train {len(train_idx)}, test {len(test_idx)} images)",
                           "check the data folder")
    info = {
        "spec": spec, "val_split": cfg.val_split, "seed": cfg.seed, "limit": cfg.limit, "num_classes": len(class_names),
        "source_sizes": {"train": n_train, "test": n_test},
        "sizes": {"train": len(train_idx), "val": len(val_idx), "test": len(test_idx)},
    }
    return Splits(train=Subset(train_aug, train_idx), val=Subset(train_plain, val_idx), test=Subset(test, test_idx),
                  class_names=class_names, split_info=info)


def make_loader(ds: Dataset, batch_size: int, shuffle: bool, workers: int = 0, seed: int = 0,
                drop_last: bool = False) -> DataLoader:
    """A DataLoader whose shuffling (and worker seeds) come from a generator seeded with ``seed``."""
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers, drop_last=drop_last,
                      generator=torch.Generator().manual_seed(seed), persistent_workers=workers > 0)


# -- the data a checkpoint was trained on ----------------------------------------------------------
DEFAULT_VAL_SPLIT = 0.1  # only for checkpoints that record no split (training's default)


@dataclass
class DataRequest:
    """The data the user named. The split itself comes from the checkpoint's record when it has
    one; ``spec`` None means "the recorded data"; ``limit`` None means "the recorded limit"."""

    spec: str | None = None
    data_dir: str | None = None
    limit: int | None = None
    download: bool = True


def _same_spec(asked: str, recorded: str) -> bool:
    if asked.startswith("imagefolder:") and recorded.startswith("imagefolder:"):
        return True  # the folder may have moved or be named relative to another cwd: trust the user
    return asked == recorded


def resolve_data(request: DataRequest, recorded: dict[str, Any] | None) -> tuple[DataConfig, list[str]]:
    """The DataConfig that rebuilds training's calibration split, and notes on what was assumed."""
    notes: list[str] = []
    if recorded:
        rec = str(recorded.get("spec"))
        if request.spec is not None and not _same_spec(request.spec, rec):
            raise PteenetError(f"--data {request.spec} is not the data the branches were trained on ({rec})",
                               "omit --data to sweep on the recorded calibration split")
        try:
            cfg = DataConfig.from_split_info(recorded, request.data_dir, request.download)
        except (KeyError, TypeError):
            raise PteenetError("the checkpoint's data record is incomplete (needs spec, val_split, seed, limit)",
                               "retrain the branches with `pteenet train-branches`") from None
        if request.spec is not None and request.spec != rec:
            cfg.spec = request.spec
            notes.append(f"data read from {request.spec}, assumed to hold the same images as the recorded {rec}")
        if request.limit is not None and request.limit != cfg.limit:
            # Val is carved before the cap, so any limit keeps it inside the held-out images.
            notes.append(f"--limit {request.limit} replaces the recorded limit {cfg.limit}")
            cfg.limit = request.limit
    else:
        if request.spec is None:
            raise PteenetError("the checkpoint records no training data", "pass --data SPEC")
        cfg = DataConfig(request.spec, request.data_dir, request.limit, val_split=DEFAULT_VAL_SPLIT,
                         download=request.download)
        notes.append(f"the checkpoint records no data split: calibrated on a fresh val_split "
                     f"{DEFAULT_VAL_SPLIT} (seed 0), which may overlap the images the branches were trained on")
    cfg.augment = False  # only val and test are used, and they are never augmented; this is for clarity
    return cfg, notes
