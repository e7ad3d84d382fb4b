"""Datasets for training exits and sweeping thresholds: train / held-out calibration (val) / test splits.

Specs: ``cifar10``, ``cifar100``, ``svhn``, ``mnist``, ``fashion-mnist`` (torchvision), ``imagefolder:PATH``
(``PATH/train`` plus ``PATH/test`` or ``PATH/val``) and ``synthetic`` (generated, for tests and quick tries).
Every item is ``(float tensor C x H x W normalised as the backbone expects, int label)``.

Calibration (``DataConfig.calibration``): by default val is carved out of train. A calibration spec
takes val from other data instead, and then all of train is train:

- ``SPEC``, any dataset spec above: that dataset's test split (``imagefolder:PATH`` with ``PATH/train``:
  ``PATH/test``, else ``PATH/val``);
- ``imagefolder:PATH`` where PATH is itself a folder of class folders: every image in it;
- either, followed by ``#half=0`` or ``#half=1``: a seeded random half of it (seed ``DataConfig.seed``),
  the two halves disjoint and together the whole. Only a final ``#half=0|1`` is read as this suffix,
  so a ``#`` elsewhere in a path is just part of the path.

When the calibration data is the test split of ``spec``, a half calibrates and test becomes the
other half (``split_info["test_half"]``); the whole test split calibrates only with the overlap
recorded (``split_info["calibration_overlap"] == "test"``), which the sweep warns about.
"""
from __future__ import annotations

import functools
import gzip
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from .backbones import Preprocess
from .configs import Config, check_int, check_number, setting
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
_HALF_SUFFIX = re.compile(r"#half=(\w*)$")


def _known_spec(spec: str) -> bool:
    return spec in _TORCHVISION or spec == "synthetic" or spec.startswith("imagefolder:")


@dataclass(kw_only=True)
class DataConfig(Config):
    """Which data to load and how to split it; ``limit`` caps every split (for quick tries and tests)."""

    spec: str
    data_dir: str | None = setting(None, resume="free")  # where the files are: may move between runs
    limit: int | None = None
    augment: bool = True
    val_split: float = 0.1
    seed: int = 0
    download: bool = setting(True, resume="free")
    crop_padding: int | None = None  # random-crop padding; None: 4 px at 32 px, scaled with the image size
    calibration: str | None = None  # val from this spec (module docstring) instead of carved from train

    def __post_init__(self) -> None:
        if not isinstance(self.spec, str) or not _known_spec(self.spec):
            raise unknown_name("dataset", str(self.spec), KNOWN_SPECS)
        check_int("limit", self.limit, 1, "leave it out to use all the data", optional=True)
        check_number("val_split", self.val_split, 0, 1, high_open=True,
                     hint="the val split is a fraction of train, e.g. --val-split 0.1")
        check_int("seed", self.seed, None)
        check_int("crop_padding", self.crop_padding, 0, optional=True)
        if self.calibration is not None:
            base, _ = parse_calibration(self.calibration)
            if not _known_spec(base):  # before loading the training data, which can take a while
                raise unknown_name("calibration dataset", base, KNOWN_SPECS)

    @classmethod
    def from_split_info(cls, info: dict[str, Any], data_dir: str | None = None, download: bool = True) -> "DataConfig":
        """The config that rebuilds the split recorded in a checkpoint (``Splits.split_info``); records
        older than ``calibration`` have no such key and carved val from train."""
        return cls(spec=info["spec"], data_dir=data_dir, limit=info["limit"], val_split=info["val_split"],
                   seed=info["seed"], download=download, calibration=info.get("calibration"))


@dataclass
class Splits:
    """``train`` is augmented (if asked); ``val`` (calibration: carved from train, or ``calibration``)
    and ``test`` are not.

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


def _test_dir(base: Path) -> Path | None:
    return next((base / d for d in ("test", "val") if (base / d).is_dir()), None)


def _image_folder(folder: Path, transform: Callable, pre: Preprocess) -> Any:
    """torchvision's ImageFolder over ``folder``/CLASS/*, decoded to the backbone's channel count."""
    from torchvision.datasets import ImageFolder

    loader = functools.partial(_read_image, mode="L" if pre.input_size[0] == 1 else "RGB")
    try:
        return ImageFolder(str(folder), transform=transform, loader=loader)
    except (FileNotFoundError, OSError) as e:
        raise PteenetError(f"cannot read the image folder {folder}: {e}", f"{folder}/CLASS/ must hold images") from None


def _load_imagefolder(path: str, pre: Preprocess, transforms: tuple[Callable, Callable]) -> tuple[Any, Any, Any, list[str]]:
    base = Path(path).expanduser()
    test_dir = _test_dir(base)
    if not (base / "train").is_dir() or test_dir is None:
        raise PteenetError(f"imagefolder needs {base / 'train'} and {base / 'test'} (or {base / 'val'})",
                           "lay it out as PATH/train/CLASS/*.png and PATH/test/CLASS/*.png")
    train_aug, train_plain, test = (_image_folder(d, t, pre) for d, t in
                                    ((base / "train", transforms[0]), (base / "train", transforms[1]), (test_dir, transforms[1])))
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


def parse_calibration(text: str) -> tuple[str, int | None]:
    """``SPEC`` or ``SPEC#half=0|1`` -> (SPEC, None or the half)."""
    m = _HALF_SUFFIX.search(text)
    if m is None:
        return text, None
    if m.group(1) not in ("0", "1") or not text[:m.start()]:
        raise PteenetError(f"bad calibration spec '{text}'", "use SPEC, SPEC#half=0 or SPEC#half=1")
    return text[:m.start()], int(m.group(1))


