"""What data to load and how to split it (``splits.py`` says what each field does)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEFAULT_TEST_SPLIT = 0.1


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
    calibration: str | None = None  # val from this spec (splits.py) instead of carved from train
    test_split: float = DEFAULT_TEST_SPLIT  # of a single folder, the share that is test (splits.py)
    strict_images: bool = False  # an image file that cannot be decoded is an error, not skipped

    @classmethod
    def from_split_info(cls, info: dict[str, Any], data_dir: str | None = None, download: bool = True,
                        strict_images: bool = False) -> "DataConfig":
        """The config that rebuilds the split recorded in a checkpoint (``Splits.split_info``); records
        older than ``calibration`` have no such key and carved val from train."""
        return cls(spec=info["spec"], data_dir=data_dir, limit=info["limit"], val_split=info["val_split"],
                   seed=info["seed"], download=download, calibration=info.get("calibration"),
                   test_split=info.get("test_split") or DEFAULT_TEST_SPLIT, strict_images=strict_images)
