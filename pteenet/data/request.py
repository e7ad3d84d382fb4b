"""The data a checkpoint was trained on: what the user asked for (``DataRequest``) resolved against
the split the checkpoint records, for the sweep and the bench to rebuild the same calibration split."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..configs import check_int
from ..errors import PteenetError
from .config import DataConfig

DEFAULT_CALIBRATION_SPLIT = 0.1  # only for checkpoints that record no split (training's default)
DEFAULT_VAL_SPLIT = DEFAULT_CALIBRATION_SPLIT  # its earlier name


@dataclass(kw_only=True)
class DataRequest:
    """The data the user named. The split itself comes from the checkpoint's record when it has
    one; ``spec`` None means "the recorded data"; ``limit`` None means "the recorded limit"."""

    spec: str | None = None
    data_dir: str | None = None
    limit: int | None = None
    download: bool = True
    calibration: str | None = None  # a DataConfig.calibration spec; None: the recorded calibration data
    strict_images: bool = False  # an image file that cannot be decoded is an error, not skipped

    def __post_init__(self) -> None:
        check_int("limit", self.limit, 1, "leave it out to use the recorded limit", optional=True)


def _same_spec(asked: str, recorded: str) -> bool:
    if asked.split(":", 1)[0] == recorded.split(":", 1)[0] and asked.startswith(("imagefolder:", "images:")):
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
            cfg = DataConfig.from_split_info(recorded, request.data_dir, request.download, request.strict_images)
        except (KeyError, TypeError):
            raise PteenetError("the checkpoint's data record is incomplete (needs spec, val_split, seed, limit)",
                               "retrain the branches with `pteenet train-branches`") from None
        if request.spec is not None and request.spec != rec:
            cfg = replace(cfg, spec=request.spec)
            notes.append(f"data read from {request.spec}, assumed to hold the same images as the recorded {rec}")
        if request.limit is not None and request.limit != cfg.limit:
            # The calibration split is carved before the cap, so any limit keeps it inside the held-out images.
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
        cfg = DataConfig(spec=request.spec, data_dir=request.data_dir, limit=request.limit, calibration_split=DEFAULT_CALIBRATION_SPLIT,
                         download=request.download, calibration=request.calibration, strict_images=request.strict_images)
        if request.calibration is None:
            notes.append(f"the checkpoint records no data split: calibrated on a fresh calibration split "
                         f"{DEFAULT_CALIBRATION_SPLIT} (seed 0), which may overlap the images the branches were trained on")
    # Only calibration and test are used, and they are never augmented; this is for clarity.
    return replace(cfg, augment=False), notes
