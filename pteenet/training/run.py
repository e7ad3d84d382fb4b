"""Training the exit branches, and only them, on a frozen backbone: ``train_exits`` on a model in
memory, ``train_branches`` from one checkpoint file to another (``pteenet train-branches``).

Each batch runs the backbone once under ``no_grad`` (in eval mode: BatchNorm statistics frozen) and
the branches with gradients; Adam updates branch parameters only, on a cosine schedule over all
steps. After every epoch the calibration split is scored through the evaluation engine at the
confidence threshold T = 0.5 and the output checkpoint is rewritten atomically, with everything a
``--resume`` needs under ``state.*``: optimizer moments, step and epoch counters, the torch RNG state
(augmentation) and the data-order generator state. No value depends on timing (the pooling kernels
chosen by a clock give the same bits: exits/branches.py), so the same command and seed give the
same bits whether the machine is idle or loaded, and a resumed run ends bit-identical to one that
was never interrupted, wherever it was stopped (tests/test_resume_anywhere.py), on the same CPU,
thread count and torch version: ``training`` records them, and a resume warns where one differs.
When training completes the final checkpoint drops ``state.*``
(a finished cosine schedule has nothing left to resume) and records ``training.complete = true``.

``--cache-features`` runs the backbone once over the train and calibration splits (``views`` passes over train when
it is augmented), keeps what the branches read in memory as float16 and trains every epoch from it: the backbone, the
floor of every other mode, then costs one pass per view instead of one per epoch.

With ``ensemble`` (the default), once the heads are trained an ``Ensemble`` is fitted on the
calibration split, which the heads never trained on, and saved with the final checkpoint.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .. import distributed, evaluation
from ..backbones.weights import module_sha256
from ..configs import check_parent_folder
from ..data import SKIPPED, DataConfig, Splits, load_splits
from ..devices import resolve_device
from ..distributed import ALONE, Group
from ..errors import PteenetError
from ..progress import SILENT, Sink
from ..runtime.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from ..runtime.model import EarlyExitModel
from . import ddp as ddp_branches
from . import feature_cache as feature_store
from .batches import Autocast, FeatureCache, ImageSource, fit_ensemble_on
from .config import (
    Interrupted,
    TrainConfig,
    check_resume,
    check_survivors,
    run_settings,
    small_data_warning,
    unfinished_run,
    with_epochs,
)
from .step import (
    BranchTrainer,
    Meter,
    cache_metrics,
    check_diverged,
    epoch_text,
    numerics_record,
    rng_state,
    running_text,
    set_rng_state,
    warn_numerics_changed,
)

MAX_SKIPPED_LISTED = 100  # undecodable image files named in the checkpoint (all are counted)


def evaluate_split(model: EarlyExitModel, source: ImageSource | FeatureCache, device: torch.device,
                   autocast: Autocast, threshold: float, sink: Sink, group: Group = ALONE) -> dict[str, Any] | None:
    """Per-exit and early-exit metrics on a split (None when it is empty), branches in eval mode;
    under several processes each rank scores its shard and every rank gets the whole split's metrics."""
    if not group.active and len(source) == 0:
        return None
    model.eval()
    builder = evaluation.ExitCacheBuilder()
    with sink.task("calibration split", len(source)) as task, torch.no_grad():
        for out, y in source.batches(model, device, torch.Generator(), autocast):
            builder.add_outputs(out, y)
            task.advance()
    if not group.active:
        return cache_metrics(builder.build_for(model), threshold)
    cache = evaluation.gather_exit_cache(builder, source.rows or [], model, group, to_main_only=False)
    return None if cache is None else cache_metrics(cache, threshold)


def _summary(history: list[dict[str, Any]], out_path: Path | None, training: dict[str, Any], sha: str,
             already_complete: bool) -> dict[str, Any]:
    last = history[-1] if history else {}
    return {"epochs": history, "final": {
        "output": None if out_path is None else str(out_path), "epochs_done": training.get("epochs_done"),
        "complete": training.get("complete"), "already_complete": already_complete, "seconds": training.get("seconds"),
        "backbone_sha256": sha, "train": last.get("train"), "val": last.get("val"),
        "skipped_images": training.get("skipped_images")}}