def _load_source(spec: str, cfg: DataConfig, pre: Preprocess, num_classes: int | None, gen: torch.Generator,
                 aug_tf: ImageTransform, plain_tf: ImageTransform) -> tuple[Dataset, Dataset, Dataset, list[str]]:
    """Train (augmented), train (plain), test and the class names of one dataset spec."""
    if spec in _TORCHVISION:
        (tr_x, tr_y, _), (te_x, te_y, _), class_names = _load_torchvision(spec, cfg)
        return TensorImages(tr_x, tr_y, aug_tf), TensorImages(tr_x, tr_y, plain_tf), TensorImages(te_x, te_y, plain_tf), class_names
    if spec.startswith("imagefolder:"):
        return _load_imagefolder(spec.split(":", 1)[1], pre, (aug_tf, plain_tf))
    if spec == "synthetic":
        k = num_classes or 10
        templates = torch.rand(k, pre.input_size[0], 4, 4, generator=gen)
        tr_x, tr_y = _synthetic(pre, SYNTHETIC_SIZES["train"], gen, templates)
        te_x, te_y = _synthetic(pre, SYNTHETIC_SIZES["test"], gen, templates)
        return (TensorImages(tr_x, tr_y, aug_tf), TensorImages(tr_x, tr_y, plain_tf), TensorImages(te_x, te_y, plain_tf),
                [f"class{i}" for i in range(k)])
    raise unknown_name("dataset", spec, KNOWN_SPECS)


def _folder_id(path: Path) -> str:
    return str(path.expanduser().resolve())


def _split_ids(spec: str) -> tuple[str | None, str]:
    """What identifies the images of ``spec``'s train and test splits: a resolved folder for an
    imagefolder (so two spellings of one path compare equal), else the spec (train None: a
    calibration spec never names a torchvision train split)."""
    if not spec.startswith("imagefolder:"):
        return None, spec
    base = Path(spec.split(":", 1)[1]).expanduser()
    return _folder_id(base / "train"), _folder_id(_test_dir(base) or base / "test")


def _calibration_folder(base: str) -> Path:
    """``imagefolder:PATH``: PATH's test (or val) folder when PATH has train/, else PATH itself."""
    path = Path(base.split(":", 1)[1]).expanduser()
    test_dir = _test_dir(path)
    return test_dir if (path / "train").is_dir() and test_dir is not None else path


def _calibration_source(base: str, cfg: DataConfig, pre: Preprocess, num_classes: int | None,
                        plain_tf: ImageTransform) -> tuple[Dataset, list[str]]:
    if base.startswith("imagefolder:"):
        folder = _calibration_folder(base)
        if not folder.is_dir():
            raise PteenetError(f"calibration folder {folder} does not exist",
                               "pass imagefolder:PATH with PATH/CLASS/*.png, or PATH/train and PATH/test")
        ds = _image_folder(folder, plain_tf, pre)
        return ds, list(ds.classes)
    # Its own generator seeded like the main one: `synthetic` then yields the very images it would as --data.
    _, _, test, names = _load_source(base, cfg, pre, num_classes, torch.Generator().manual_seed(cfg.seed), plain_tf, plain_tf)
    return test, names


def _check_classes(what: str, count: int, expected: int | None, against: str = "the backbone outputs") -> None:
    if expected is not None and count != expected:
        raise PteenetError(f"{what} has {count} classes but {against} {expected}",
                           "pick the dataset the backbone was trained on, or a backbone with that many classes")


def _calibration_split(cfg: DataConfig, cal_base: str, half: int | None, test: Dataset, class_names: list[str],
                       pre: Preprocess, num_classes: int | None, plain_tf: ImageTransform,
                       gen: torch.Generator) -> tuple[Subset, list[int], int, dict[str, Any]]:
    """Val from the calibration data; the test indices (the other half where val is a half of test);
    the calibration data's size; and what ``split_info`` records of it."""
    spec = cfg.spec
    train_id, test_id = _split_ids(spec)
    cal_id = _folder_id(_calibration_folder(cal_base)) if cal_base.startswith("imagefolder:") else cal_base
    same_as_test = cal_id == test_id
    cal_ds, cal_names = (test, class_names) if same_as_test else \
        _calibration_source(cal_base, cfg, pre, num_classes, plain_tf)
    _check_classes(f"calibration data {cal_base}", len(cal_names), num_classes)
    _check_classes(f"calibration data {cal_base}", len(cal_names), len(class_names), f"dataset {spec} has")
    if spec.startswith("imagefolder:") and cal_base.startswith("imagefolder:") and cal_names != class_names:
        # Labels are indices of sorted folder names: other names would silently mean other labels.
        raise PteenetError(f"calibration folder has classes {cal_names[:5]}... but {spec} has {class_names[:5]}...",
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
        "calibration": cfg.calibration, "test_half": test_half, "calibration_overlap": overlap}


