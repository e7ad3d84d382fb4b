"""What data to load and how to split it (``splits.py`` says what each field does), and which
dataset specs exist (``sources.py`` loads them)."""
from __future__ import annotations

import re
import warnings
from dataclasses import InitVar, dataclass
from typing import Any, ClassVar

from ..configs import Config, check_int, check_number, setting
from ..errors import PteenetError, unknown_name

DEFAULT_TEST_SPLIT = 0.1
# torchvision's datasets: the folder under the data dir and the files torchvision needs there (for
# the "not found" message).
TORCHVISION_FILES = {
    "cifar10": ("cifar-10-batches-py", ["data_batch_1..5", "test_batch"]),
    "cifar100": ("cifar-100-python", ["train", "test", "meta"]),
    "svhn": (".", ["train_32x32.mat", "test_32x32.mat"]),
    "mnist": ("MNIST/raw", ["train-images-idx3-ubyte", "t10k-images-idx3-ubyte", "(+ labels)"]),
    "fashion-mnist": ("FashionMNIST/raw", ["train-images-idx3-ubyte", "t10k-images-idx3-ubyte", "(+ labels)"]),
}
FOLDER_PREFIXES = ("imagefolder:", "images:")
KNOWN_SPECS = [*TORCHVISION_FILES, "imagefolder:PATH", "images:PATH", "synthetic"]
_HALF_SUFFIX = re.compile(r"#half=(\w*)$")


def is_known(spec: str) -> bool:
    return spec in TORCHVISION_FILES or spec == "synthetic" or spec.startswith(FOLDER_PREFIXES)


def parse_calibration(text: str) -> tuple[str, int | None]:
    """``SPEC`` or ``SPEC#half=0|1`` -> (SPEC, None or the half)."""
    m = _HALF_SUFFIX.search(text)
    if m is None:
        return text, None
    if m.group(1) not in ("0", "1") or not text[:m.start()]:
        raise PteenetError(f"bad calibration spec '{text}'", "use SPEC, SPEC#half=0 or SPEC#half=1")
    return text[:m.start()], int(m.group(1))


@dataclass(kw_only=True)
class DataConfig(Config):
    """Which data to load and how to split it; ``limit`` caps every split (for quick tries and tests)."""

    spec: str
    data_dir: str | None = setting(None, resume="free")  # where the files are: may move between runs
    limit: int | None = None
    augment: bool = True
    # The calibration split: ``calibration_split`` of train held out (``--calibration-split``), or, with
    # ``calibration``, data from that spec instead (``--calibration SPEC``). Records written before
    # the rename call it ``val_split`` (``RENAMED``; ``split_info`` keeps that key).
    RENAMED: ClassVar[dict[str, str]] = {"val_split": "calibration_split"}
    calibration_split: float = 0.1
    seed: int = 0
    download: bool = setting(True, resume="free")
    crop_padding: int | None = None  # random-crop padding; None: 4 px at 32 px, scaled with the image size
    calibration: str | None = None  # the calibration split from this spec (splits.py) instead of carved from train
    test_split: float = DEFAULT_TEST_SPLIT  # of a single folder, the share that is test (splits.py)
    # An image file that cannot be decoded is an error, not skipped: how a run reacts, not what it computes.
    strict_images: bool = setting(False, resume="free")
    # calibration_split's old keyword, deprecated; an argument only (reading ``.val_split`` is not supported:
    # ``dataclasses.replace`` would pass it back in)
    val_split: InitVar[float | None] = None

    def __post_init__(self, val_split: float | None) -> None:
        if val_split is not None:
            warnings.warn("DataConfig(val_split=...) is now DataConfig(calibration_split=...)", DeprecationWarning,
                          stacklevel=3)
            self.calibration_split = val_split
        if not isinstance(self.spec, str) or not is_known(self.spec):
            raise unknown_name("dataset", str(self.spec), KNOWN_SPECS)
        check_int("limit", self.limit, 1, "leave it out to use all the data", optional=True)
        check_number("calibration_split", self.calibration_split, 0, 1, high_open=True,
                     hint="the calibration split is a fraction of train, e.g. --calibration-split 0.1")
        check_number("test_split", self.test_split, 0, 1, low_open=True, high_open=True,
                     hint="the share of a single folder held out as test, e.g. --test-split 0.1")
        check_int("seed", self.seed, None)
        check_int("crop_padding", self.crop_padding, 0, optional=True)
        if self.calibration is not None:
            base, _ = parse_calibration(self.calibration)
            if not is_known(base):  # before loading the training data, which can take a while
                raise unknown_name("calibration dataset", base, KNOWN_SPECS)

    @classmethod
    def from_split_info(cls, info: dict[str, Any], data_dir: str | None = None, download: bool = True,
                        strict_images: bool = False) -> "DataConfig":
        """The config that rebuilds the split recorded in a checkpoint (``Splits.split_info``); records
        older than ``calibration`` have no such key and carved the calibration split from train."""
        return cls(spec=info["spec"], data_dir=data_dir, limit=info["limit"], calibration_split=info["val_split"],
                   seed=info["seed"], download=download, calibration=info.get("calibration"),
                   test_split=info.get("test_split") or DEFAULT_TEST_SPLIT, strict_images=strict_images)
