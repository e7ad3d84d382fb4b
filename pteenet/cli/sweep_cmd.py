"""``pteenet sweep-threshold``: measure accuracy vs cost over exit thresholds and pick one."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import typer
from rich.table import Table

from ..data import DataRequest
from ..progress import format_percent
from ..sweep import CONFIDENCE, Point, SweepConfig, short_thresholds, sweep_threshold
from ..sweep.guarantee import describe
from .common import console, emit, handle_errors, progress_sink
from .options import (
    ALL_POLICIES,
    DataDirOption,
    DataOption,
    DeviceOption,
    JsonOption,
    LimitOption,
    PolicyOption,
    StrictImagesOption,
)

TABLE_ROWS_PER_POLICY = 12  # a front can hold dozens of points; the table shows a spread of them


class SplitChoice(str, Enum):
    calibration = "calibration"
    test = "test"
    val = "val"  # calibration's earlier name, still accepted


def _table_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Each policy's Pareto front (thinned evenly, ends kept), then the reference rows."""
    rows: list[dict[str, Any]] = []
    for idx in doc.get("pareto", {}).values():
        keep = np.unique(np.linspace(0, len(idx) - 1, min(TABLE_ROWS_PER_POLICY, len(idx))).round().astype(int)) \
            if idx else []
        rows += [doc["points"][idx[i]] for i in keep]
    n_exits = doc["exits"]
    for key in ("backbone", "oracle"):
        ref = doc[key]
        rows.append({"policy": "", "kind": key, "threshold": None, "cost_paper": ref.get("cost_paper", 1.0),
                     "exit_fractions": ref.get("exit_fractions", [0.0] * n_exits + [1.0]), **ref})
    chosen = doc.get("chosen")
    if chosen:
        rows.append({**chosen, "kind": "chosen"})
        if chosen.get("test"):
            rows.append({**chosen["test"], "kind": "chosen@test"})
    return rows


def _summary(doc: dict[str, Any]) -> str:
    chosen = doc.get("chosen")
    if not chosen:
        return f"swept {len(doc['points'])} settings; pass --budget or --max-drop to choose one"
    metric = doc["metric"]
    text = (f"chosen: {chosen['policy']} ({chosen['kind']}) threshold {chosen['threshold']}: "
            f"{metric} {format_percent(chosen[metric])} at cost {chosen['cost']:.3f} on {doc['split']} "
            f"(backbone {format_percent(doc['backbone'][metric])})")
    test = chosen.get("test")
    if test:
        text += f"; on test {metric} {format_percent(test[metric])} at cost {test['cost']:.3f} " \
                f"(backbone {format_percent(test['backbone'][metric])})"
    if "time_cost" in chosen:
        text += f"; MACs {chosen['mac_cost']:.3f}"
    if note := (doc.get("cost_model") or {}).get("note"):
        text += "\n" + note
    g = doc.get("guarantee")
    return text if not g else text + "\n" + describe(g)