def _device(cfg: TrainConfig, data_cfg: DataConfig) -> torch.device:
    """The device to train on, after the one check that needs both configs (each checked itself
    when it was built); cheap and silent, so safe to repeat."""
    if cfg.views > 1 and not data_cfg.augment:
        raise PteenetError(f"--views {cfg.views} needs --cache-features with augmentation on",
                           "views are augmented copies of each training image held in the feature cache")
    return resolve_device(cfg.device)


def _check_run(model: EarlyExitModel, cfg: TrainConfig, device: torch.device, group: Group, out_path: Path | None,
               resume_state: dict[str, torch.Tensor] | None, source: str | None, sink: Sink) -> TrainConfig:
    """Refuse a run that cannot start, before any data is read; returns the config to run (``--amp``
    dropped where ``--device auto`` found no CUDA)."""
    if cfg.resume and resume_state is None:
        raise PteenetError("resume=True continues a run saved in a file, but no resume state was given",
                           "call train_branches(..., resume=True), or pass resume_state=load_checkpoint(path).state")
    resume = resume_state is not None
    if resume_state is not None and "epoch" not in resume_state:
        raise PteenetError("the resume state holds no epoch counter", "pass the state of an unfinished run")
    if resume:
        distributed.check_resume_world(model.meta.get("training", {}), group)
        warn_numerics_changed(model, sink)
    if model.cost is None or model.num_exits < 1:
        raise PteenetError(f"{source or 'the model'} has no exits to train",
                           "create it with `pteenet attach BACKBONE --exits N`")
    check_survivors(cfg, model.meta, source)  # before any data is read
    if out_path is not None:
        check_parent_folder("output", out_path)
        if not resume and (tr := unfinished_run(out_path)) is not None:
            raise PteenetError(f"{out_path} holds an unfinished run "
                               f"(epoch {tr.get('epochs_done')} of {(tr.get('config') or tr).get('epochs')})",
                               "add --resume to continue it, or delete it / pick another -o to start over")
    if cfg.amp and device.type != "cuda":  # only with --device auto: TrainConfig refuses the rest
        sink.warn("--amp needs CUDA, which is not available: training in float32")
        cfg = dataclasses.replace(cfg, amp=False)
    return cfg


def _load_training_splits(model: EarlyExitModel, data: DataConfig, cfg: TrainConfig, group: Group) -> Any:
    """The train and calibration splits, refused where they cannot be sharded or lack the labels
    that ``--targets labels`` learns from."""
    splits = load_splits(data, model.info.preprocess, model.info.num_classes)
    distributed.check_shardable(len(splits.train), cfg.batch_size, group)  # type: ignore[arg-type]
    unlabelled = [what for what, key in (("training", "labelled"), ("calibration", "calibration_labelled"))
                  if not splits.split_info.get(key, True)]
    if cfg.loss.targets == "labels" and unlabelled:
        raise PteenetError(f"--targets labels needs labels, but the {' and '.join(unlabelled)} data has none",
                           "use --targets soft or pseudo: they learn from the backbone's predictions, no labels needed")
    return splits


def _sources(model: EarlyExitModel, splits: Splits, data: DataConfig, cfg: TrainConfig, device: torch.device,
             group: Group, sink: Sink) -> tuple[ImageSource | FeatureCache, ImageSource | FeatureCache]:
    """Where the train and calibration batches come from: the images, or their cached features."""
    if cfg.cache_features:
        return _feature_caches(model, splits, data, cfg, device, group, sink)
    return (ImageSource(splits.train, cfg.batch_size, cfg.workers, cfg.seed, shuffle=True, group=group),
            ImageSource(splits.calibration, cfg.batch_size, cfg.workers, cfg.seed, shuffle=False, group=group))


