"""``pteenet train-branches``: parse the options, call ``train_branches`` with the progress sink."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich import box
from rich.table import Table

from ..data import DataConfig
from ..training.loss import LossConfig
from ..training.run import Interrupted, TrainConfig, train_branches
from ..training.step import exit_summary, short_number
from .common import console, emit, fail, handle_errors, progress_sink
from .options import DataDirOption, DataOption, DeviceOption, JsonOption, LimitOption, StrictImagesOption


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def epoch_table(doc: dict[str, Any]) -> Table:
    """One row an epoch, narrow enough for 80 columns whatever the number of exits: per-exit
    columns show first/median/last exit beyond 3 exits (``--json`` has every exit)."""
    n = len(doc["epochs"][0]["train"]["agreement"]) if doc["epochs"] else 0
    per_exit = "per exit" if n <= 3 else f"first/median/last of {n} exits"
    table = Table(title=f"{doc['final']['output']}: {per_exit} and at T = 0.5, in % on the calibration split",
                  caption="agr = agreement with the backbone (trn: on the training batches); cost@T = mean cost / backbone's; --json: every exit and the exits' mean confidence",
                  box=box.SIMPLE_HEAD)
    # The exits' mean confidence is in --json only: ten columns of this width do not fit in 80.
    for col in ("epoch", "loss", "trn agr", "acc", "agr", "acc@T", "agr@T", "cost@T", "s"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in doc["epochs"]:
        v = r["val"] or {}
        ee = v.get("early_exit") or {}
        table.add_row(str(r["epoch"]), short_number(r["train"]["loss"]), exit_summary(r["train"]["agreement"]),
                      exit_summary(v.get("accuracy")), exit_summary(v.get("agreement")),
                      _pct(ee.get("accuracy")), _pct(ee.get("agreement")),
                      "-" if not ee else f"{ee['cost']:.3f}", f"{r['seconds']:.0f}")
    return table


@handle_errors
def train_command(
    checkpoint: Path = typer.Argument(..., help="a checkpoint written by `pteenet attach`"),
    output: Path = typer.Option(..., "-o", "--output", help="checkpoint to write after every epoch (.safetensors)"),
    data: DataOption = ...,
    data_dir: DataDirOption = None,
    limit: LimitOption = None,
    no_augment: bool = typer.Option(False, "--no-augment", help="no random crops/flips on the train split"),
    calibration_split: float = typer.Option(0.1, "--calibration-split", "--val-split",
                                            help="fraction of train held out as the calibration split (--val-split: its old name)"),
    test_split: float = typer.Option(DataConfig.test_split, "--test-split", help="of a single folder (imagefolder:PATH of class folders, images:PATH), the seeded fraction held out as test"),
    strict_images: StrictImagesOption = False,
    calibration: Optional[str] = typer.Option(
        None, "--calibration", metavar="SPEC",
        help="the calibration split (the per-epoch report, --ensemble) from this data instead of a --calibration-split of train, which "
             "then all trains: a dataset spec (its test split), imagefolder:PATH of class folders, images:PATH, any + "
             "#half=0|1 for a seeded half. Use it when the backbone was fine-tuned on these training images"),
    targets: str = typer.Option(LossConfig.targets, "--targets", help="pseudo (backbone argmax) | soft (backbone softmax) | labels"),
    temperature: float = typer.Option(LossConfig.temperature, "--temperature", help="softens the backbone's distribution for soft targets"),
    loss: str = typer.Option(LossConfig.version, "--loss", help="ce (each head on its own; confidence learns agreement) | v2 | v1 (the paper's joint losses)"),
    lam: float = typer.Option(LossConfig.lam, "--lambda", help="weight of the cost term (v1, v2)"),
    exit_ce: float = typer.Option(LossConfig.exit_ce, "--exit-ce", help="weight of a direct per-exit cross-entropy term (0: the paper's loss exactly)"),
    epochs: Optional[int] = typer.Option(
        None, "--epochs", help="default: sized from the training split, with --cache-features 10 for 45,000+ images up to 100 "
                               "for small sets (as many steps as 10 over 45,000); 20 without the cache"),
    batch_size: int = typer.Option(128, "--batch-size"),
    lr: float = typer.Option(1e-3, "--lr", help="Adam learning rate, cosine-annealed to 0 over all steps"),
    weight_decay: float = typer.Option(0.0, "--weight-decay"),
    seed: int = typer.Option(0, "--seed", help="seeds the split, the data order and the augmentation"),
    device: DeviceOption = "auto",
    workers: int = typer.Option(0, "--workers", help="data-loading processes (0: in the main process)"),
    amp: bool = typer.Option(False, "--amp", help="mixed precision (CUDA only)"),
    resume: bool = typer.Option(False, "--resume", help="continue the unfinished run in OUTPUT"),
    cache_features: bool = typer.Option(False, "--cache-features", help="run the backbone once (per view) and train from cached exit features"),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir", help="save feature caches here and reuse them in later runs on the same backbone, exits and data"),
    views: int = typer.Option(TrainConfig.views, "--views", help="augmented views of each training image in the feature cache (needs --cache-features, augmentation on)"),
    survivors: bool = typer.Option(False, "--survivors", help="train each branch only on the samples that reach it under the checkpoint's chosen exit rule (after sweep-threshold --write)"),
    ensemble: bool = typer.Option(TrainConfig.ensemble, "--ensemble/--no-ensemble", help="after training, fit an ensemble of the exits on the calibration split"),
    json_: JsonOption = False,
) -> None:
    """Train the exit branches (only them) on the frozen backbone, saving OUTPUT after every epoch."""
    data_cfg = DataConfig(spec=data, data_dir=data_dir, limit=limit, augment=not no_augment, calibration_split=calibration_split,
                          seed=seed, calibration=calibration, test_split=test_split, strict_images=strict_images)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed, device=device,
                      workers=workers, amp=amp, resume=resume, cache_features=cache_features, views=views, cache_dir=cache_dir,
                      ensemble=ensemble, survivors=survivors, loss=LossConfig(version=loss, lam=lam, targets=targets, temperature=temperature,
                                                          exit_ce=exit_ce))
    try:
        with progress_sink() as sink:
            doc = train_branches(checkpoint, output, data_cfg, cfg, sink)
    except Interrupted as e:
        fail(str(e))
        raise typer.Exit(130) from None
    emit(doc, json_, lambda doc: console.print(epoch_table(doc)) if doc["epochs"] else None)
