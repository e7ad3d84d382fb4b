"""What a sweep checks before its pass over the data: refusals that need no data (``check_sweepable``),
the splits read as one error line where they cannot be (``read_splits``), and the warnings about
the branches' training and about the split a setting is chosen on.

``warn`` is the sweep's: it prints the warning and keeps it for the document.
"""
from __future__ import annotations

from typing import Any, Callable

from ..data import DataConfig, Splits, load_splits
from ..errors import PteenetError, describe_error
from ..evaluation.engine import below_cheapest
from ..runtime.model import EarlyExitModel


def check_sweepable(model: EarlyExitModel, budget: float | None, name: str) -> None:
    """Refuse a sweep that cannot give an answer, before any data is read."""
    if model.cost is None:
        raise PteenetError(f"{name} has no cost table", "attach the branches with `pteenet attach`")
    # No setting costs less than sending every sample out at the first exit: fail before any data.
    if budget is not None and budget < model.cost.costs()[0] - 1e-9:
        raise below_cheapest(budget, model.cost.costs()[0])


def training_warnings(model: EarlyExitModel, name: str, warn: Callable[[str], None]) -> None:
    """Warn where the branches were never trained, or their training stopped early."""
    training = model.meta.get("training")
    if not training:
        warn(f"the branches in {name} were never trained: the sweep measures random branches "
             "(run `pteenet train-branches` first)")
    elif training.get("complete") is False:
        warn(f"training of {name} stopped after {training.get('epochs_done')} epochs: "
             "the sweep measures unfinished branches")


def read_splits(model: EarlyExitModel, data_cfg: DataConfig, split: str) -> Splits:
    """The splits to sweep; an unreadable data set, or no calibration split to tune on, is one error line."""
    try:
        splits = load_splits(data_cfg, model.info.preprocess, model.info.num_classes)
    except PteenetError:
        raise
    except Exception as e:  # a corrupt file or folder: still one line, naming the data
        raise PteenetError(f"cannot read the data {data_cfg.spec}: {describe_error(e)}",
                           "check --data and --data-dir") from None
    if split == "calibration" and len(splits.calibration) == 0:  # type: ignore[arg-type]
        raise PteenetError("the calibration split is empty: the branches were trained without one",
                           "retrain with --calibration-split > 0 or --calibration SPEC, or pass --split test (selection then uses test)")
    return splits


# Without a criterion the sweep only draws the curve, and with every exit deciding: at batch 1 the
# heads of exits that never pay are priced in (on CIFAR ResNet-56 with 27 heads the cheapest point
# within 1 pt then cost 1.056 of the backbone, against 0.860 chosen with --max-drop 1;
# benchmarks/results/new_user.json).
NO_CRITERION = ("no --max-drop or --budget: nothing is chosen, and on this curve every exit decides and is paid for "
                "(choosing which exits decide needs a criterion); --max-drop P chooses the exits too, and certifies the drop")


def calibration_warnings(split_info: dict[str, Any], split: str, choosing: bool, warn: Callable[[str], None]) -> None:
    """Warn where the split a setting is chosen on makes its reported numbers optimistic."""
    if choosing and split == "test":
        warn("the setting is chosen on the test split, so its test numbers are optimistic "
             "(--split calibration chooses on the calibration split and reports test separately)")
    calibration, overlap = split_info.get("calibration"), split_info.get("calibration_overlap")
    if choosing and split == "calibration" and overlap == "test":
        warn(f"the calibration data {calibration} is the test split: the setting is chosen on the images it is "
             f"reported on, so its test numbers are optimistic (--calibration {calibration}#half=0 "
             "calibrates on one half and reports on the other)")
    if split == "calibration" and overlap == "train":
        warn(f"the calibration data {calibration} is the training split: the branches were trained on it, and a "
             "backbone fine-tuned on it has memorised it (calibrate on images neither has seen)")