@dataclasses.dataclass(kw_only=True)
class _RunRecord:
    """What the run has done so far: kept in the model's meta and, with an output file, saved after
    every epoch (and after the ensemble fit)."""

    model: EarlyExitModel
    out_path: Path | None
    group: Group
    device: torch.device
    settings: dict[str, Any]
    source: str | None
    data: dict[str, Any]  # the split record (``meta["data"]``)
    skipped_before: Any  # SKIPPED.mark() as the run began reading images
    history: list[dict[str, Any]]
    seconds_before: float  # training time of the run being resumed
    epoch: int  # the epoch in progress (0-based), named if the run is stopped
    last_saved: int | None  # the epochs the output file holds, None when it was not written
    started: float  # time.perf_counter() as the run began (feature caching counts as training time)
    training: dict[str, Any] = dataclasses.field(default_factory=dict)  # the last ``meta["training"]``

    def meta(self, epochs_done: int, complete: bool) -> dict[str, Any]:
        """The ``meta["training"]`` record of the run at this point."""
        skipped = SKIPPED.since(self.skipped_before)
        return {**self.settings, "device": str(self.device), "world_size": self.group.world, "epochs_done": epochs_done,
                "complete": complete, "source": self.source,
                "seconds": self.seconds_before + time.perf_counter() - self.started,
                **numerics_record(),
                "skipped_images": {"count": len(skipped), "files": skipped[:MAX_SKIPPED_LISTED]}}

    def save(self, epochs_done: int, complete: bool,
             state: Callable[[], dict[str, torch.Tensor]] | None = None) -> None:
        """Record the progress in the model's meta and write the output file, resumable unless
        ``complete`` (``state`` is only taken when the file is written)."""
        self.training = self.meta(epochs_done, complete)
        self.model.meta.update(training=self.training, history=self.history, data=self.data)
        if self.out_path is None:
            return
        snapshot = None if complete or state is None else state()  # on every rank: it gathers their RNG states
        if self.group.main:
            save_checkpoint(self.out_path, self.model, snapshot)
        distributed.barrier(self.group)  # no rank goes on (or stops) before the file is whole
        self.last_saved = epochs_done

    def kept(self) -> str:
        """What the output holds, for an error that stops the run."""
        return f"{self.out_path} keeps epoch {self.last_saved}, the last good one" if self.last_saved else "nothing was saved"

    def stopped(self) -> Interrupted:
        """The error for Ctrl-C: which epoch it hit and what the output file still holds."""
        if self.out_path is None:
            return Interrupted(f"interrupted in epoch {self.epoch + 1}; the model holds its branches as they were",
                               "pass checkpoint_to to keep every finished epoch")
        held = f"{self.out_path} holds epoch {self.last_saved}" if self.last_saved else f"{self.out_path} was not written"
        return Interrupted(f"interrupted in epoch {self.epoch + 1}; {held}",
                           "continue with --resume" if self.last_saved else None)

    def lost_peer(self, epochs: int) -> PteenetError:
        """The error for a failed collective under torchrun (another rank is gone)."""
        held = f"{self.out_path} holds epoch {self.last_saved}" if self.last_saved else "nothing was saved"
        phase = "the ensemble fit" if self.last_saved == epochs else f"epoch {self.epoch + 1}"
        return distributed.lost_peer(phase, held)


def _start_run(model: EarlyExitModel, data: DataConfig, cfg: TrainConfig, device: torch.device, group: Group,
               out_path: Path | None, resume_state: dict[str, torch.Tensor] | None,
               source: str | None) -> tuple[_RunRecord, Splits, TrainConfig]:
    """Read the splits and open the run's record (a fresh one, or the resumed run's history and
    time); the model moves to ``device``. Returns the record, the splits and the config with its
    epochs resolved from the training split's size."""
    resume = resume_state is not None
    if not resume:
        # Retraining a trained checkpoint: its ensemble and exit selection belong to the old heads.
        model.set_ensemble(None)
        model.set_active(None)
    splits = _load_training_splits(model, data, cfg, group)
    cfg = with_epochs(cfg, len(splits.train), model.meta.get("training") if resume else None)  # type: ignore[arg-type]
    settings = run_settings(cfg, data)
    skipped_before = SKIPPED.mark()
    # The class names travel with the record, so that an export can name the classes of its file.
    data_record = {**splits.split_info, "class_names": None if splits.class_names is None else list(splits.class_names)}
    model.to(device)
    start_epoch = int(resume_state["epoch"]) if resume_state is not None else 0
    run = _RunRecord(model=model, out_path=out_path, group=group, device=device, settings=settings, source=source,
                     data=data_record, skipped_before=skipped_before,
                     history=list(model.meta.get("history", [])) if resume else [],
                     seconds_before=float(model.meta.get("training", {}).get("seconds", 0.0)) if resume else 0.0,
                     epoch=start_epoch, last_saved=start_epoch if resume else None, started=time.perf_counter())
    return run, splits, cfg


