"""The sweep as a library: ``sweep_model`` on a model in memory, ``sweep_threshold`` on a checkpoint
file (``pteenet sweep-threshold``: load, ``sweep_model``'s work, write ``--write``). One pass over a
split, then the sweep, the choice and the outputs.

The model runs once per split (``build_cache``, ``passes.py``); every threshold, policy and per-exit search after
that is numpy over the cache (``engine.py``). Thresholds are tuned on the calibration split that
training used, rebuilt from the checkpoint's own record (``model.meta["data"]``): the part of the
training data it held out, or other data (``DataRequest.calibration`` overrides either; see
``pteenet.data.resolve_data``). So tuning never sees an image the branches were trained on and the
reported test numbers are not tuned on; where a calibration spec breaks that (it is the test split,
or the training images), we warn.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from .. import distributed
from ..configs import Config, check_choice, check_criterion, check_device, check_int, check_parent_folder
from ..data import NO_LABELS, SKIPPED, SPLITS, DataConfig, DataRequest, resolve_data, split_name
from ..devices import resolve_device
from ..distributed import Group
from ..errors import PteenetError
from ..evaluation.cache import ExitCache
from ..evaluation.engine import Point, pareto, parse_range, search_per_exit, sweep_global
from ..exits import policies as pol
from ..exits.policies import check_policy
from ..progress import SILENT, Sink
from ..runtime.checkpoint import load_checkpoint, save_checkpoint
from ..runtime.model import EarlyExitModel
from ..runtime.ort_quant import DEFAULT_QUANT_IMAGES
from . import eenet
from .choice import Choice, choose_checked, tail_meter, tail_notes
from .guarantee import CONFIDENCE, check_confidence
from .outputs import build_document, write_sweep_outputs
from .passes import build_cache, sharded_cache
from .per_class import check_per_class, fallback_warning
from .preflight import NO_CRITERION, calibration_warnings, check_sweepable, read_splits, training_warnings
from .pricing import DEPLOY_RUNTIMES, Pricing, both_costs, pricing_for
from .quantized import check_int8, int8_exits
from .selection import backbone_only, restrict

COSTS = ("macs", "time")
PER_EXIT_BUDGETS = 8  # budgets per policy for the per-exit search, spread along the global front


@dataclass(kw_only=True)
class SweepConfig(Config):
    outdir: str | None = None  # sweep.json, sweep.csv, curve.png, exits.png; None writes nothing
    split: str = "calibration"  # calibration: tune there (and report the choice on test) | test; "val" is read as calibration
    policy: str = "all"  # one of policies.POLICIES, all of them side by side, or eenet (sweep/eenet.py)
    thresholds: str = "0:1:0.01"  # START:STOP:STEP (parse_range); patience sweeps its run lengths 1..E+1
    patience: int | None = None  # the patience policy at this one run length (PABEE), not swept
    per_exit: bool = False
    per_class: bool = False  # with max_drop: one threshold per (exit, predicted class), certified (per_class.py)
    select_exits: bool | None = None  # which exits decide at all (needs a criterion); None: on when priced in time
    budget: float | None = None  # mean cumulative cost <= budget x backbone
    max_drop: float | None = None  # percentage points below the backbone
    confidence: float = CONFIDENCE  # with max_drop: certify it holds on new data with this probability; 0: off
    write: str | None = None  # checkpoint to write with the chosen setting
    batch_size: int = 256
    cost: str = "time"  # predicted time measured here at deploy_batch_size (runtime/timing.py), or "macs"
    deploy_batch_size: int = 1  # with cost "time": the batch size the time is predicted for
    deploy_runtime: str = "eager"  # with cost "time": eager (pteenet.load) or onnxruntime (export --format staged-onnx)
    profile: str | None = None  # with cost "time": a TimeProfile measured before (timing.read_profile), not measured here
    max_tail: float | None = 1.2  # exit selection: a sample that takes no exit costs at most this x (predicted; docs/speed.md)
    quantize: str | None = None  # "int8": cache, price and certify the INT8 program (quantized.py), not the FP32 model
    quant_images: int = DEFAULT_QUANT_IMAGES  # with quantize: calibration images to quantize on (structure share)
    device: str = "auto"
    workers: int = 0
    plots: bool = True

    def __post_init__(self) -> None:
        check_device(self.device)
        self.split = split_name(self.split)
        check_choice("split", self.split, SPLITS[1:])  # never the training split
        check_policy(self.policy, also=("all",))
        eenet.check_options(self.policy, self.per_exit, self.select_exits, self.quantize)
        parse_range(self.thresholds)
        check_per_class(self.per_class, self.max_drop, self.confidence, self.policy)
        self.policy = pol.with_patience(self.patience, self.policy)  # --patience T: the patience policy
        check_criterion(self.budget, self.max_drop)
        check_confidence(self.confidence)
        if self.select_exits and self.budget is None and self.max_drop is None:
            raise PteenetError("--select-exits needs a criterion", "pass --budget F or --max-drop P")
        criterion = self.budget is not None or self.max_drop is not None
        self.select_exits = self.cost == "time" and criterion if self.select_exits is None else self.select_exits
        if self.write and self.budget is None and self.max_drop is None:
            raise PteenetError("--write needs a chosen setting", "pass --budget F or --max-drop P")
        check_int("batch_size", self.batch_size, 1, "e.g. --batch-size 256")
        check_int("workers", self.workers, 0, "0 loads data in the main process")
        check_choice("cost", self.cost, COSTS)
        check_int("deploy_batch_size", self.deploy_batch_size, 1, "e.g. --deploy-batch-size 1")
        check_choice("deploy_runtime", self.deploy_runtime, DEPLOY_RUNTIMES)
        check_int8(self.quantize, self.deploy_runtime, self.cost, self.split, self.quant_images)
        if self.max_tail is not None and not (isinstance(self.max_tail, (int, float)) and self.max_tail >= 1.0):
            raise PteenetError(f"max_tail must be a number >= 1, got {self.max_tail!r}", "e.g. --max-tail 1.2")

    def grid(self) -> np.ndarray:  # the thresholds to try: ``thresholds`` parsed, or the one ``patience``
        return parse_range(self.thresholds) if self.patience is None else np.array([float(self.patience)])

    @property
    def policies(self) -> list[str]:
        """The policies to sweep (eenet alone: ``sweep_eenet``)."""
        return list(pol.POLICIES) if self.policy == "all" else [self.policy]


def _per_exit_budgets(glob: list[Point], budget: float | None) -> list[float]:
    """Costs of evenly spread points of the global front, plus the requested budget: each is
    reachable by a global point, so the search always has a feasible start."""
    front = pareto(glob)
    picks = np.unique(np.linspace(0, len(front) - 1, min(PER_EXIT_BUDGETS, len(front))).round().astype(int))
    budgets = {front[i].cost for i in picks}
    if budget is not None and budget >= min(p.cost for p in glob) - 1e-9:
        budgets.add(budget)
    return sorted(budgets)


def sweep_points(cache: ExitCache, policies: list[str], grid: np.ndarray, per_exit: bool = False,
                 budget: float | None = None) -> tuple[list[Point], dict[str, list[float]]]:
    """Global sweeps of every policy and, with ``per_exit``, per-exit searches on the SAME grid
    (so a per-exit point is never worse than the best global point at its budget)."""
    points: list[Point] = []
    budgets: dict[str, list[float]] = {}
    for policy in policies:
        own = pol.grid_for(policy, grid, cache.num_exits)
        glob = sweep_global(cache, policy, own)
        points += glob
        if per_exit and cache.num_exits > 1:  # one exit: per-exit is the global sweep
            budgets[policy] = _per_exit_budgets(glob, budget)
            seen: set[tuple[float, ...]] = set()
            for p in search_per_exit(cache, policy, budgets[policy], own):
                key = tuple(p.thresholds or ())
                if len(set(key)) > 1 and key not in seen:  # equal thresholds: already a global point
                    seen.add(key)
                    points.append(p)
    return points, budgets


def _front_indices(points: list[Point], policies: list[str]) -> dict[str, list[int]]:
    """Per policy, the indices into ``points`` of its Pareto front (global and per-exit together),
    cheapest first."""
    index = {id(p): i for i, p in enumerate(points)}
    return {policy: [index[id(p)] for p in pareto([p for p in points if p.policy == policy])]
            for policy in policies}


def sweep_meta(doc: dict[str, Any]) -> dict[str, Any]:
    """What the checkpoint keeps (``meta["sweep"]``): the document without the other policies'
    points, in ``Point.to_dict`` form, so that export can re-pick along the chosen policy's curve."""
    policy = (doc.get("chosen") or {}).get("policy")
    meta = {k: v for k, v in doc.items() if k not in ("points", "pareto", "outdir")}
    meta["points"] = [p for p in doc["points"] if p.get("policy") == policy]
    return meta


