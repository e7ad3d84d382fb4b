"""A self-contained output folder for deployment, written all or nothing: ``export_model`` from a
model in memory, ``export`` from a checkpoint file (``pteenet export``).

``model.safetensors`` is always written: it is a checkpoint (backbone, branches, metadata) without
the training state, so ``pteenet.load`` reads it and the threshold stays tunable. Optional formats
for runtimes without pteenet:

- ``torch-export`` (``model.pt2``) and ``onnx`` (``model.onnx``): the early exit itself, as nested
  ``torch.cond`` (ONNX ``If``): after each exit, if its score passes, return its logits, else run
  the rest. Inputs ``x`` [1, C, H, W] and ``thresholds`` [E]; outputs ``logits`` [1, K] and
  ``exit_index`` [1]. A cond needs one yes/no answer, so these are batch-1 (latency) programs;
  the policy is built in, the thresholds are an input.
- ``static-torch-export`` (``model_static.pt2``) and ``static-onnx`` (``model_static.onnx``): no
  control flow, any batch size: every exit's logits and confidence h plus the final logits; the
  caller applies the rule (and pays for every exit: these save no compute).

The programs themselves and their writers are in ``programs.py``; this module holds the chosen
point, the output folder and the report's place in it.
"""
from __future__ import annotations

import datetime
import importlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..configs import Config, check_choice, check_criterion, check_int, check_thresholds, setting
from ..data import DataRequest
from ..errors import PteenetError, unknown_name
from ..exits.policies import check_policy
from ..progress import SILENT, Sink
from ..runtime.checkpoint import load_checkpoint, save_checkpoint
from ..runtime.model import EarlyExitModel
from ..runtime.onnx import require_onnxruntime
from ..runtime.ort_quant import SETTINGS
from ..sweep import Point, recertify, select, threshold_list
from ..sweep.eenet import check_quantize
from ..tracing.hooks import NO_EARLY_EXIT
from .programs import write_program
from .quantize import (
    INT8_FOLDER,
    evaluate_int8,
    onnx_decisions,
    quant_images_for,
    quantization_data,
    quantize_staged,
    test_images,
    test_split,
)
from .report import build_report, nothing_pays, write_report


@dataclass(frozen=True)
class Format:
    file: str
    extra: str | None  # the optional dependency group (pip install 'pteenet[extra]') it needs
    modules: tuple[str, ...]  # what that group provides, checked before anything is written
    what: str


FORMATS = {
    "safetensors": Format("model.safetensors", None, (), "checkpoint: pteenet.load(path); thresholds tunable"),
    "torch-export": Format("model.pt2", None, (), "torch.export program with real early exit (torch.cond), batch size 1"),
    "static-torch-export": Format("model_static.pt2", None, (), "torch.export program returning every exit's outputs, any batch size"),
    "onnx": Format("model.onnx", "onnx", ("onnx", "onnxscript"), "ONNX with real early exit (If), batch size 1"),
    "static-onnx": Format("model_static.onnx", "onnx", ("onnx", "onnxscript"), "ONNX returning every exit's outputs, any batch size"),
    "staged-torch-export": Format("staged_pt2", None, (), "one torch.export program per exit with real early exit, "
                                  "any batch size, and run_staged.py, the driver (staged.py)"),
    "staged-onnx": Format("staged_onnx", "onnx", ("onnx", "onnxscript", "onnxruntime"),
                          "one ONNX program per exit with real early exit, any batch size; run_staged.py drives them "
                          "with ONNX Runtime (staged.py)"),
}


INT8_FILES = {INT8_FOLDER: "the staged program as static INT8 (ONNX Runtime's quantizer, QDQ, per-channel weights); "
                           "run_staged.py drives it",
              "backbone_int8.onnx": "the backbone alone as static INT8, from the same stage programs (to compare)"}


@dataclass(kw_only=True)
class ExportConfig(Config):
    output: Path = setting(decode=Path)
    threshold: float | Sequence[float] | None = None  # set directly ...
    budget: float | None = None  # ... or picked from the stored sweep: best within this mean cost
    max_drop: float | None = None  # ... or the cheapest within this many accuracy points of the backbone
    policy: str | None = None
    formats: Sequence[str] = ("safetensors",)
    force: bool = False
    quantize: str | None = None  # "int8": the staged-onnx program also as static INT8 (quantize.py)
    quant_images: int | None = None  # calibration images to quantize on; None: the INT8 sweep's, else DEFAULT_QUANT_IMAGES

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        self.formats = tuple(self.formats)
        for fmt in self.formats:
            if fmt not in FORMATS:
                raise unknown_name("format", fmt, list(FORMATS))
        if self.threshold is not None and not isinstance(self.threshold, (int, float)):
            self.threshold = tuple(self.threshold)
        check_thresholds(self.threshold)
        check_criterion(self.budget, self.max_drop, threshold=self.threshold)
        if self.policy is not None:
            check_policy(self.policy)
        if self.quantize is not None:
            check_choice("quantize", self.quantize, ("int8",))
            if "staged-onnx" not in self.formats:
                raise PteenetError("--quantize int8 quantizes the staged ONNX program", "add --format staged-onnx")
        check_int("quant_images", self.quant_images, 1, "e.g. --quant-images 512", optional=True)