def _one_epoch(model: EarlyExitModel, trainer: BranchTrainer, train_src: ImageSource | FeatureCache,
               val_src: ImageSource | FeatureCache, order: torch.Generator, epoch: int, cfg: TrainConfig,
               device: torch.device, group: Group, sink: Sink, kept: str) -> dict[str, Any]:
    """Train the branches one pass over the training split, then score the calibration split;
    returns the epoch's history record. Stops a diverged run (``kept``: what the output holds)."""
    t0 = time.perf_counter()
    model.train()
    meter = Meter()
    with sink.task(f"epoch {epoch + 1}/{cfg.epochs}", len(train_src)) as task:
        for out, y in train_src.batches(model, device, order, trainer.autocast):
            meter.add(trainer.step(out, y), len(y))
            task.advance(info=running_text(meter.means()))
    meter.sums, meter.n = distributed.sum_arrays(meter.sums, meter.n, group)
    check_diverged(meter.means(), model.info.num_classes, epoch + 1, kept)
    val = evaluate_split(model, val_src, device, trainer.autocast, cfg.threshold, sink, group)
    return {"epoch": epoch + 1, "lr": trainer.optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - t0, "train": meter.means(), "val": val}


def _check_backbone_unchanged(model: EarlyExitModel) -> str:
    """The backbone's hash, refused where training changed it (``save_checkpoint`` refuses this too;
    never let it pass silently)."""
    sha = module_sha256(model.backbone)
    if sha != model.backbone_sha256:
        raise PteenetError("the backbone changed during training", "this is a bug in pteenet: please report it")
    return sha


def train_exits(model: EarlyExitModel, data: DataConfig, config: TrainConfig, sink: Sink = SILENT, *,
                checkpoint_to: str | Path | None = None, resume_state: dict[str, torch.Tensor] | None = None,
                source: str | None = None) -> dict[str, Any]:
    """Train the branches of ``model`` in place (and only them), then fit the exit ensemble.

    Returns ``{"epochs": [per-epoch records], "final": {...}}``; the records are also left in
    ``model.meta["history"]``, next to ``meta["training"]`` and ``meta["data"]`` (the split, which
    the sweep rebuilds to tune on the calibration images). The model is moved to ``config.device``.

    ``checkpoint_to``: a file rewritten atomically after every epoch with what a resume needs; an
    unfinished run already there is never overwritten. ``resume_state``: the ``state`` of such a
    file (``load_checkpoint(path).state``, with ``model`` loaded from the same file) to continue
    it exactly; ``config.resume`` is read by ``train_branches``, which checks the file's settings.
    ``source`` is recorded as ``meta["training"]["source"]``. Raises ``Interrupted`` on Ctrl-C.

    Progress goes to ``sink``: an "epochs" task, advanced once an epoch's checkpoint is written, and
    one task per pass (feature caching, each epoch, the calibration split, the ensemble fit).
    Under ``torchrun`` (``pteenet.distributed``) every rank calls this; rank 0 writes the file.
    """
    group, device = distributed.setup(_device(config, data))
    out_path = None if checkpoint_to is None else Path(checkpoint_to)
    with distributed.agreed(group):  # an error here stops every rank; rank 0 alone reports it
        cfg = _check_run(model, config, device, group, out_path, resume_state, source, sink)
        run, splits, cfg = _start_run(model, data, cfg, device, group, out_path, resume_state, source)
        if (few := small_data_warning(len(splits.train), model.info.num_classes,  # type: ignore[arg-type]
                                      splits.split_info.get("labelled", True))) is not None:
            sink.warn(few)
        train_src, val_src = _sources(model, splits, data, cfg, device, group, sink)
    trainer = BranchTrainer(model, cfg, device, cfg.epochs * len(train_src), group)
    order = torch.Generator().manual_seed(cfg.seed)  # the data order, apart from torch's global RNG
    start_epoch = run.epoch
    fit_after = cfg.ensemble and len(splits.calibration) > 0  # type: ignore[arg-type]
    if cfg.ensemble and not fit_after:
        sink.warn("no calibration split to fit the exit ensemble on: each exit answers with its own head")

    def resume_point() -> dict[str, torch.Tensor]:
        # Taken where an uninterrupted run goes on from, so a resume continues identically.
        return {**trainer.state(), **rng_state(device, order), **distributed.rank_rng_states(device, group),
                "epoch": torch.tensor(run.epoch + 1)}

    # fork_rng: seeding for reproducibility must not leak into the caller's global RNG.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed + group.rank)  # each rank its own augmentation stream
        if resume_state is not None:
            trainer.load_state(resume_state)
            set_rng_state(resume_state, device, order)
            distributed.restore_rank_rng(resume_state, device, group)
        epochs_task = sink.task("epochs", cfg.epochs, start_epoch)
        try:
            with ddp_branches.branches_in_ddp(model, group, device):
                for epoch in range(start_epoch, cfg.epochs):
                    run.epoch = epoch
                    run.history.append(_one_epoch(model, trainer, train_src, val_src, order, epoch, cfg,
                                                  device, group, sink, run.kept()))
                    # With an ensemble still to fit, the last epoch is saved resumable; the fit completes it.
                    run.save(epoch + 1, epoch + 1 == cfg.epochs and not fit_after, resume_point)
                    epochs_task.advance(info=epoch_text(run.history[-1]))
            if fit_after:
                model.set_ensemble(fit_ensemble_on(model, val_src, device, trainer.autocast,
                                                   cfg.loss.targets == "labels", sink, group))
                run.save(cfg.epochs, True)
        except KeyboardInterrupt:
            raise run.stopped() from None
        except RuntimeError as e:  # a collective failed: under torchrun, another rank is gone
            if not (group.active and distributed.is_comm_error(e)):
                raise
            raise run.lost_peer(cfg.epochs) from None
        finally:
            epochs_task.close()
    return _summary(run.history, out_path, run.training, _check_backbone_unchanged(model), False)