def _data_config(data: DataRequest | DataConfig | None, recorded: dict[str, Any] | None,
                 warn: Callable[[str], None]) -> tuple[DataConfig, list[str]]:
    """The split to sweep: a ``DataRequest`` (or None) resolved against the model's record of its
    training split, or a ``DataConfig`` taken as it is (with a warning where it is not the recorded
    split: its calibration images may then be ones the branches trained on)."""
    if not isinstance(data, DataConfig):
        return resolve_data(data or DataRequest(), recorded)
    if recorded:
        try:
            rec = DataConfig.from_split_info(recorded)
        except (KeyError, TypeError):
            rec = None
        fields = ("spec", "limit", "calibration_split", "seed", "calibration")
        diffs = [f"{k} {getattr(data, k)!r} (recorded {getattr(rec, k)!r})" for k in fields
                 if rec is not None and getattr(data, k) != getattr(rec, k)]
        if diffs:
            warn("the data given is not the split the branches were trained with: " + ", ".join(diffs)
                 + "; its calibration images may be ones they trained on (pass None to use the recorded split)")
    return dataclasses.replace(data, augment=False), []


def _place(model: EarlyExitModel, cfg: SweepConfig) -> tuple[Group, torch.device]:
    """The process group and the device the model runs on, moving it only where it is elsewhere."""
    group, device = distributed.setup(resolve_device(cfg.device))
    here = next(model.parameters()).device
    if here.type != device.type or (device.index is not None and here != device):
        model.to(device)  # a checkpoint is loaded onto the device already: moving re-traces the stages
    return group, next(model.parameters()).device