# -- the operating point ---------------------------------------------------------------------------
def _same(a: Sequence[float] | None, b: Sequence[float] | None) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(abs(x - y) <= 1e-9 for x, y in zip(a, b))


def _sweep_numbers(sweep: dict[str, Any], n_exits: int, policy: str, thresholds: list[float]) -> dict[str, Any]:
    """What the stored sweep measured at exactly this setting: val numbers, and test numbers when the
    sweep re-evaluated this setting on the test split."""
    out: dict[str, Any] = {"val": None, "test": None}
    for d in sweep.get("points") or []:
        if d.get("policy") == policy and _same(threshold_list(d.get("threshold"), n_exits), thresholds):
            out["val"] = {k: v for k, v in d.items() if k not in ("threshold", "policy", "kind")}
            break
    for cand in (sweep.get("chosen"), sweep.get("test")):  # the test numbers sit in either place
        test = cand.get("test", cand) if isinstance(cand, dict) else None
        if isinstance(test, dict) and test.get("policy") == policy and _same(threshold_list(test.get("threshold"), n_exits), thresholds):
            out["test"] = test
    return out


def _set_exits(model: EarlyExitModel, active: list[bool] | None, cost: float) -> None:
    """The exits that decide at the picked point; where even it costs the backbone or more, none
    (no branch is computed): the backbone alone, as sweep-threshold does."""
    model.set_active(active if cost < 1.0 else [False] * model.num_exits)


def _recertified(model: EarlyExitModel, sweep: dict[str, Any] | None, cfg: ExportConfig) -> dict[str, Any] | None:
    """``--max-drop`` on a sweep that certified its choice: the sweep's fixed sequence tested again
    at this target (``recertify``), so the exported point keeps a guarantee. None where the sweep
    stored no sequence (``--no-guarantee``, older files) or ``--policy`` asks for another policy."""
    g = (sweep or {}).get("guarantee") or {}
    cands = (g.get("sequence") or {}).get("candidates")
    if cfg.max_drop is None or not cands or (cfg.policy is not None and any(c.get("policy") != cfg.policy for c in cands)):
        return None
    cert, rec = recertify(g, cfg.max_drop, model.num_exits)
    p = cert.point
    if p is None or p.thresholds is None or p.policy is None:
        raise PteenetError(f"no stored setting is certified to keep the {rec['risk']} within {cfg.max_drop:g} points at "
                           f"confidence {rec['confidence']:g} ({rec['tested']} tested on {rec['samples']} calibration images)",
                           "allow a larger --max-drop, or certify on more images (pteenet sweep-threshold --max-drop P --write)")
    model.set_thresholds(p.thresholds, p.policy, p.class_thresholds)
    _set_exits(model, cert.active, p.cost)
    return {"how": f"the cheapest setting certified to keep the {rec['risk']} within {cfg.max_drop:g} points "
                   "(the sweep's fixed sequence, tested again at this target)", "guarantee": rec,
            "val": {k: v for k, v in p.to_dict().items() if k not in ("threshold", "policy", "kind")}}