def _feature_caches(model: EarlyExitModel, splits: Any, data: DataConfig, cfg: TrainConfig, device: torch.device,
                    group: Group, sink: Sink) -> tuple[FeatureCache, FeatureCache]:
    """The train and val feature caches; under several processes each rank caches its shard (the
    training shard at the global batch's share per rank)."""
    caches = []
    for name in ("train", "val"):
        ds = splits.train if name == "train" else splits.calibration
        rows = None
        if group.active:
            n = len(ds)
            rows = distributed.train_rows(n, group) if name == "train" else distributed.eval_rows(n, cfg.batch_size, group)
            ds = torch.utils.data.Subset(ds, rows)
        cache = feature_store.cached_split(model, ds, splits.split_info, name,
                                           views=cfg.views if name == "train" else 1, augment=data.augment,
                                           seed=cfg.seed, batch_size=cfg.batch_size // group.world,
                                           workers=cfg.workers, amp=cfg.amp, cache_dir=cfg.cache_dir, device=device,
                                           sink=sink, shard=(group.rank, group.world) if group.active else None)
        cache.rows = rows
        caches.append(cache)
    return caches[0], caches[1]


def train_branches(checkpoint: str | Path, out_path: str | Path, data: DataConfig, config: TrainConfig,
                   sink: Sink = SILENT) -> dict[str, Any]:
    """Train the branches of ``checkpoint`` and write ``out_path`` after every epoch
    (``pteenet train-branches``): ``train_exits`` on the loaded checkpoint, plus ``config.resume``,
    which continues the unfinished run in ``out_path`` after checking that it ran from this
    checkpoint with these settings.

    Returns ``{"epochs": [per-epoch records], "final": {...}}``; the records are also the output's
    ``meta["history"]``. Raises ``Interrupted`` on Ctrl-C (the output keeps the last complete epoch).
    """
    out_path = Path(out_path)
    group, _ = distributed.setup(_device(config, data))  # the checks come before any file is read
    with distributed.agreed(group):  # every rank reads the same files: one error, from rank 0
        check_parent_folder("output", out_path)
        src_meta = read_metadata(checkpoint)
        if not src_meta.get("exits") or not src_meta.get("cost"):
            raise PteenetError(f"{checkpoint} has no exits to train", "create it with `pteenet attach BACKBONE --exits N`")
        meta = check_resume(out_path, src_meta, config, data) if config.resume else None
        if meta is not None and not meta["training"].get("complete"):
            distributed.check_resume_world(meta["training"], group)
        if meta is None or not meta["training"].get("complete"):
            ck = load_checkpoint(out_path if config.resume else checkpoint, "cpu")
            if config.resume and "epoch" not in ck.state:
                raise PteenetError(f"{out_path} has no resume state", "drop --resume to start over")
    if meta is not None and meta["training"].get("complete"):
        sink.warn(f"{out_path} is already complete ({meta['training'].get('epochs_done')} epochs): nothing to do")
        return _summary(meta.get("history", []), out_path, meta["training"], meta["backbone_sha256"], True)
    return train_exits(ck.model, data, config, sink, checkpoint_to=out_path,
                       resume_state=ck.state if config.resume else None, source=str(checkpoint))