def _test_cache(model: EarlyExitModel, test: Dataset, chosen: Point | None, active: list[bool] | None,
                cfg: SweepConfig, run: Callable[[Dataset, str], ExitCache], pricing: Pricing) -> ExitCache | None:
    """The test split's pass, to report a setting chosen on the calibration split on other images
    (restricted to the active exits, priced as the calibration split); None when nothing was
    chosen or it was chosen on test."""
    if chosen is None or cfg.split != "calibration":
        return None
    test_cache = run(test, "test")
    return restrict(test_cache, active or [True] * test_cache.num_exits, pricing, model.chained)


def _document(cache: ExitCache, points: list[Point], chosen: Point | None, test_cache: ExitCache | None,
              active: list[bool] | None, cfg: SweepConfig, *, source: str | None, split_info: dict[str, Any],
              policies: list[str], grid: np.ndarray, budgets: dict[str, list[float]], choosing: bool,
              notes: list[str], warnings: list[str], skipped: list[Any], guarantee: dict[str, Any] | None = None,
              fitted: eenet.Choice | None = None) -> dict[str, Any]:
    """The sweep's document (sweep.json): the curve, the choice and how they were made."""
    doc = build_document(cache, points, chosen, None if fitted else test_cache, budget=cfg.budget, max_drop=cfg.max_drop)
    eenet.add_test_report(doc, test_cache, None if fitted is None else fitted.setting)  # its score is not in the cache
    if doc["chosen"] is not None:
        doc["chosen"]["active_exits"] = active
    doc.update({
        "checkpoint": source, "split": cfg.split,
        "selection_split": cfg.split if choosing else None,
        "data": split_info,
        "policies": policies, "grid": {"range": cfg.thresholds, "count": int(grid.size)},
        "per_exit_budgets": budgets, "guarantee": guarantee,
        "pareto": _front_indices(points, policies),
        "notes": notes, "warnings": warnings, "written": cfg.write, "outdir": cfg.outdir,
        "no_accuracy": NO_LABELS if cache.labels is None else None,
        "skipped_images": skipped,
    })
    return doc


def _apply_choice(model: EarlyExitModel, doc: dict[str, Any], chosen: Point | None, active: list[bool] | None,
                  cfg: SweepConfig, choosing: bool, fitted: eenet.Choice | None = None) -> None:
    """Set the chosen point on the model (thresholds, policy, active exits, ``meta["sweep"]``);
    refuse where a criterion was given and no swept setting meets it."""
    g = doc.get("guarantee")
    if choosing and chosen is None and g is not None:
        raise PteenetError(f"no swept setting is certified within {cfg.max_drop} points at confidence "
                           f"{cfg.confidence:g} on {g['samples']} calibration images",
                           "raise --max-drop, calibrate on more images, lower --confidence, or --no-guarantee")
    if choosing and chosen is None:
        raise PteenetError(f"no swept setting is within {cfg.max_drop} points of the backbone"
                           + (f" (the curve is in {cfg.outdir})" if cfg.outdir else ""),
                           "raise --max-drop, widen --thresholds or add --per-exit")
    if chosen is not None and chosen.policy:
        if fitted is not None and fitted.setting is not None:
            model.set_scheduler(fitted.setting.scheduler)  # before policy eenet's thresholds
        model.set_thresholds(chosen.thresholds or [], chosen.policy, chosen.class_thresholds)
        model.set_active(active)
        model.meta["sweep"] = sweep_meta(doc)


