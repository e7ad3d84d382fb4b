"""Measured speed on this machine: the plain backbone against the early-exit runtime.

MACs say what early exit could save; only a clock says what it does save, because every exit adds
work that MACs do not count (a branch call, a score, a decision, and at batch > 1 the indexing that
drops the rows that left). So both models run on the same preloaded images, interleaved repeat by
repeat (A B, then B A: slow drifts such as CPU clocks hit both alike), after a warm-up, with a fixed
thread count, and we report medians. The early-exit model's exits are the ones it really took, so
its mean MACs per sample are measured too, not assumed.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from ..configs import Config, check_choice, check_int, check_thresholds
from ..data import SPLITS, DataRequest, load_splits, make_loader, resolve_data, split_name
from ..errors import PteenetError
from ..exits.policies import check_policy
from ..progress import SILENT, Sink
from ..runtime import timing
from ..runtime.model import EarlyExitModel
from ..runtime.ort_quant import cpu_int8_instructions
from ..runtime.ort_timing import DEPLOY_RUNTIMES, profile_onnx
from ..runtime.timing import tune_allocator
from ..tracing.hooks import NO_EARLY_EXIT
from .int8 import int8_warnings, programs
from .onnx_runs import onnx_runs

# Time ratio above the MAC ratio by more than this (relative) counts as "overhead eats part of the
# savings"; below it the two agree within what run-to-run noise on a busy machine allows.
OVERHEAD_TOLERANCE = 0.10


@dataclass(kw_only=True)
class BenchConfig(Config):
    batch_sizes: Sequence[int] = (1, 256)
    threshold: float | Sequence[float] | None = None  # None: the model's own thresholds
    policy: str | None = None  # None: the model's own policy
    threads: int | None = None  # torch.set_num_threads for the run (restored afterwards)
    repeats: int = 5
    warmup: int = 3  # untimed batches per model and batch size
    extra: dict[str, Any] = field(default_factory=dict)  # recorded as is (data spec, split, ...)
    tune_allocator: bool = True  # see tune_allocator(); applies to both models alike
    runtime: str = "eager"  # eager (pteenet.load) | onnxruntime (both models exported: bench/onnx_runs.py)
    quantize: str | None = None  # "int8" (onnxruntime): the INT8 backbone and INT8 early exit too, four programs in turn

    def __post_init__(self) -> None:
        self.batch_sizes = tuple(self.batch_sizes)
        if not self.batch_sizes:
            raise PteenetError("batch_sizes is empty", "e.g. --batch-size 1 --batch-size 256")
        for b in self.batch_sizes:
            check_int("batch_sizes", b, 1, "e.g. --batch-size 1 --batch-size 256")
        if self.threshold is not None and not isinstance(self.threshold, (int, float)):
            self.threshold = tuple(self.threshold)
        check_thresholds(self.threshold)
        if self.policy is not None:
            check_policy(self.policy)
        check_int("threads", self.threads, 1, optional=True)
        check_int("repeats", self.repeats, 1, "e.g. --repeats 5")
        check_int("warmup", self.warmup, 0)
        check_choice("runtime", self.runtime, DEPLOY_RUNTIMES)
        if self.quantize is not None:
            check_choice("quantize", self.quantize, ("int8",))
            if self.runtime != "onnxruntime":
                raise PteenetError("--quantize int8 times the INT8 programs of ONNX Runtime", "add --runtime onnxruntime")


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on Windows
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[torch.Tensor], Any], batches: list[torch.Tensor], device: torch.device) -> tuple[list[float], list[Any]]:
    """Seconds per batch, and the outputs (kept, not inspected, so that inspecting costs no time).
    On CUDA the time between two events on the stream: the GPU's own clock, which also counts the
    gaps where it waited for the host (early exit's decisions read values back)."""
    times, outs = [], []
    for b in batches:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            outs.append(fn(b))
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
            continue
        t0 = time.perf_counter()
        outs.append(fn(b))
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times, outs


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _side(totals: list[float], per_batch: list[float], n_images: int) -> dict[str, Any]:
    t = statistics.median(totals)
    return {"images_per_s": n_images / t, "time_s": t,
            "latency_ms": {"p50": 1e3 * _percentile(per_batch, 0.5), "p95": 1e3 * _percentile(per_batch, 0.95)}}


def verdict(batch_size: int, time_ratio: float, mac_ratio: float | None, split: dict[str, float] | None = None) -> str:
    """One honest sentence on whether the measured time follows the MACs (and, given ``split``
    from ``timing.TimeProfile.ratios``, what this backbone's layer times would allow)."""
    promised = "" if mac_ratio is None else f"; MACs promise {1 / mac_ratio:.2f}x"
    if split is not None:
        promised += f", this backbone's layer times with free exits {1 / split['ideal_time_ratio']:.2f}x"
    if time_ratio >= 1.0:
        # Two causes MACs do not see: the exits' own overhead (branch calls, decisions, and at batch > 1
        # the row indexing), and layers that take more time per MAC than the average (early,
        # high-resolution, few-channel convolutions usually do).
        return (f"batch {batch_size}: NO speed-up - early exit takes {time_ratio:.2f}x the backbone's time{promised}: "
                "the exits' overhead and the uneven time per MAC of the layers eat the savings")
    if mac_ratio is not None and time_ratio > mac_ratio * (1 + OVERHEAD_TOLERANCE):
        if split is not None and time_ratio <= split["ideal_time_ratio"] * (1 + OVERHEAD_TOLERANCE):
            return (f"batch {batch_size}: {1 / time_ratio:.2f}x faster{promised}: the exits add little; the rest is "
                    "the backbone's early layers taking more time per MAC than its late ones")
        return (f"batch {batch_size}: {1 / time_ratio:.2f}x faster{promised}: overhead eats part of the savings")
    return f"batch {batch_size}: {1 / time_ratio:.2f}x faster{promised}: the measured time follows the MACs"


@contextlib.contextmanager
def _thread_count(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` torch threads (None: as they are), restoring the caller's count afterwards."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _one_batch_size(model: EarlyExitModel, images: torch.Tensor, bs: int, runs: dict[str, Callable[[torch.Tensor], Any]],
                    cfg: BenchConfig, sink: Sink, labels: torch.Tensor | None = None) -> dict[str, Any]:
    """Both models at one batch size: warm-up, then repeats interleaved A B / B A, then where the time
    goes on one batch (``timing.profile``, or ``profile_onnx`` in ONNX Runtime); the exits taken come
    from the first early-exit pass."""
    device, n = images.device, images.shape[0]
    batches = list(images.split(bs))
    for fn in runs.values():
        for b in (batches * cfg.warmup)[:cfg.warmup]:
            fn(b)
        _sync(device)
    totals: dict[str, list[float]] = {k: [] for k in runs}
    per_batch: dict[str, list[float]] = {k: [] for k in runs}
    exit_index = None
    names = list(runs)
    with sink.task(f"timing batch {bs}, {n} images", len(names) * cfg.repeats) as task:
        for r in range(cfg.repeats):
            for name in (names if r % 2 == 0 else names[::-1]):  # A B, then B A: drifts hit every program alike
                times, outs = _timed(runs[name], batches, device)
                totals[name].append(sum(times))
                per_batch[name].extend(times)
                if name == "early_exit" and exit_index is None:
                    exit_index = torch.cat([o.exit_index for o in outs]).cpu()
                task.advance()
    assert exit_index is not None
    # Where the time goes, on one batch of this size: splits the gap to the MACs (see timing.py).
    if cfg.runtime == "onnxruntime":
        prof = profile_onnx(model, batches[0], repeats=cfg.repeats, warmup=min(cfg.warmup, 1), threads=torch.get_num_threads())
    else:
        prof = timing.profile(model, batches[0], repeats=cfg.repeats, warmup=min(cfg.warmup, 1))
    result = _result(bs, len(batches), n, totals, per_batch, exit_index, model, prof)
    if len(runs) > 2 or labels is not None:
        result["programs"] = programs(runs, batches, totals, per_batch, n, labels)
    return result


def _machine(device: torch.device, threads: int) -> dict[str, Any]:
    """What the timings were measured on, and when."""
    return {
        "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "threads": threads,
        "timer": "cuda events" if device.type == "cuda" else "perf_counter",
    }


def _warnings(model: EarlyExitModel, load: float, cpus: int) -> list[str]:
    """What makes these timings less than they seem: a busy machine, or a model that cannot exit early."""
    warnings = [f"the machine was busy (load average {load:.1f} on {cpus} CPUs): other processes competed for the "
                "CPU, so these timings are noisy; rerun on an idle machine"] if load > 0.75 * cpus else []
    if model.runtime == "hooks":
        warnings.insert(0, NO_EARLY_EXIT)
    return warnings


def bench(model: EarlyExitModel, images: torch.Tensor, config: BenchConfig, sink: Sink = SILENT, *,
          labels: torch.Tensor | None = None, int8: tuple[torch.Tensor, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Time ``model.backbone`` against ``model.predict`` on ``images`` (already preprocessed, in
    memory) at each batch size; returns the JSON-able results document (``meta["bench"]``). Progress
    goes to ``sink`` between timed passes (never inside one), and so do the document's warnings.
    ``labels``: each program's accuracy too. ``int8`` (calibration images and their record, e.g.
    ``export.quantize.quantization_data``'s): with ``config.quantize``, the INT8 programs too."""
    if config.quantize and int8 is None:
        raise PteenetError("bench --quantize int8 needs calibration images to quantize on", "pass int8=(images, record)")
    if images.shape[0] < 1:
        raise PteenetError("no images to measure on", "check the data split and --limit")
    thresholds, policy = model.resolve_thresholds(model.thresholds if config.threshold is None else config.threshold, config.policy)
    model.eval()
    device = next(model.parameters()).device
    images = images.to(device)
    n = images.shape[0]
    allocator = tune_allocator() if config.tune_allocator else None
    load_before = _load_average()
    with _thread_count(config.threads), _runs(model, thresholds, policy, config, device, int8) as runs:
        with torch.inference_mode():
            results = [_one_batch_size(model, images, bs, runs, config, sink, labels) for bs in config.batch_sizes]
        threads = torch.get_num_threads()
    first = results[0]
    # The load before the run: afterwards the 1-minute average mostly counts our own threads.
    load = load_before or 0.0
    cpus = os.cpu_count() or 1
    warnings = _warnings(model, load, cpus) + int8_warnings(results)
    for w in warnings:
        sink.warn(w)
    return {
        **_machine(device, threads),
        "images": n, "input_size": list(images.shape[1:]), "repeats": config.repeats, "warmup_batches": config.warmup,
        "policy": policy, "thresholds": thresholds, "runtime": model.runtime, "deploy_runtime": config.runtime,
        "backbone_macs": model.cost.backbone_macs if model.cost else None,
        "exit_fractions": first["exit_fractions"], "mean_macs": first["mean_macs"], "mac_ratio": first["mac_ratio"],
        "results": results,
        "overhead_eats_savings": any(r["time_ratio"] >= 1.0 for r in results),
        "load_average": load, "cpu_count": cpus, "warnings": warnings, "allocator": allocator,
        "quantize": config.quantize, "cpu_int8": cpu_int8_instructions() if config.quantize else None,
        **config.extra,
    }


@contextlib.contextmanager
def _runs(model: EarlyExitModel, thresholds: list[float], policy: str, cfg: BenchConfig, device: torch.device,
          int8: tuple[torch.Tensor, dict[str, Any]] | None = None) -> Iterator[dict[str, Callable[[torch.Tensor], Any]]]:
    """The two timed calls: eager (``model.backbone`` and ``model.predict``), or both models exported
    and run in ONNX Runtime (``onnx_runs``: the staged program holds the policy, set here for the export)."""
    if cfg.runtime == "eager":
        yield {"backbone": model.backbone, "early_exit": lambda x: model.predict(x, thresholds, policy)}
        return
    if device.type != "cpu":
        raise PteenetError(f"bench --runtime onnxruntime runs on the CPU, not {device}", "pass --device cpu")
    saved = model.thresholds, model.policy
    model.set_thresholds(thresholds, policy)
    try:
        with tempfile.TemporaryDirectory(prefix="pteenet-bench-") as tmp, onnx_runs(model, Path(tmp), thresholds, torch.get_num_threads(),
                                                                                              int8 if cfg.quantize else None) as runs:
            yield runs
    finally:
        model.set_thresholds(*saved)


def _result(bs: int, n_batches: int, n: int, totals: dict[str, list[float]], per_batch: dict[str, list[float]],
            exit_index: torch.Tensor, model: EarlyExitModel, prof: timing.TimeProfile) -> dict[str, Any]:
    counts = torch.bincount(exit_index, minlength=model.num_exits + 1).tolist()
    fractions = [c / n for c in counts]
    # Cumulative convention: a sample that left at exit k paid the backbone up to k and every branch
    # up to and including k; one that ran to the end paid the whole backbone and every branch.
    cost = model.cost
    mac_ratio = sum(f * c for f, c in zip(fractions, cost.costs())) if cost else None
    mac_ratio_paper = sum(f * c for f, c in zip(fractions, cost.costs_paper())) if cost else None
    bb, ee = _side(totals["backbone"], per_batch["backbone"], n), _side(totals["early_exit"], per_batch["early_exit"], n)
    time_ratio = ee["time_s"] / bb["time_s"]
    return {
        "batch_size": bs, "images_per_batch": min(bs, n), "batches": n_batches, "backbone": bb, "early_exit": ee,
        "time_ratio": time_ratio, "speedup": 1.0 / time_ratio, "mac_ratio": mac_ratio, "mac_ratio_paper": mac_ratio_paper,
        "mean_macs": None if cost is None or mac_ratio is None else mac_ratio * cost.backbone_macs,
        "exit_fractions": fractions, "verdict": verdict(bs, time_ratio, mac_ratio, prof.ratios(fractions)),
        **prof.ratios(fractions), "time_profile": prof.to_dict(),
    }


def load_images(model: EarlyExitModel, spec: str | None = None, data_dir: str | None = None, split: str = "test",
                limit: int | None = None, sink: Sink = SILENT) -> tuple[torch.Tensor, list[str]]:
    """One split, preprocessed for the backbone and stacked in memory so that the timed loops never
    wait for data; the split is rebuilt from the checkpoint's data record as the sweep does (``spec``
    None: the recorded data). Returns the images and notes on what was assumed."""
    images, _, notes = load_split(model, spec, data_dir, split, limit, sink)
    return images, notes


def load_split(model: EarlyExitModel, spec: str | None = None, data_dir: str | None = None, split: str = "test",
               limit: int | None = None, sink: Sink = SILENT) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """``load_images`` with the labels (None where the images have none)."""
    split = split_name(split)
    check_choice("split", split, SPLITS)
    cfg, notes = resolve_data(DataRequest(spec=spec, data_dir=data_dir, limit=limit), model.meta.get("data"))
    ds = getattr(load_splits(cfg, model.info.preprocess, model.info.num_classes), split)
    if len(ds) == 0:
        raise PteenetError(f"the {split} split of {cfg.spec} is empty", "use --split test")
    loader = make_loader(ds, 256, shuffle=False)
    images, labels = [], []
    with sink.task(f"loading {len(ds)} {split} images", len(loader)) as task:
        for x, y in loader:
            images.append(x)
            labels.append(torch.as_tensor(y))
            task.advance()
    y = torch.cat(labels)
    return torch.cat(images), None if bool((y < 0).all()) else y, notes