def choose_point(model: EarlyExitModel, cfg: ExportConfig) -> dict[str, Any]:
    """Set the model's thresholds from ``cfg`` and describe the operating point they make."""
    sweep = model.meta.get("sweep") if isinstance(model.meta.get("sweep"), dict) else None
    certified = _recertified(model, sweep, cfg)
    if cfg.threshold is not None:
        model.set_thresholds(cfg.threshold, cfg.policy)
        how = f"threshold set directly ({cfg.threshold})"
    elif certified is not None:
        how = certified["how"]
    elif cfg.budget is not None or cfg.max_drop is not None:
        if not sweep or not sweep.get("points"):
            raise PteenetError("the checkpoint holds no threshold sweep to pick an operating point from",
                               "run pteenet sweep-threshold --write first, or give --threshold")
        points = [Point.from_dict(d, model.num_exits) for d in sweep["points"]]
        points = [p for p in points if p.thresholds and (cfg.policy is None or p.policy == cfg.policy)]
        if not points:
            raise PteenetError(f"the stored sweep has no points for policy '{cfg.policy}'", "drop --policy or sweep that policy")
        bb = sweep.get("backbone") or {}
        backbone = Point(None, bb.get("accuracy"), bb.get("agreement", 1.0), 1.0, 1.0,
                         [0.0] * model.num_exits + [1.0], None, "backbone")
        best = select(points, backbone, cfg.budget, cfg.max_drop)
        if best is None:
            raise PteenetError(f"no swept operating point is within {cfg.max_drop} points of the backbone",
                               "allow a larger --max-drop, or use --budget")
        assert best.thresholds is not None and best.policy is not None
        model.set_thresholds(best.thresholds, best.policy, best.class_thresholds)
        # The swept curve was measured with every exit deciding: an exit selection made for another
        # point does not hold for this one.
        _set_exits(model, None, best.cost)
        how = (f"the most accurate swept point within a mean cost of {cfg.budget}" if cfg.budget is not None else
               f"the cheapest swept point within {cfg.max_drop} accuracy points of the backbone")
    else:
        if cfg.policy is not None and cfg.policy != model.policy:
            raise PteenetError(f"--policy {cfg.policy} differs from the checkpoint's ({model.policy}) and no threshold is given",
                               "give --threshold, --budget or --max-drop with it")
        how = "the checkpoint's own thresholds"
    point = {"policy": model.policy, "thresholds": list(model.thresholds), "how": how,
             "criterion": {"threshold": cfg.threshold, "budget": cfg.budget, "max_drop": cfg.max_drop}}
    if sweep:
        point.update(_sweep_numbers(sweep, model.num_exits, model.policy, model.thresholds))
        if certified is not None:  # its numbers with its own exits, and its certificate at this target
            point.update(val=certified["val"], guarantee=certified["guarantee"])
        point["metric"] = sweep.get("metric")
        cm = sweep.get("cost_model") or {"kind": "macs"}
        # What "cost" means (MACs or time) and what the choice was made for (runtime, precision).
        point["cost_model"] = {k: cm.get(k) for k in ("kind", "batch_size", "runtime", "precision")}
    return point


