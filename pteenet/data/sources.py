"""Where the images of a dataset spec come from: torchvision's datasets, folders of image files, or
generated ones.

- ``cifar10``, ``cifar100``, ``svhn``, ``mnist``, ``fashion-mnist``: torchvision's train and test
  splits, held in memory;
- ``imagefolder:PATH``: ``PATH/train/CLASS/*`` with ``PATH/test/CLASS/*`` (or ``PATH/val``), or one
  folder of class folders ``PATH/CLASS/*`` (a single split: ``load_splits`` carves test from it);
- ``images:PATH``: every image file under PATH, at any depth, without labels (a single split);
- ``synthetic``: generated class templates plus noise, for tests and quick tries.
"""
from __future__ import annotations

import gzip
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..backbones.specs import Preprocess
from ..errors import PteenetError, first_line, unknown_name
from .config import FOLDER_PREFIXES, KNOWN_SPECS, DataConfig
from .config import TORCHVISION_FILES as _TORCHVISION
from .files import ImageFiles, labelled_samples, unlabelled_samples
from .transform import ImageTransform, TensorImages

DEFAULT_DATA_DIR = Path("~/.cache/pteenet/data")
# Debian's dataset-fashion-mnist package installs the four original idx .gz files here.
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
SYNTHETIC_SIZES = {"train": 500, "test": 100}


@dataclass
class Source:
    """One spec's images: train, as augmented and as plain views of the same images, and test.
    ``test`` None: a single folder, of which ``load_splits`` carves a test split. ``class_names``
    None: the images have no labels (each label is ``files.UNLABELLED``)."""

    train_aug: Dataset
    train_plain: Dataset
    test: Dataset | None
    class_names: list[str] | None


def folder_of(spec: str) -> Path:
    return Path(spec.split(":", 1)[1]).expanduser()


def test_dir(base: Path) -> Path | None:
    return next((base / d for d in ("test", "val") if (base / d).is_dir()), None)


def has_splits(spec: str) -> bool:
    """An ``imagefolder:PATH`` laid out as PATH/train plus PATH/test (or PATH/val)."""
    base = folder_of(spec)
    return spec.startswith("imagefolder:") and (base / "train").is_dir() and test_dir(base) is not None


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
        detail = (first_line(e) or type(e).__name__).rstrip(":")
        # torchvision's own "use download=True" advice means nothing to a CLI user, so it is left out.
        reason = f"download failed: {detail}" if cfg.download else "downloads are off"
        raise PteenetError(
            f"{spec} not found in {(root / folder).resolve()} (looked for {', '.join(files)}); {reason}",
            "run once online with downloads on, or put the files there, or pass --data-dir"
            + (" (apt-get install dataset-fashion-mnist also works)" if spec == "fashion-mnist" else ""),
        ) from None
    return train, test, train[2]


def folder_images(spec: str, pre: Preprocess, transform: ImageTransform, strict: bool,
                  folder: Path | None = None) -> tuple[ImageFiles, list[str] | None]:
    """The images of an ``imagefolder:`` (class folders) or ``images:`` (no labels) spec, or of
    ``folder`` read that way; with the class names (None: no labels)."""
    folder = folder or folder_of(spec)
    if spec.startswith("images:"):
        return ImageFiles(unlabelled_samples(folder), pre.input_size[0], transform, strict, str(folder)), None
    if not folder.is_dir():
        raise PteenetError(f"image folder {folder} does not exist",
                           "pass imagefolder:PATH with PATH/CLASS/*.png, or PATH/train and PATH/test")
    samples, classes = labelled_samples(folder)
    return ImageFiles(samples, pre.input_size[0], transform, strict, str(folder)), classes


def _load_folder(spec: str, pre: Preprocess, aug_tf: ImageTransform, plain_tf: ImageTransform, strict: bool) -> Source:
    if not has_splits(spec):
        train_aug, names = folder_images(spec, pre, aug_tf, strict)
        train_plain, _ = folder_images(spec, pre, plain_tf, strict)
        return Source(train_aug, train_plain, None, names)
    base = folder_of(spec)
    tdir = test_dir(base)
    assert tdir is not None
    train_aug, names = folder_images(spec, pre, aug_tf, strict, base / "train")
    train_plain, _ = folder_images(spec, pre, plain_tf, strict, base / "train")
    test, test_names = folder_images(spec, pre, plain_tf, strict, tdir)
    if test_names != names:
        raise PteenetError(f"{tdir} has classes {(test_names or [])[:5]}... but {base / 'train'} has {(names or [])[:5]}...",
                           "the test folder must have the same class folders as train")
    return Source(train_aug, train_plain, test, names)


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


def load_source(spec: str, cfg: DataConfig, pre: Preprocess, num_classes: int | None, gen: torch.Generator,
                aug_tf: ImageTransform, plain_tf: ImageTransform) -> Source:
    """The images of one dataset spec (module docstring)."""
    if spec in _TORCHVISION:
        (tr_x, tr_y, _), (te_x, te_y, _), class_names = _load_torchvision(spec, cfg)
        return Source(TensorImages(tr_x, tr_y, aug_tf), TensorImages(tr_x, tr_y, plain_tf),
                      TensorImages(te_x, te_y, plain_tf), class_names)
    if spec.startswith(FOLDER_PREFIXES):
        return _load_folder(spec, pre, aug_tf, plain_tf, cfg.strict_images)
    if spec == "synthetic":
        k = num_classes or 10
        templates = torch.rand(k, pre.input_size[0], 4, 4, generator=gen)
        tr_x, tr_y = _synthetic(pre, SYNTHETIC_SIZES["train"], gen, templates)
        te_x, te_y = _synthetic(pre, SYNTHETIC_SIZES["test"], gen, templates)
        return Source(TensorImages(tr_x, tr_y, aug_tf), TensorImages(tr_x, tr_y, plain_tf),
                      TensorImages(te_x, te_y, plain_tf), [f"class{i}" for i in range(k)])
    raise unknown_name("dataset", spec, KNOWN_SPECS)
