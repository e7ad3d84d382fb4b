"""``pteenet bench``: measured speed of the early-exit model against its own backbone, on this machine."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..bench.run import BenchConfig, bench, load_split
from ..data import DataRequest, split_name
from ..devices import resolve_device
from ..export.quantize import quant_images_for, quantization_data
from ..export.report import batch_label
from ..progress import format_percent
from ..runtime.checkpoint import load_checkpoint, save_checkpoint
from .common import console, emit, handle_errors, progress_sink
from .options import DataDirOption, DataOption, DeviceOption, JsonOption, LimitOption, PolicyOption

DEFAULT_LIMIT = 1000  # batch-1 timing of a whole test set would take many minutes; medians need far fewer


@handle_errors
def bench_command(
    checkpoint: Path = typer.Argument(..., help="a pteenet checkpoint"),
    data: DataOption = None,
    data_dir: DataDirOption = None,
    split: str = typer.Option("test", help="train | calibration | test (val: calibration)"),
    limit: LimitOption = DEFAULT_LIMIT,
    batch_size: Optional[list[int]] = typer.Option(None, "--batch-size", help="repeat for several (default: 1 and 256)"),
    threshold: Optional[float] = typer.Option(None, help="global threshold (default: the checkpoint's thresholds)"),
    policy: PolicyOption = None,
    threads: Optional[int] = typer.Option(None, help="torch threads (default: torch's own choice, recorded)"),
    repeats: int = typer.Option(5, help="timed passes per model; medians are reported"),
    device: DeviceOption = "cpu",  # the CPU unless asked: on CUDA the timings are CUDA events
    tune_allocator: bool = typer.Option(True, "--tune-allocator/--no-tune-allocator",
                                        help="keep freed activation memory in-process (glibc), for both models alike"),
    runtime: str = typer.Option("eager", help="eager (pteenet.load) or onnxruntime (both models exported, the early exit as "
                                              "the staged program of export --format staged-onnx)"),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="int8 (with --runtime onnxruntime): also the INT8 backbone and "
                                                                     "the INT8 early exit of export --quantize int8, four programs in turn"),
    quant_images: Optional[int] = typer.Option(None, "--quant-images", help="with --quantize: calibration images to quantize on "
                                                                             "(default: the INT8 sweep's, else 512)"),
    record: bool = typer.Option(False, "--record", help="store the results in the checkpoint (meta['bench'])"),
    json_: JsonOption = False,
) -> None:
    """Time the plain backbone against the early-exit model (throughput, latency, exits, MACs), on
    images preloaded into memory."""
    # Built first: its checks (threshold, policy, sizes) run before any file is read.
    cfg = BenchConfig(batch_sizes=tuple(batch_size or (1, 256)), threshold=threshold, policy=policy, threads=threads,
                      repeats=repeats, tune_allocator=tune_allocator, runtime=runtime, quantize=quantize)
    ck = load_checkpoint(checkpoint, resolve_device(device))
    model = ck.model
    spec = data or (model.meta.get("data") or {}).get("spec")
    split = split_name(split)
    cfg.extra.update(data=spec, split=split)
    with progress_sink() as sink:
        images, labels, notes = load_split(model, data, data_dir, split, limit, sink)
        # The notes are about which images form the calibration split; other splits do not depend on it.
        for note in notes if split == "calibration" else []:
            sink.note(note)
        int8 = None
        if quantize:
            n = quant_images_for(model, quant_images)
            int8 = quantization_data(model, DataRequest(spec=data, data_dir=data_dir), n)[:2]
        doc = bench(model, images, cfg, sink, labels=labels, int8=int8)
    if record:
        model.meta["bench"] = doc
        save_checkpoint(checkpoint, model, ck.state)  # atomic: a reader sees the old file or the new one
    emit(doc, json_, print_bench)
    if record:
        console.print(f"recorded in {checkpoint} (meta['bench'])")


def print_bench(doc: dict) -> None:
    """The results as a table and a verdict per batch size (the warnings were shown as they came)."""
    threads = f"{doc['threads']} thread{'s' if doc['threads'] != 1 else ''}"
    where = " in ONNX Runtime" if doc.get("deploy_runtime") == "onnxruntime" else ""
    table = Table(title=f"{doc['images']} images{where} on {doc['device']} ({doc['cpu']}), {threads}, "
                        f"{doc['policy']} T={','.join(f'{t:g}' for t in doc['thresholds'])}")
    for col in ("batch", "backbone img/s", "early-exit img/s", "time ratio", "predicted", "MAC ratio",
                "backbone p50/p95 ms", "early-exit p50/p95 ms"):
        table.add_column(col, justify="right")
    for r in doc["results"]:
        lat = {k: f"{r[k]['latency_ms']['p50']:.2f} / {r[k]['latency_ms']['p95']:.2f}" for k in ("backbone", "early_exit")}
        mac = "-" if r["mac_ratio"] is None else f"{r['mac_ratio']:.3f}"
        table.add_row(batch_label(r), f"{r['backbone']['images_per_s']:.1f}", f"{r['early_exit']['images_per_s']:.1f}",
                      f"{r['time_ratio']:.3f}", f"{r.get('predicted_time_ratio', float('nan')):.3f}", mac,
                      lat["backbone"], lat["early_exit"])
    console.print(table)
    fr = doc["exit_fractions"]
    console.print("exits taken: " + ", ".join(f"{k + 1}: {format_percent(f, 1)}" for k, f in enumerate(fr[:-1]))
                  + f", end: {format_percent(fr[-1], 1)}")
    for r in doc["results"]:
        console.print(r["verdict"], style="bold red" if r["time_ratio"] >= 1 else None, markup=False)
    if doc.get("quantize"):
        _print_programs(doc)


def _print_programs(doc: dict) -> None:
    """The four programs of --quantize int8, each against the FP32 backbone (and the INT8 early exit
    against the INT8 backbone), with the CPU's INT8 instructions."""
    table = Table(title=f"FP32 and INT8 in ONNX Runtime (CPU INT8 instructions: {doc['cpu_int8']})")
    for col in ("batch", "program", "mean ms/batch", "p50", "p99", "vs FP32 backbone", "vs INT8 backbone", "accuracy"):
        table.add_column(col, justify="right")
    for r in doc["results"]:
        for name, p in r["programs"].items():
            lat = p["latency_ms"]
            vs8 = p.get("time_ratio_vs_backbone_int8")
            table.add_row(batch_label(r), name.replace("_", " "), f"{lat['mean']:.2f}", f"{lat['p50']:.2f}", f"{lat['p99']:.2f}",
                          f"{p['time_ratio_vs_fp32_backbone']:.3f}", "-" if vs8 is None else f"{vs8:.3f}",
                          format_percent(p.get("accuracy")))
    console.print(table)