# -- the whole export ------------------------------------------------------------------------------
def _check_environment(checkpoint: str | Path | None, cfg: ExportConfig) -> list[str]:
    """What ``ExportConfig`` cannot know when it is built: that the formats' packages are installed
    and that the output folder may be written. Returns the formats to write, safetensors first."""
    formats = list(dict.fromkeys(["safetensors", *cfg.formats]))
    for fmt in formats:
        spec = FORMATS[fmt]
        for mod in spec.modules:
            try:
                importlib.import_module(mod)
            except ImportError:
                raise PteenetError(f"format {fmt} needs {mod}, which is not installed",
                                   f"pip install 'pteenet[{spec.extra}]'") from None
    out = Path(cfg.output).resolve()
    # --force replaces the folder: never one the user stands in or the checkpoint lives in.
    if out == Path.cwd() or out in Path.cwd().parents or (
            checkpoint is not None and out in Path(checkpoint).resolve().parents):
        raise PteenetError(f"refusing to write into {out}: it holds the current folder or the checkpoint",
                           "export into a new folder, e.g. -o export/")
    if out.exists() and not out.is_dir():
        raise PteenetError(f"{out} exists and is not a folder", "choose another -o")
    if out.is_dir() and any(out.iterdir()) and not cfg.force:
        raise PteenetError(f"output folder {out} exists and is not empty", "choose another -o, or pass --force to replace it")
    return formats


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place; an old folder is only deleted once the new one is there."""
    if out.is_dir() and any(out.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, old)  # onto the empty folder mkdtemp made
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)  # also onto an existing empty folder


def _int8_warning(model: EarlyExitModel) -> str | None:
    """Where the thresholds were not chosen on the INT8 program, the sentence that says so."""
    sweep = model.meta.get("sweep") if isinstance(model.meta.get("sweep"), dict) else None
    if sweep is not None and (sweep.get("cost_model") or {}).get("precision") == "int8":
        return None
    return ("the thresholds were not chosen on the INT8 program (" + ("the sweep ran the FP32 model" if sweep else "no sweep")
            + "): a guarantee on the drop does not cover it; sweep-threshold --deploy-runtime onnxruntime --quantize int8 "
              "chooses and certifies them on it")


def export_model(model: EarlyExitModel, config: ExportConfig, sink: Sink = SILENT, *,
                 source: str | Path | None = None, data: DataRequest | None = None) -> dict[str, Any]:
    """Write ``config.output`` (model.safetensors, report.md/json, curve.png, the asked formats) from a
    model in memory, after setting on it the operating point ``config`` asks for (its own thresholds
    when ``config`` names none). Everything is written into a temp folder beside it and renamed at the
    end, so a failure leaves no half-written folder. Returns a summary document. ``source`` names the
    checkpoint the model came from, for the report. ``data``: where ``config.quantize`` finds its
    calibration images (None: the data the checkpoint records); given without it, the report counts
    the staged ONNX program's exits that differ from the eager model's on its test split. Progress goes to ``sink``: one step per file
    written, the slow programs (torch.export, ONNX) named while they are built."""
    formats = _check_environment(source, config)
    if model.runtime == "hooks" and len(formats) > 1:
        raise PteenetError(f"--format {formats[1]} needs a backbone split into stages, and {NO_EARLY_EXIT}",
                           "export only model.safetensors (the default), or attach a traceable backbone")
    if model.runtime == "hooks":
        sink.warn(NO_EARLY_EXIT)
    model.eval()
    point = choose_point(model, config)
    check_quantize(model.policy, config.quantize)  # the policy is known once the point is chosen
    if (alone := nothing_pays(model)) is not None:
        sink.warn(alone + "; the report says so too")
    recorded = model.meta.get("data") if isinstance(model.meta.get("data"), dict) else {}
    if model.info.class_names is None and recorded.get("class_names"):
        model.info.class_names = list(recorded["class_names"])  # so the exported file names its classes
    quant = _images_for_report(model, config, formats, sink, data)
    files = {FORMATS[f].file: FORMATS[f].what for f in formats}
    source_name = None if source is None else Path(source).name
    model.meta["export"] = {"exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                            "source": source_name, "operating_point": point, "formats": formats}
    out = Path(config.output).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        with sink.task(f"exporting to {out.name}", len(formats) + 1) as task:
            save_checkpoint(tmp / "model.safetensors", model)  # no state: training tensors stay behind
            task.advance(info=formats[0])
            programs: dict[bool, Any] = {}
            for fmt in formats[1:]:
                task.advance(0, info=f"{fmt} ...")
                write_program(model, fmt, tmp / FORMATS[fmt].file, programs)
                task.advance(info=fmt)
            int8 = decisions = None
            if quant is not None and quant[0] is None and (t := test_images(quant[2])) is not None:
                decisions = onnx_decisions(model, tmp / FORMATS["staged-onnx"].file, t[0])
            elif quant is not None:
                task.advance(0, info="INT8 ...")
                images, record, test = quant
                for name in quantize_staged(model, tmp / FORMATS["staged-onnx"].file, tmp / INT8_FOLDER, images, record):
                    files[name] = INT8_FILES[name]
                int8 = {"quantization": {**SETTINGS, **record}, "chosen_for": _int8_warning(model) or "the thresholds were chosen and certified on this INT8 program "
                                                                           "(sweep-threshold --quantize int8)"}
                if (t := test_images(test)) is not None:
                    int8["evaluation"] = evaluate_int8(model, tmp, *t, threads=None)
            report = build_report(model, point, files, source_name)
            report["int8"] = int8
            report["onnx_decisions"] = decisions
            files.update(write_report(tmp, report, model.meta.get("sweep")))
            task.advance(info="report")
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; the folder is meant to be shared
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"output": str(config.output), "files": files, "operating_point": point, "formats": formats, "int8": int8,
            "no_real_early_exit": NO_EARLY_EXIT if model.runtime == "hooks" else None}



def _images_for_report(model: EarlyExitModel, config: ExportConfig, formats: list[str], sink: Sink,
                       data: DataRequest | None) -> tuple[Any, Any, Any] | None:
    """(calibration images to quantize on, their record, the test split) with ``--quantize int8``;
    (None, None, the test split) for the staged ONNX program's decision count when data is given; else None."""
    if config.quantize:
        require_onnxruntime("--quantize int8")
        if (why := _int8_warning(model)) is not None:
            sink.warn(why)
        return quantization_data(model, data, quant_images_for(model, config.quant_images))
    if data is not None and "staged-onnx" in formats:
        require_onnxruntime("--format staged-onnx")
        return None, None, test_split(model, data)
    return None

def export(checkpoint: str | Path, config: ExportConfig, sink: Sink = SILENT, data: DataRequest | None = None) -> dict[str, Any]:
    """``pteenet export``: ``export_model`` on the model of a checkpoint file."""
    _check_environment(checkpoint, config)  # before the checkpoint is read
    return export_model(load_checkpoint(checkpoint).model, config, sink, source=checkpoint, data=data)