def load_splits(cfg: DataConfig, preprocess: Preprocess, num_classes: int | None = None) -> Splits:
    """Load ``cfg.spec`` preprocessed for the backbone and split it into train, calibration (val) and
    test: val carved from train, or taken from ``cfg.calibration`` (module docstring)."""
    spec = cfg.spec
    cal_base, half = parse_calibration(cfg.calibration) if cfg.calibration is not None else (None, None)
    aug_tf = ImageTransform(preprocess, cfg.augment, spec not in _NO_FLIP, cfg.crop_padding)
    plain_tf = ImageTransform(preprocess)
    gen = torch.Generator().manual_seed(cfg.seed)
    train_aug, train_plain, test, class_names = _load_source(spec, cfg, preprocess, num_classes, gen, aug_tf, plain_tf)
    _check_classes(f"dataset {spec}", len(class_names), num_classes)
    n_train, n_test = len(train_aug), len(test)  # type: ignore[arg-type]
    # Val is carved from the full train set before the cap, so the calibration images do not depend on limit.
    perm = torch.randperm(n_train, generator=gen).tolist()
    source_sizes = {"train": n_train, "test": n_test}
    extra: dict[str, Any] = {"calibration": None}
    if cal_base is None:
        n_val = min(n_train - 1, max(1, round(cfg.val_split * n_train))) if cfg.val_split > 0 and n_train > 1 else 0
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
        "spec": spec, "val_split": cfg.val_split, "seed": cfg.seed, "limit": cfg.limit, "num_classes": len(class_names),
        "source_sizes": source_sizes,
        "sizes": {"train": len(train_idx), "val": len(val), "test": len(test_idx)},  # type: ignore[arg-type]
        **extra,
    }
    return Splits(train=Subset(train_aug, train_idx), val=val, test=Subset(test, test_idx),
                  class_names=class_names, split_info=info)


def make_loader(ds: Dataset, batch_size: int, shuffle: bool, workers: int = 0, seed: int = 0,
                drop_last: bool = False) -> DataLoader:
    """A DataLoader whose shuffling (and worker seeds) come from a generator seeded with ``seed``."""
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers, drop_last=drop_last,
                      generator=torch.Generator().manual_seed(seed), persistent_workers=workers > 0)


# -- the data a checkpoint was trained on ----------------------------------------------------------
DEFAULT_VAL_SPLIT = 0.1  # only for checkpoints that record no split (training's default)


@dataclass(kw_only=True)
class DataRequest:
    """The data the user named. The split itself comes from the checkpoint's record when it has
    one; ``spec`` None means "the recorded data"; ``limit`` None means "the recorded limit"."""

    spec: str | None = None
    data_dir: str | None = None
    limit: int | None = None
    download: bool = True
    calibration: str | None = None  # a DataConfig.calibration spec; None: the recorded calibration data

    def __post_init__(self) -> None:
        check_int("limit", self.limit, 1, "leave it out to use the recorded limit", optional=True)


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
            cfg = replace(cfg, spec=request.spec)
            notes.append(f"data read from {request.spec}, assumed to hold the same images as the recorded {rec}")
        if request.limit is not None and request.limit != cfg.limit:
            # Val is carved before the cap, so any limit keeps it inside the held-out images.
            notes.append(f"--limit {request.limit} replaces the recorded limit {cfg.limit}")
            cfg = replace(cfg, limit=request.limit)
        if request.calibration is not None and request.calibration != cfg.calibration:
            was = f"the recorded {cfg.calibration}" if cfg.calibration else \
                "the part of the training data held out from branch training"
            notes.append(f"calibrating on {request.calibration} instead of {was}")
            cfg = replace(cfg, calibration=request.calibration)
    else:
        if request.spec is None:
            raise PteenetError("the checkpoint records no training data", "pass --data SPEC")
        cfg = DataConfig(spec=request.spec, data_dir=request.data_dir, limit=request.limit, val_split=DEFAULT_VAL_SPLIT,
                         download=request.download, calibration=request.calibration)
        if request.calibration is None:
            notes.append(f"the checkpoint records no data split: calibrated on a fresh val_split "
                         f"{DEFAULT_VAL_SPLIT} (seed 0), which may overlap the images the branches were trained on")
    # Only val and test are used, and they are never augmented; this is for clarity.
    return replace(cfg, augment=False), notes