@handle_errors
def sweep_command(
    checkpoint: Path = typer.Argument(..., help="a trained pteenet checkpoint"),
    output: Path = typer.Option(..., "-o", "--output", help="folder for sweep.json, sweep.csv, curve.png, exits.png"),
    data: DataOption = None,
    data_dir: DataDirOption = None,
    limit: LimitOption = None,
    calibration: Optional[str] = typer.Option(
        None, metavar="SPEC",
        help="tune on other data than the recorded calibration split: a dataset spec (its test split), "
             "imagefolder:PATH of class folders, images:PATH (no labels: agreement only), any + #half=0|1 for a seeded half (a half of test: report "
             "on the other half). Use it when the backbone was fine-tuned on the training images, which it "
             "has memorised; held-out training images are fine otherwise"),
    split: SplitChoice = typer.Option(SplitChoice.calibration, help="calibration: tune on training's calibration split, report the choice on test; test: sweep test only (val: calibration)"),
    policy: PolicyOption = ALL_POLICIES,
    thresholds: str = typer.Option("0:1:0.01", help="threshold grid START:STOP:STEP (or one value)"),
    patience: Optional[int] = typer.Option(None, "--patience", metavar="T", help="the patience policy at run length T only: a sample leaves once T deciding exits in a row predict the same class (--policy patience sweeps T)"),
    per_exit: bool = typer.Option(False, "--per-exit", help="also search one threshold per exit at a set of budgets"),
    per_class: bool = typer.Option(False, "--per-class", help="with --max-drop: one threshold per (exit, predicted class), a family certified from conservative to aggressive"),
    select_exits: Optional[bool] = typer.Option(None, "--select-exits/--no-select-exits", help="also choose which exits decide at all (greedy; needs --budget or --max-drop); unused branches are not computed. Default: on with --cost time and a criterion"),
    budget: Optional[float] = typer.Option(None, help="choose the most accurate setting with mean cost <= F x backbone"),
    max_drop: Optional[float] = typer.Option(None, help="choose the cheapest setting at most P points below the backbone (accuracy; agreement without labels), certified for new data"),
    confidence: float = typer.Option(CONFIDENCE, metavar="C", help="with --max-drop: the drop stays within P points on new data from the same distribution with probability >= C (Learn-then-Test); 0 = no guarantee"),
    no_guarantee: bool = typer.Option(False, "--no-guarantee", help="with --max-drop: the cheapest setting within P points on the calibration data only (no promise for new data)"),
    write: Optional[Path] = typer.Option(None, help="write the checkpoint with the chosen setting (may be CHECKPOINT)"),
    batch_size: int = typer.Option(256, help="images per batch"),
    cost: str = typer.Option(SweepConfig.cost, help="a point's cost: time (predicted from the stages and branches timed on this machine at --deploy-batch-size) or macs"),
    deploy_batch_size: int = typer.Option(SweepConfig.deploy_batch_size, "--deploy-batch-size", help="with --cost time: the batch size you deploy at, which time is predicted for"),
    deploy_runtime: str = typer.Option(SweepConfig.deploy_runtime, "--deploy-runtime", help="with --cost time: where you run the model, eager (pteenet.load) or onnxruntime (export --format staged-onnx); time is measured there"),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="int8 (with --deploy-runtime onnxruntime): cache, price and certify the static INT8 program of export --quantize int8, against the FP32 backbone"),
    quant_images: int = typer.Option(SweepConfig.quant_images, "--quant-images", help="with --quantize: calibration images (of the structure share) to quantize on"),
    profile: Optional[Path] = typer.Option(None, "--profile", help="with --cost time: price with a profile measured before (sweep.json "
                                                                  "of an earlier sweep, e.g. on the machine you deploy on) instead of timing here"),
    max_tail: Optional[float] = typer.Option(SweepConfig.max_tail, "--max-tail", help="with --select-exits: a sample that takes no exit costs at most F x the backbone"),
    device: DeviceOption = "auto",
    workers: int = typer.Option(0, help="data loader worker processes"),
    strict_images: StrictImagesOption = False,
    json_: JsonOption = False,
) -> None:
    """Sweep exit thresholds on the calibration split and pick one by budget or accuracy drop.

    Unless given, --data, --limit and the calibration split are the ones training recorded.
    """
    cfg = SweepConfig(outdir=str(output), split=split.value, policy=policy, thresholds=thresholds, patience=patience,
                      per_exit=per_exit, per_class=per_class, select_exits=select_exits, budget=budget, max_drop=max_drop,
                      confidence=0.0 if no_guarantee else confidence,
                      write=None if write is None else str(write), batch_size=batch_size,
                      cost=cost, deploy_batch_size=deploy_batch_size, deploy_runtime=deploy_runtime, max_tail=max_tail,
                      quantize=quantize, quant_images=quant_images,
                      profile=None if profile is None else str(profile),
                      device=device, workers=workers)
    with progress_sink() as sink:
        doc = sweep_threshold(checkpoint, DataRequest(spec=data, data_dir=data_dir, limit=limit, calibration=calibration,
                                                      strict_images=strict_images),
                              cfg, sink)
    emit(doc, json_, _show)


def _show(doc: dict[str, Any]) -> None:
    print_points(_table_rows(doc), title=f"Pareto front per policy on {doc['split']} ({doc['samples']} images)")
    console.print(_summary(doc), soft_wrap=True, markup=False)
    written = doc["outdir"] if doc.get("written") is None else f"{doc['outdir']} and the checkpoint {doc['written']}"
    console.print(f"wrote the sweep to {written}", soft_wrap=True, markup=False)


def print_points(points: Sequence[Point | dict[str, Any]], title: str | None = None) -> None:
    """A compact table of swept points on stderr."""
    table = Table(title=title)
    for col in ("policy", "kind", "T", "acc%", "agree%", "cost", "paper", "end%"):
        table.add_column(col, justify="left" if col in ("policy", "kind", "T") else "right",
                         no_wrap=col != "T")
    for p in points:
        d = p.to_dict() if isinstance(p, Point) else p
        acc = "-" if d.get("accuracy") is None else f"{100 * d['accuracy']:.2f}"
        table.add_row(d.get("policy") or "", d.get("kind", ""), short_thresholds(d.get("threshold")), acc,
                      f"{100 * d['agreement']:.2f}", f"{d['cost']:.3f}", f"{d['cost_paper']:.3f}",
                      f"{100 * d['exit_fractions'][-1]:.1f}")
    console.print(table)
