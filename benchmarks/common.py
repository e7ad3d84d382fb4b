"""What the benchmark scripts share: the command-line preamble of the timing scripts, loading the
checkpoint they time, the setting a ``cifar10_time.py`` summary chose, and the CIFAR-10 data of
``cifar10_resnet.py``'s protocol B (the calibration and test splits, the test half reports are made on).

Scripts run as ``python benchmarks/NAME.py``, so this folder is on ``sys.path`` and ``from common
import ...`` finds this file.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pteenet import EarlyExitModel, load_checkpoint
from pteenet.data import DataConfig, load_splits
from pteenet.runtime.timing import tune_allocator

RESULTS = Path(__file__).parent / "results"
SUMMARY = RESULTS / "cifar10_time.json"  # the settings ``cifar10_time.py`` chose, which the timing scripts time


def arguments(doc: str | None, out: str, *, repeats: int, threads: int = 1, data: bool = False, summary: bool = False,
              positional: bool = False) -> argparse.ArgumentParser:
    """The options every timing script takes: the checkpoint (``--model``, or the first argument with
    ``positional``), ``--repeats``, ``--threads`` and ``--out`` (``out`` in results/); with ``data``
    the CIFAR-10 JPEG folder, with ``summary`` the summary whose setting is timed. A script adds its own."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if positional:
        ap.add_argument("model", metavar="checkpoint", type=Path)
    else:
        ap.add_argument("--model", type=Path, required=True)
    if data:
        ap.add_argument("--data", type=Path, required=True, help="unpacked CIFAR-10 JPEG folder (train/, test/)")
    if summary:
        ap.add_argument("--summary", type=Path, default=SUMMARY)
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--threads", type=int, default=threads)
    ap.add_argument("--out", type=Path, default=RESULTS / out)
    return ap


def start(args: argparse.Namespace, *, allocator: bool = False) -> tuple[EarlyExitModel, dict[str, Any]]:
    """Set the thread count (and, with ``allocator``, glibc's allocator as ``pteenet bench`` does),
    note the load average before, and load the model in eval mode: (model, {"before": load})."""
    torch.set_num_threads(args.threads)
    if allocator:
        tune_allocator()
    load = {"before": os.getloadavg()}
    return load_checkpoint(args.model).model.eval(), load


def chosen_setting(summary: Path, name: str) -> dict[str, Any]:
    """One of the settings a ``cifar10_time.py`` summary chose (``eager_b1``, ``eager_b256``, ...)."""
    return json.loads(summary.read_text())["settings"][name]


def eval_data(args: argparse.Namespace) -> DataConfig:
    """The calibration and test splits, exactly as training held them out (same seed and fraction)."""
    return DataConfig(spec=f"imagefolder:{args.data}", limit=args.eval_limit, augment=False, calibration_split=0.1, seed=0)


def backbone_file(folder: Path, name: str) -> Path:
    return folder / f"{name}_cifar10jpeg.safetensors"


def report_half(n: int, which: int = 1) -> np.ndarray:
    """Protocol B's halves of the test split: 0 calibrates, 1 reports (a fixed random permutation)."""
    perm = np.random.default_rng(0).permutation(n)
    return perm[n // 2:] if which else perm[: n // 2]


def report_images(data: Path, info: Any, limit: int | None = None, eval_limit: int | None = None) -> torch.Tensor:
    """The first ``limit`` images of protocol B's report half of the CIFAR-10 test split in ``data``
    (all of them with None), preprocessed for the backbone ``info`` describes, as one tensor."""
    splits = load_splits(eval_data(argparse.Namespace(data=data, eval_limit=eval_limit)), info.preprocess, info.num_classes)
    idx = report_half(len(splits.test), 1)[:limit]
    return torch.stack([splits.test[int(i)][0] for i in idx])


def pareto_dicts(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points (as dicts) no cheaper point beats on accuracy, cheapest first."""
    best, out = -1.0, []
    for p in sorted(points, key=lambda p: (p["cost"], -p["accuracy"])):
        if p["accuracy"] > best:
            out.append(p)
            best = p["accuracy"]
    return out


def best_b(r: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """Protocol B's cheapest point at <= 1 pt drop (one global threshold chosen on one test half),
    with or without exit selection, from one configuration's results in ``cifar10_resnet.py``'s file."""
    cands = [(k, r["chosen_test_halves"][k]) for k in ("drop1", "drop1_select") if r["chosen_test_halves"].get(k)]
    return max(cands, key=lambda kc: kc[1]["test_cost_reduction"]) if cands else None


def cli(*args: str) -> dict[str, Any]:
    """One ``pteenet`` command run as a user runs it, with ``--json``: its document, plus the seconds
    it took (``_seconds``); stderr (progress, notes, warnings) passes through."""
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "pteenet", *args, "--json"], check=True, stdout=subprocess.PIPE, text=True)
    return {**json.loads(out.stdout), "_seconds": time.time() - t0}
