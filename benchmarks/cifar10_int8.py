"""CIFAR-10 in INT8: the default early-exit ResNet-56 as the static INT8 program of ``export
--quantize int8`` against the plain fine-tuned ResNet-20/32/44/56 in FP32 and INT8, all in ONNX
Runtime in one process, one thread, interleaved batch by batch, medians.

Every INT8 program is quantized by ``onnxruntime.quantization.quantize_static`` (QDQ, per-channel
weights, ``runtime/ort_quant.py``) on the same images: the first ``--quant-images`` of the
calibration split's structure share (``sweep.quantized.quantization_images``). The plain models are
quantized whole, as a user would with one call; "INT8 backbone" below is the plain INT8 ResNet-56,
the baseline the early exit must beat.

Protocol B (as ``cifar10_resnet.py``): the exit cache of the INT8 programs on the test split
(``sweep.quantized.Int8Exits``: answers of the INT8 programs, drops against the FP32 backbone) is
split in two random halves; on the first, for each batch size, the cheapest setting certified to
keep the drop within 1 point at confidence 0.9 (``pteenet.sweep.certify``: every policy, exit
selection priced by a profile timed on the INT8 programs, ``profile_onnx(parts=...)``, the no-exit
tail bounded by the CLI's ``max_tail``) is chosen; it is reported on the second half, where the
programs are timed. ``--overheads`` also measures where INT8 time goes (``int8_overheads.py``).

    python benchmarks/cifar10_int8.py --model /work/cache/bench-cifar10/r56-default.safetensors \
        --data /work/cache/cifar10 --backbones ../shared/data/backbones/cifar10-jpeg [--smoke] [--overheads]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Subset

sys.path.insert(0, str(Path(__file__).parent))
from cifar10_resnet import backbone_file, eval_data, report_half  # noqa: E402
from cifar10_time import timed  # noqa: E402

from pteenet import load_checkpoint  # noqa: E402
from pteenet.backbones.specs import load_backbone  # noqa: E402
from pteenet.data import load_splits  # noqa: E402
from pteenet.evaluation.engine import exit_indices  # noqa: E402
from pteenet.export.driver import StagedModel, onnx_runner  # noqa: E402
from pteenet.export.quantize import INT8_FOLDER, quantize_staged  # noqa: E402
from pteenet.export.staged import export_pieces  # noqa: E402
from pteenet.runtime.onnx import export_onnx, ort_session  # noqa: E402
from pteenet.runtime.ort_quant import batches, cpu_int8_instructions, join, quantize_program  # noqa: E402
from pteenet.runtime.ort_timing import profile_onnx  # noqa: E402
from pteenet.sweep import SweepConfig, backbone_point, certify, evaluate, restrict  # noqa: E402
from pteenet.sweep.quantized import int8_exits, quantization_images  # noqa: E402

POLICIES = ("confidence", "max-softmax", "entropy")
PLAIN = ("resnet20", "resnet32", "resnet44", "resnet56")
GRID = np.round(np.linspace(0, 1, 101), 4)


def plain_programs(backbones: Path, quant: torch.Tensor, work: Path, threads: int) -> dict[str, Any]:
    """Each plain ResNet as an FP32 and a static INT8 ONNX Runtime session (quantized whole)."""
    sessions = {}
    for name in PLAIN:
        module = load_backbone(f"cifar-{name}", str(backbone_file(backbones, name)))[0].eval()
        fp32 = work / f"{name}.onnx"
        export_onnx(module, (torch.zeros(2, 3, 32, 32),), fp32, dynamic_batch=True, names=["x"])
        quantize_program(fp32, work / f"{name}_int8.onnx", batches({"x": quant.numpy()}, [True]), name)
        sessions[f"{name}_fp32"] = ort_session(str(fp32), threads)
        sessions[f"{name}_int8"] = ort_session(str(work / f"{name}_int8.onnx"), threads)
        if name == "resnet56":  # int8 activations (S8S8) against uint8 (U8S8, what pteenet uses)
            quantize_program(fp32, work / "s8s8.onnx", batches({"x": quant.numpy()}, [True]), name, signed_activations=True)
            sessions["resnet56_int8_s8s8"] = ort_session(str(work / "s8s8.onnx"), threads)
    return sessions


def choose(cal: Any, report: Any, model: Any, prof: Any, max_drop: float) -> dict[str, Any]:
    """The cheapest setting certified on ``cal`` (``sweep-threshold --max-drop --select-exits``'s
    rule), and its numbers on ``report``."""
    c = certify(cal, POLICIES, GRID, max_drop, 0.9, cost=prof, chained=False, max_tail=SweepConfig.max_tail)
    if c.point is None:
        raise SystemExit(f"nothing certified within {max_drop} pt on the calibration half ({cal.num_samples} images)")
    active = c.active or [True] * model.num_exits
    rep = evaluate(restrict(report, active, prof, False), c.point.policy, c.point.thresholds)
    return {"policy": c.point.policy, "thresholds": c.point.thresholds, "active_exits": active, "n_active": sum(active),
            "predicted_time_ratio_vs_int8_backbone_joined": rep.cost, "accuracy": rep.accuracy,
            "drop_pt": 100 * (backbone_point(report).accuracy - rep.accuracy), "exit_fractions": rep.exit_fractions,
            "certified_bound_pt": 100 * (c.guarantee.bound or 0.0), "confidence": 0.9, "max_drop_pt": max_drop}


def staged_program(model: Any, setting: dict[str, Any], quant: torch.Tensor, work: Path, threads: int, parts: Any) -> StagedModel:
    """The INT8 program ``export --quantize int8`` writes for this setting (from the parts already quantized)."""
    model.set_thresholds(setting["thresholds"], setting["policy"])
    model.set_active(setting["active_exits"])
    export_pieces(model, work / "fp32", onnx=True)
    quantize_staged(model, work / "fp32", work / INT8_FOLDER, quant, {"images": len(quant)}, parts=parts)
    return StagedModel(work / INT8_FOLDER, onnx_runner(threads))


def accuracy(fn: Callable[[np.ndarray], np.ndarray], images: torch.Tensor, labels: np.ndarray) -> float:
    preds = np.concatenate([fn(x.numpy()).argmax(1) for x in images.split(256)])
    return float((preds == labels).mean())


def summary(t: dict[str, Any], n_images: int, fp32: str, int8: str) -> dict[str, Any]:
    out = {}
    for name, v in t.items():
        ms = 1e3 * np.asarray(v["per_batch"])
        out[name] = {"time_ratio_vs_fp32_backbone": v["total_s"] / t[fp32]["total_s"],
                     "time_ratio_vs_int8_backbone": v["total_s"] / t[int8]["total_s"],
                     "ms_per_batch_mean": float(ms.mean()), "p50_ms": float(np.percentile(ms, 50)),
                     "p99_ms": float(np.percentile(ms, 99)), "ms_per_image": 1e3 * v["total_s"] / n_images}
    return out


def main() -> None:  # noqa: PLR0915 - one linear script
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--backbones", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quant-images", type=int, default=512)
    ap.add_argument("--test-images", type=int, default=None, help="first N test images (default: all 10,000)")
    ap.add_argument("--images-1", type=int, default=400)
    ap.add_argument("--images-256", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-drop", type=float, default=1.0)
    ap.add_argument("--smoke", action="store_true", help="small counts, to check the script (figures mean nothing)")
    ap.add_argument("--overheads", action="store_true", help="also where INT8 time goes (int8_overheads.py)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if args.smoke:
        args.quant_images, args.test_images, args.images_1, args.images_256, args.repeats = 64, 800, 30, 256, 2
        args.max_drop = max(args.max_drop, 5.0)
    torch.set_num_threads(args.threads)
    load = {"before": os.getloadavg()}
    model = load_checkpoint(args.model).model.eval()
    splits = load_splits(eval_data(argparse.Namespace(data=args.data, eval_limit=None)), model.info.preprocess,
                         model.info.num_classes)
    test = splits.test if args.test_images is None else Subset(splits.test, range(args.test_images))
    n = len(test)
    halves = report_half(n, 0), report_half(n, 1)
    out: dict[str, Any] = {"setup": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                     "cpu_int8": cpu_int8_instructions(), "cpu_count": os.cpu_count(),
                                     "protocol": "B: chosen on one random half of test, reported and timed on the other"}}
    with tempfile.TemporaryDirectory(prefix="cifar10-int8-") as tmp, torch.inference_mode():
        work = Path(tmp)
        with int8_exits(model, splits.calibration, args.quant_images, "cifar10 jpeg", args.threads) as (exits, record):
            quant, _ = quantization_images(splits.calibration, args.quant_images, "cifar10 jpeg")
            cache = exits.cache(test, 256, 0, description="test")
            cal, report = cache.take(halves[0]), cache.take(halves[1])
            images = torch.stack([test[int(i)][0] for i in halves[1][:max(args.images_1, args.images_256)]])
            profs = {bs: profile_onnx(model, images[:bs], repeats=5, warmup=2, threads=args.threads, parts=exits.parts)
                     for bs in (1, 256)}
            out["quantization"] = record
            out["int8_cache"] = {"backbone_agreement_with_fp32": float((cache.preds[-1] == cache.backbone_preds).mean()),
                                 "fp32_backbone_accuracy_report_half": backbone_point(report).accuracy}
            chosen = {bs: choose(cal, report, model, profs[bs], args.max_drop) for bs in (1, 256)}
            sessions = plain_programs(args.backbones, quant, work, args.threads)
            # The INT8 backbone the staged program is cut from (stage programs joined): what its
            # cuts (a QDQ pair per stage boundary) cost against the backbone quantized whole.
            joined = join(exits.parts, 0, model.num_exits, False, ["x"], ["logits"]).SerializeToString()
            sessions["resnet56_int8_joined"] = ort_session(joined, args.threads)
            ee = {bs: staged_program(model, chosen[bs], quant, work / f"ee{bs}", args.threads, exits.parts) for bs in (1, 256)}
            # The shipped program decides as the cache it was chosen on: checked on report images,
            # exit for exit (where each image leaves) and answer for answer.
            for bs in (1, 256):
                logits, where = ee[bs].run(images.numpy())
                view = restrict(report.take(np.arange(len(images))), chosen[bs]["active_exits"], profs[bs], False)
                want = exit_indices(view, chosen[bs]["policy"], chosen[bs]["thresholds"])
                chosen[bs]["program_matches_cache"] = float(((where == want)
                                                             & (logits.argmax(1) == view.preds[want, np.arange(len(images))])).mean())
            rep_images = torch.stack([test[int(i)][0] for i in halves[1]])
            rep_labels = np.array([int(test[int(i)][1]) for i in halves[1]])
            acc = {name: accuracy(lambda x, s=s: s.run(None, {"x": x})[0], rep_images, rep_labels) for name, s in sessions.items()}
            runs = {name: (lambda x, s=s: s.run(None, {"x": x})) for name, s in sessions.items()}
            results = {}
            for bs, count in ((1, args.images_1), (256, args.images_256)):
                program = ee[bs]
                rs = {**runs, "early_exit_int8": lambda x, p=program: p.run(x)}
                t = timed(rs, [b.numpy() for b in images[:count].split(bs)], args.repeats)
                results[bs] = summary(t, count, "resnet56_fp32", "resnet56_int8")
            load["after"] = os.getloadavg()
            for bs in (1, 256):
                r = results[bs]
                key = f"batch_{bs}"
                out[key] = {
                    "early_exit_int8_certified": {
                        "time_ratio_vs_int8_backbone": r["early_exit_int8"]["time_ratio_vs_int8_backbone"],
                        "time_ratio_vs_fp32_backbone": r["early_exit_int8"]["time_ratio_vs_fp32_backbone"],
                        "accuracy": chosen[bs]["accuracy"], "drop_pt": chosen[bs]["drop_pt"], "setting": chosen[bs],
                        "latency": {k: r["early_exit_int8"][k] for k in ("ms_per_batch_mean", "p50_ms", "p99_ms")}},
                    "int8_backbone": {"time_ratio_vs_fp32_backbone": r["resnet56_int8"]["time_ratio_vs_fp32_backbone"],
                                      "accuracy": acc["resnet56_int8"]},
                    **{key: {"time_ratio_vs_int8_backbone": r[name]["time_ratio_vs_int8_backbone"], "accuracy": acc[name]}
                       for key, name in (("int8_backbone_s8s8", "resnet56_int8_s8s8"),
                                         ("int8_backbone_joined_from_stages", "resnet56_int8_joined"))},
                    **{f"plain_int8_{p}": {"time_ratio_vs_fp32_backbone": r[f"{p}_int8"]["time_ratio_vs_fp32_backbone"],
                                           "accuracy": acc[f"{p}_int8"]} for p in PLAIN[:3]},
                    "plain_fp32": {p: {"time_ratio_vs_fp32_backbone": r[f"{p}_fp32"]["time_ratio_vs_fp32_backbone"],
                                       "accuracy": acc[f"{p}_fp32"]} for p in PLAIN},
                    "timings": r}
            out["profiles"] = {str(bs): p.to_dict() for bs, p in profs.items()}
            if args.overheads:
                from int8_overheads import overheads
                out["overheads"] = overheads(model, chosen[1], exits_images=images[:64], quant=quant, work=work,
                                             threads=args.threads)
    out["load_average"] = load
    args.out.mkdir(parents=True, exist_ok=True)
    name = "cifar10_int8-smoke" if args.smoke else "cifar10_int8"
    (args.out / f"{name}.json").write_text(json.dumps(out, indent=1))
    plot(out, args.out / f"{name}.png")
    print(json.dumps({k: {m: {q: v for q, v in d.items() if q != "setting" and q != "latency"} for m, d in out[k].items()
                          if m not in ("timings", "plain_fp32")} for k in ("batch_1", "batch_256")}, indent=1))
    print("load", load)


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key in zip(axes, ("batch_1", "batch_256")):
        d = doc[key]
        fp = [d["plain_fp32"][p] for p in PLAIN]
        i8 = [d["int8_backbone"] if p == "resnet56" else d[f"plain_int8_{p}"] for p in PLAIN]
        ax.plot([v["time_ratio_vs_fp32_backbone"] for v in fp], [100 * v["accuracy"] for v in fp], "o-", label="plain ResNet-20/32/44/56, FP32")
        ax.plot([v["time_ratio_vs_fp32_backbone"] for v in i8], [100 * v["accuracy"] for v in i8], "s-", label="plain ResNet-20/32/44/56, INT8")
        e = d["early_exit_int8_certified"]
        ax.plot([e["time_ratio_vs_fp32_backbone"]], [100 * e["accuracy"]], "*", ms=14, label="early-exit ResNet-56, INT8 (certified 1 pt)")
        ax.set_title(f"CIFAR-10, ONNX Runtime, {key.replace('_', ' ')}, 1 thread")
        ax.set_xlabel("time / FP32 ResNet-56")
        ax.set_ylabel("test accuracy (report half), %")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
