"""Datasets for training exits and sweeping thresholds: train / held-out calibration / test splits.

Specs (``sources.py``): ``cifar10``, ``cifar100``, ``svhn``, ``mnist``, ``fashion-mnist`` (torchvision),
``imagefolder:PATH`` (``PATH/train`` plus ``PATH/test`` or ``PATH/val``, or one folder of class
folders), ``images:PATH`` (image files without labels, at any depth) and ``synthetic``. Every item is
``(float tensor C x H x W normalised as the backbone expects, int label)``, the label
``UNLABELLED`` (-1) for images without labels. How the splits are made: ``splits.py``; how files are
decoded: ``files.py``; how broken files are skipped: ``loader.py``.
"""
from __future__ import annotations

from .config import KNOWN_SPECS, DataConfig, parse_calibration
from .files import UNLABELLED, files_fingerprint, image_files_of, read_image, to_backbone_mode
from .loader import SKIPPED, ImageSkipped, Loader, Undecodable, make_loader
from .request import DEFAULT_CALIBRATION_SPLIT, DEFAULT_VAL_SPLIT, DataRequest, resolve_data
from .sources import DEBIAN_FASHION_DIR, DEFAULT_DATA_DIR, SYNTHETIC_SIZES
from .splits import NO_LABELS, SPLITS, Splits, load_splits, split_name
from .transform import ImageTransform, TensorImages

__all__ = ["DEBIAN_FASHION_DIR", "DEFAULT_CALIBRATION_SPLIT", "DEFAULT_DATA_DIR", "DEFAULT_VAL_SPLIT", "KNOWN_SPECS", "NO_LABELS", "SKIPPED", "SPLITS",
           "SYNTHETIC_SIZES", "UNLABELLED", "DataConfig", "DataRequest", "ImageSkipped", "ImageTransform", "Loader",
           "Splits", "TensorImages", "Undecodable", "files_fingerprint", "image_files_of", "load_splits", "make_loader",
           "parse_calibration", "read_image", "resolve_data", "split_name", "to_backbone_mode"]
