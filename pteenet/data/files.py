"""Image files on disk: finding them, decoding them to what the backbone takes, and datasets of them.

Every file is decoded to the backbone's channel count, 1 (greyscale, "L") or 3 (RGB), as 8 bits a
channel, which is what its preprocessing (pixels / 255, then mean and std) expects:
- 16-bit greyscale (PNG, TIFF: PIL modes I;16*, I) is scaled by 255/65535, not clipped at 255 as
  PIL's own conversion does, which would turn most of such an image white;
- transparency (RGBA, LA, palette images with a transparent colour) is composited over white: the
  colour hidden under a transparent pixel is often black or noise, and converting alone would keep it;
- CMYK, YCbCr, palette, 1-bit and the rest go through PIL's conversion to RGB or L.
"""
from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from ..errors import PteenetError, describe_error
from .loader import Undecodable

EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
UNLABELLED = -1  # the label of an image from a folder without labels
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA = ("RGBA", "LA", "RGBa", "La", "PA")


def to_backbone_mode(im: "Image.Image", channels: int) -> "Image.Image":  # type: ignore[name-defined]  # noqa: F821
    """``im`` as an 8-bit "L" (channels 1) or "RGB" (channels 3) image (module docstring)."""
    from PIL import Image

    if im.mode in _SIXTEEN_BIT:
        a = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(np.rint(a * (255 / 65535)), 0, 255).astype(np.uint8), "L")
    elif im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in _ALPHA:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    return im.convert("L" if channels == 1 else "RGB")


def read_image(path: str, channels: int) -> torch.Tensor:
    """The file decoded to a uint8 tensor (channels, h, w)."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    with Image.open(path) as im:
        return pil_to_tensor(to_backbone_mode(im, channels))


class ImageFiles(Dataset):
    """``(path, label)`` samples decoded per item and transformed; a file that cannot be decoded is
    returned as an ``Undecodable`` record (``loader.py`` skips it, or raises when ``strict``)."""

    def __init__(self, samples: list[tuple[str, int]], channels: int, transform: Callable[[torch.Tensor], torch.Tensor],
                 strict: bool = False, root: str | None = None) -> None:
        self.samples, self.channels, self.transform, self.strict = samples, channels, transform, strict
        self.root = root  # the folder the samples were found in, for messages and tests

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | Undecodable:
        path, label = self.samples[i]
        try:
            img = read_image(path, self.channels)
        except Exception as e:  # truncated, corrupt, not an image at all, too large: all the same to the run
            return Undecodable(path, describe_error(e), self.strict)
        return self.transform(img), label


def _is_image(name: str) -> bool:
    return name.lower().endswith(EXTENSIONS) and not name.startswith(".")


def image_paths(folder: Path) -> list[str]:
    """Every image file under ``folder``, at any depth, sorted (so that splits are reproducible)."""
    found = [os.path.join(root, f) for root, dirs, files in os.walk(folder, followlinks=True)
             for f in files if _is_image(f)]
    return sorted(found)


def class_folders(folder: Path) -> list[str]:
    """The sorted names of ``folder``'s subfolders (its classes), hidden ones left out."""
    try:
        return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    except OSError as e:
        raise PteenetError(f"cannot read the image folder {folder}: {e}", "pass an existing folder") from None


def labelled_samples(folder: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """``folder/CLASS/**/image`` -> ((path, index of CLASS) samples, class names); as torchvision's
    ImageFolder, but images may sit at any depth under their class folder."""
    classes = class_folders(folder)
    if not classes:
        raise PteenetError(f"{folder} has no class folders", f"lay it out as {folder}/CLASS/*.png "
                           "(or use images:PATH for images without labels)")
    samples = [(p, k) for k, c in enumerate(classes) for p in image_paths(folder / c)]
    counts = Counter(k for _, k in samples)
    empty = [c for k, c in enumerate(classes) if not counts[k]]
    if empty:
        raise PteenetError(f"class folder{'s' if len(empty) > 1 else ''} {', '.join(empty[:5])} in {folder} "
                           "hold no images", f"image files end in {', '.join(EXTENSIONS)}")
    return samples, classes


def unlabelled_samples(folder: Path) -> list[tuple[str, int]]:
    if not folder.is_dir():
        raise PteenetError(f"image folder {folder} does not exist", "images:PATH takes a folder of images, at any depth")
    samples = [(p, UNLABELLED) for p in image_paths(folder)]
    if not samples:
        raise PteenetError(f"found no images under {folder}", f"image files end in {', '.join(EXTENSIONS)}")
    return samples


def image_files_of(ds: Dataset) -> tuple[ImageFiles, list[int]] | None:
    """The ``ImageFiles`` under ``ds`` (through any ``Subset``s) and the indices of it that ``ds``
    holds, in order; None when ``ds`` is not made of image files (images in memory)."""
    indices: list[int] | None = None
    while isinstance(ds, Subset):
        indices = list(ds.indices) if indices is None else [ds.indices[i] for i in indices]
        ds = ds.dataset
    if not isinstance(ds, ImageFiles):
        return None
    return ds, list(range(len(ds))) if indices is None else indices


def files_fingerprint(ds: Dataset) -> str | None:
    """A hash of the image files ``ds`` reads: path, size and modification time of each, so that a
    file replaced, repaired, added or removed gives another hash (a feature cache built from the old
    files is then not reused). A small fraction of the time decoding them takes
    (benchmarks/results/cache_key_cost.json). None: not image files."""
    found = image_files_of(ds)
    if found is None:
        return None
    files, indices = found
    h = hashlib.sha256()
    for i in indices:
        path = files.samples[i][0]
        try:
            st = os.stat(path)
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{path}\0missing\n".encode())
    return h.hexdigest()