def _pick(cache: ExitCache, model: EarlyExitModel, cfg: SweepConfig, grid: np.ndarray, pricing: Pricing, cost_model: dict[str, Any],
          device: torch.device, group: Group) -> tuple[list[Point], dict[str, list[float]], Choice, Any, eenet.Choice | None]:
    """(points, per-exit budgets, the choice, the tail check, EENet's fit: ``sweep/eenet.py``)."""
    if cfg.policy == eenet.NAME:
        f = eenet.sweep_eenet(cache, budget=cfg.budget, max_drop=cfg.max_drop, confidence=cfg.confidence)
        return f.points, {}, (f.chosen, None, f.guarantee), None, f
    points, budgets = sweep_points(cache, cfg.policies, grid, cfg.per_exit, cfg.budget)
    choice, tail = choose_checked(cache, points, model, cfg.policies, grid, cfg, pricing,
                                  tail_meter(model, cfg, cost_model, device, group))
    return points, budgets, choice, tail, None


def _sweep(model: EarlyExitModel, data: DataRequest | DataConfig | None, cfg: SweepConfig, sink: Sink,
           source: str | None) -> dict[str, Any]:
    """Everything but reading and writing the checkpoint: check, run the split(s) once, sweep,
    choose, write the outputs, set the chosen point on the model."""
    warnings: list[str] = []
    name = source or "the model"

    def warn(text: str, record: bool = True) -> None:
        if record:
            warnings.append(text)
        sink.warn(text)

    policies, grid = cfg.policies, cfg.grid()
    check_sweepable(model, cfg.budget if cfg.cost == "macs" else None, name)  # a time budget is checked once priced
    training_warnings(model, name, warn)
    data_cfg, notes = _data_config(data, model.meta.get("data"), warn)
    for note in notes:
        sink.note(note)
    splits = read_splits(model, data_cfg, cfg.split)
    choosing = cfg.budget is not None or cfg.max_drop is not None
    calibration_warnings(splits.split_info, cfg.split, choosing, warn)
    if not choosing and cfg.cost == "time" and cfg.policy != eenet.NAME:
        notes.append(NO_CRITERION)
        sink.note(NO_CRITERION)
    group, device = _place(model, cfg)
    with int8_exits(model, splits.calibration, cfg.quant_images, data_cfg.spec, torch.get_num_threads(), sink,
                    elsewhere=group.active or device.type != "cpu") if cfg.quantize else contextlib.nullcontext() as int8:
        return _sweep_on(model, cfg, sink, source, splits, group, device, int8, choosing, notes, warnings, warn, policies, grid)


def _sweep_on(model: EarlyExitModel, cfg: SweepConfig, sink: Sink, source: str | None, splits: Any, group: Group, device: torch.device,
              int8: Any, choosing: bool, notes: list[str], warnings: list[str], warn: Callable[..., None], policies: list[str], grid: np.ndarray) -> dict[str, Any]:
    """The split(s) run once (by the INT8 programs with ``int8``), the sweep, the choice, the outputs."""
    def run(dataset: Dataset, name: str) -> ExitCache:
        if int8 is not None:
            return int8[0].cache(dataset, cfg.batch_size, cfg.workers, sink, name)
        if group.active and cfg.policy != eenet.NAME:  # eenet: each rank runs the whole split, with logits
            return sharded_cache(model, dataset, cfg.batch_size, device, cfg.workers, sink, name, group)
        return build_cache(model, dataset, cfg.batch_size, device, cfg.workers, sink, name, logits=cfg.policy == eenet.NAME)

    skipped_before = SKIPPED.mark()
    cache = run(getattr(splits, cfg.split), cfg.split)
    pricing, cost_model = pricing_for(model, cfg.cost, cfg.deploy_batch_size, device, group, cfg.deploy_runtime, cfg.profile,
                                      parts=None if int8 is None else int8[0].parts)
    cost_model.update({} if int8 is None else {"quantization": int8[1]})
    cache = restrict(cache, [True] * cache.num_exits, pricing, model.chained)  # the costs in the chosen unit
    if cache.labels is None:
        sink.note(NO_LABELS)
    points, budgets, (chosen, active, guarantee), tail, fitted = _pick(cache, model, cfg, grid, pricing, cost_model, device, group)
    if tail is not None and tail["attempts"]:
        tail_notes(tail, sink, warn)
    if fallback := fallback_warning(guarantee):
        warn(fallback)
    nothing = None
    if chosen is not None and chosen.cost >= 1.0:
        chosen, active, nothing = backbone_only(cache, chosen, pricing, model.chained)
        warn(f"nothing pays: {nothing.reason()}; "
             + (f"{cfg.write} gets" if cfg.write else "the chosen setting is")
             + " the backbone alone (no exit decides, no branch is computed: cost 1.000); to save compute, "
             "train the exits longer or on more images, or attach fewer, later or cheaper exits")
    test_cache = _test_cache(model, splits.test, chosen, active, cfg, run, pricing)
    doc = _document(cache, points, chosen, test_cache, active, cfg, source=source, split_info=splits.split_info,
                    policies=policies, grid=grid, budgets=budgets, choosing=choosing, notes=notes,
                    warnings=warnings, skipped=SKIPPED.since(skipped_before), guarantee=guarantee, fitted=fitted)
    for point in filter(None, (doc["chosen"], (doc["chosen"] or {}).get("test"))):  # both units, calibration and test
        point.update(both_costs(point["exit_fractions"], model, pricing, active))
    doc["cost_model"] = {**cost_model, "max_tail": cfg.max_tail if cfg.select_exits else None, "tail_check": tail}
    doc["nothing_pays"] = None if nothing is None else nothing.to_dict()
    if cfg.outdir is not None and group.main:  # under torchrun every rank has the document; rank 0 writes
        skipped = write_sweep_outputs(cfg.outdir, doc, plots=cfg.plots)
        if skipped:
            warn(skipped, record=False)  # sweep.json is already written: keep the document equal to it
    _apply_choice(model, doc, chosen, active, cfg, choosing, fitted)
    return doc


def sweep_model(model: EarlyExitModel, data: DataRequest | DataConfig | None = None, config: SweepConfig | None = None,
                sink: Sink = SILENT) -> dict[str, Any]:
    """Sweep the exits of a model in memory and, with ``config.budget`` or ``config.max_drop``, set
    the chosen point on it (thresholds, policy, active exits, ``meta["sweep"]`` for export to re-pick
    from), as ``--write`` does to the checkpoint it writes. Returns the document (sweep.json's).

    ``data``: None or a ``DataRequest`` rebuild the calibration split that training recorded in
    ``model.meta["data"]``; a ``DataConfig`` is used as it is. ``config.outdir`` still writes the
    sweep's files; ``config.write`` is ``sweep_threshold``'s (save with ``pteenet.save_checkpoint``).
    The model is moved to ``config.device``. Progress, warnings and notes go to ``sink``; the
    warnings and notes also into the document.
    """
    config = config or SweepConfig()
    if config.write:
        raise PteenetError("SweepConfig.write names a checkpoint for sweep_threshold to write",
                           "the model holds the chosen setting: save it with pteenet.save_checkpoint(path, model)")
    return _sweep(model, data, config, sink, None)


def sweep_threshold(checkpoint: str | Path, data: DataRequest, config: SweepConfig,
                    sink: Sink = SILENT) -> dict[str, Any]:
    """The whole command: load, sweep (``sweep_model``'s work) and write ``config.write`` with the
    chosen setting and the file's training state; returns the document (the same one as sweep.json)."""
    if config.write:
        check_parent_folder("--write", config.write)  # before the checkpoint is read
    group, device = distributed.setup(resolve_device(config.device))
    with distributed.agreed(group):  # a bad file stops every rank; rank 0 alone reports it
        ckpt = load_checkpoint(checkpoint, device)
    doc = _sweep(ckpt.model, data, config, sink, str(checkpoint))
    if config.write and doc["chosen"] is not None and doc["chosen"].get("policy") and group.main:
        save_checkpoint(config.write, ckpt.model, ckpt.state)
    distributed.barrier(group)  # every rank ends once the files are whole
    return doc
