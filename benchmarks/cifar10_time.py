"""CIFAR-10 on the clock: the trained default early-exit ResNet-56 against the plain fine-tuned
ResNet-20/32/44/56, timed in the same process and runtime, interleaved, medians.

Inputs: a trained checkpoint (the README's commands: pool-mlp after every block, cascade, ensemble),
its exit cache of the 10,000 test images (``ExitCache.save``), the unpacked CIFAR-10 JPEG folder and
the fine-tuned backbones (../shared/data/README.md).

Protocol B (as ``cifar10_resnet.py``): thresholds and exit selection are chosen on one random half
of test and reported on the other. For each deployment setting the operating point is the cheapest
within 1 accuracy point of the backbone on the calibration half, priced in predicted time from a
``TimeProfile`` measured here (``runtime/timing.py``) at that batch size, with time-priced exit
selection (batch 1 also with the CLI's default ``max_tail``: a sample that takes no exit pays at most that, measured
here and the predicted bound tightened until it holds, as ``sweep-threshold`` does: ``sweep/choice.py``); the
MAC-priced choice (``sweep-threshold --cost macs``) is timed beside it, and so is the CLI's default
rule: the cheapest setting certified at confidence 0.9 (``pteenet.sweep.certify``: every policy, exit
selection on 30% of the calibration half, the no-exit tail bounded the same way), for each batch size. Then, on report-half images
preloaded in memory, the models take turns batch by batch (a seeded random order for each batch), after a warm-up:
eager batch 256, eager batch 1 (mean, p50, p99 per image), ONNX Runtime batch 1 (the plain models
exported whole, the early-exit model as staged pieces driven by ``run_staged.py``, with the exits
chosen on eager prices and on a profile measured in ONNX Runtime, ``runtime/ort_timing.py``). At batch
1 each model is also timed back to back (alone over all images: warm caches, a process that serves
only this model). Ratios are to plain ResNet-56 in the same runtime and run; ``os.getloadavg()`` is
recorded before and after; glibc's allocator is tuned as ``pteenet bench`` does (``--no-tune-allocator``).

    python benchmarks/cifar10_time.py --model M.safetensors --test-cache M-test.npz --data /tmp/cifar \
        --backbones ../shared/data/backbones/cifar10-jpeg [--threads 1] [--out benchmarks/results] [--tag -NAME]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import backbone_file, eval_data, pareto_dicts, report_half  # noqa: E402

from pteenet import load_checkpoint  # noqa: E402
from pteenet.backbones.specs import load_backbone  # noqa: E402
from pteenet.runtime.timing import tune_allocator  # noqa: E402
from pteenet.data import load_splits  # noqa: E402
from pteenet.exits import policies as pol  # noqa: E402
from pteenet.exits.chain import computed_branches  # noqa: E402
from pteenet.export.driver import StagedModel, onnx_runner  # noqa: E402
from pteenet.export.staged import export_pieces  # noqa: E402
from pteenet.runtime.ort_timing import profile_onnx  # noqa: E402
from pteenet.runtime.timing import TimeProfile, measure_tail, profile  # noqa: E402
from pteenet.sweep.choice import guard_tail  # noqa: E402
from pteenet.sweep import ExitCache, SweepConfig, backbone_point, certify, evaluate, pareto, restrict, select, select_exits, sweep_global  # noqa: E402

POLICIES = ("confidence", "max-softmax", "entropy")
PLAIN = ("resnet20", "resnet32", "resnet44", "resnet56")
GRID = np.round(np.linspace(0, 1, 101), 4)


def choose(cal: ExitCache, report: ExitCache, model: Any, pricing: Any, max_tail: float | None) -> dict[str, Any]:
    """The cheapest point within 1 pt on ``cal`` under ``pricing`` (global threshold, every policy,
    with and without exit selection), and its numbers on ``report``."""
    e = model.num_exits
    priced = restrict(cal, [True] * e, pricing, model.chained)
    cands = [(p, [True] * e) for p in [select([q for q in sweep_global(priced, policy, GRID)], backbone_point(priced),
                                              max_drop=1.0) for policy in POLICIES] if p is not None]
    for policy in POLICIES:
        try:
            s = select_exits(cal, pricing, model.chained, policy, GRID, max_drop=1.0, max_tail=max_tail)
            cands.append((s.point, s.active))
        except Exception:  # noqa: BLE001 - a policy with no feasible selection
            continue
    def tail(active: list[bool]) -> float:
        return pricing.costs(computed_branches(active, model.chained))[-1]
    # Where no selection keeps the tail under max_tail within 1 pt, say so and take the cheapest.
    meets = [c for c in cands if max_tail is None or tail(c[1]) <= max_tail + 1e-9]
    point, active = min(meets or cands, key=lambda c: (c[0].cost, -c[0].metric))
    return {**measured(point, active, report, model, pricing), "max_tail": max_tail,
            "max_tail_met": bool(meets) if max_tail is not None else None}


def certified(cal: ExitCache, report: ExitCache, model: Any, pricing: Any, max_tail: float | None) -> dict[str, Any]:
    """What ``sweep-threshold --max-drop 1 --select-exits`` chooses by default: the cheapest setting
    certified at confidence 0.9 (every policy, exits chosen on 30% of ``cal``), on ``report``."""
    c = certify(cal, POLICIES, GRID, 1.0, 0.9, cost=pricing, chained=model.chained, max_tail=max_tail)
    if c.point is None:
        raise SystemExit("nothing certified on the calibration half")
    active = c.active or [True] * model.num_exits
    return {**measured(c.point, active, report, model, pricing), "max_tail": max_tail,
            "certified_bound_pt": 100 * (c.guarantee.bound or 0.0), "confidence": 0.9}


def tail_checked(rule: Callable[..., dict[str, Any]], cal: ExitCache, report: ExitCache, model: Any, prof: TimeProfile,
                 max_tail: float | None, x: torch.Tensor) -> dict[str, Any]:
    """``rule`` (``choose`` or ``certified``) with the no-exit tail measured and the predicted bound
    tightened while it is over ``max_tail``, as ``sweep-threshold`` does (``sweep.choice.guard_tail``)."""
    if max_tail is None:
        return rule(cal, report, model, prof, None)

    def pick(bound: float) -> Any:
        d = rule(cal, report, model, prof, bound)
        return d, d["active_exits"], d  # never None: guard_tail measures every pick

    def tail(active: list[bool]) -> float:
        return float(measure_tail(model, x, active)["ratio"])
    (_, _, d), record = guard_tail(pick, tail, prof, model.chained, model.num_exits, max_tail)
    return {**d, "tail_check": record}


def measured(point: Any, active: list[bool], report: ExitCache, model: Any, pricing: Any) -> dict[str, Any]:
    """A setting chosen on the calibration half, and its numbers on ``report``."""
    rep = evaluate(restrict(report, active, pricing, model.chained), point.policy, point.thresholds)
    computed = computed_branches(active, model.chained)
    timed_ = isinstance(pricing, TimeProfile)
    return {"policy": point.policy, "thresholds": point.thresholds, "active_exits": active,
            "n_active": sum(active), "predicted_time_ratio_cal": point.cost,
            "predicted_time_ratio": rep.cost if timed_ else None,
            "mac_ratio": float(np.dot(rep.exit_fractions, model.cost.costs(computed))), "accuracy": rep.accuracy,
            "drop_pt": 100 * (backbone_point(report).accuracy - rep.accuracy), "exit_fractions": rep.exit_fractions,
            "no_exit_predicted": pricing.costs(computed)[-1] if timed_ else None}


def front(report: ExitCache, model: Any, prof: TimeProfile, active: list[bool]) -> list[dict[str, Any]]:
    """Accuracy against predicted time on the report half (global thresholds, the chosen exits)."""
    r = restrict(report, active, prof, model.chained)
    pts = [p for policy in POLICIES for p in pareto(sweep_global(r, policy, GRID))]
    return pareto_dicts([{"cost": p.cost, "accuracy": p.accuracy} for p in pts])


def timed(runs: dict[str, Callable[[Any], Any]], batches: list[Any], repeats: int) -> dict[str, Any]:
    """Seconds per batch for every run, the runs taking turns batch by batch, so that a burst of other
    load on the shared machine hits every model alike. The order is a fresh seeded permutation for
    every batch: what ran just before decides which weights are still in the CPU's caches, and a fixed
    order would give each model the same predecessor every time (one setting timed twice in a rotated
    order differed by 0.04 of the backbone's time at batch 1)."""
    names = list(runs)
    per: dict[str, list[float]] = {n: [] for n in names}
    totals: dict[str, list[float]] = {n: [] for n in names}
    for name in names:  # warm-up
        for b in batches[:3]:
            runs[name](b)
    rng = np.random.default_rng(0)
    for _ in range(repeats):
        round_s = dict.fromkeys(names, 0.0)
        for b in batches:
            for name in rng.permutation(names):
                t0 = time.perf_counter()
                runs[name](b)
                dt = time.perf_counter() - t0
                per[name].append(dt)
                round_s[name] += dt
        for name in names:
            totals[name].append(round_s[name])
    return {n: {"total_s": statistics.median(totals[n]), "per_batch": per[n]} for n in names}


def timed_alone(runs: dict[str, Callable[[Any], Any]], batches: list[Any], repeats: int) -> dict[str, Any]:
    """As ``timed``, but each run goes over every batch back to back (the runs in a fresh seeded order
    each repeat): a process that runs only this model, whose weights stay in the CPU's caches."""
    names = list(runs)
    per: dict[str, list[float]] = {n: [] for n in names}
    totals: dict[str, list[float]] = {n: [] for n in names}
    rng = np.random.default_rng(1)
    for _ in range(repeats):
        for name in rng.permutation(names):
            for b in batches[:3]:  # warm-up: this run's weights into the caches
                runs[name](b)
            total = 0.0
            for b in batches:
                t0 = time.perf_counter()
                runs[name](b)
                dt = time.perf_counter() - t0
                per[name].append(dt)
                total += dt
            totals[name].append(total)
    return {n: {"total_s": statistics.median(totals[n]), "per_batch": per[n]} for n in names}


def summarise(t: dict[str, Any], n_images: int) -> dict[str, Any]:
    ref = t["resnet56"]
    out = {}
    for name, v in t.items():
        ms = 1e3 * np.asarray(v["per_batch"])
        out[name] = {"time_ratio": v["total_s"] / ref["total_s"], "ms_per_image_mean": 1e3 * v["total_s"] / n_images,
                     "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
                     "p50_ratio": float(np.percentile(ms, 50) / np.percentile(1e3 * np.asarray(ref["per_batch"]), 50))}
    return out


def onnx_plain(module: torch.nn.Module, path: Path) -> None:
    x = torch.zeros(2, 3, 32, 32)
    with contextlib.redirect_stdout(io.StringIO()):
        ep = torch.export.export(module, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        torch.onnx.export(ep, f=str(path), dynamo=True, external_data=False, input_names=["x"], output_names=["logits"])


def main() -> None:  # noqa: PLR0915 - one linear script
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--test-cache", type=Path)
    ap.add_argument("--data", type=Path)
    ap.add_argument("--backbones", type=Path)
    # One thread: on a shared, oversubscribed CPU, threads that wait for each other at every op's
    # barrier turn the others' load into stalls (a smoke run here under load 8: ResNet-56 at batch 1 took
    # 10x longer at 2 threads than at 1).
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--images-256", type=int, default=1024)
    ap.add_argument("--images-1", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--tag", default="", help="suffix of the results files (cifar10_time{TAG}.json/.png), e.g. -chained")
    ap.add_argument("--max-tail", type=float, default=SweepConfig.max_tail,
                    help="the bound on the predicted no-exit tail (default: the CLI's)")
    ap.add_argument("--no-tune-allocator", action="store_true", help="leave glibc's malloc thresholds as they are")
    ap.add_argument("--table-only", action="store_true", help="print the markdown table of OUT's summary, redraw its plot, and stop")
    args = ap.parse_args()
    if args.table_only:
        doc = json.loads((args.out / f"cifar10_time{args.tag}.json").read_text())
        print(table(doc))
        plot(doc, args.out / f"cifar10_time{args.tag}.png")
        return
    torch.set_num_threads(args.threads)
    # As `pteenet bench` does (both models alike): glibc's mmap/munmap of every large activation
    # makes batch-256 stage times erratic (the eight stage-1 blocks, the same work, took 34-86 ms
    # in the batch-256 profile of the summary before this change) and the profile, and so the
    # exits chosen, noisy with it (runtime/timing.py, tune_allocator).
    allocator = None if args.no_tune_allocator else tune_allocator()
    load = {"before": os.getloadavg()}
    model = load_checkpoint(args.model).model.eval()
    cache = ExitCache.load(args.test_cache)
    n = cache.num_samples
    cal, report = cache.take(report_half(n, 0)), cache.take(report_half(n, 1))
    splits = load_splits(eval_data(argparse.Namespace(data=args.data, eval_limit=args.eval_limit)),
                         model.info.preprocess, model.info.num_classes)
    idx = report_half(n, 1)[: max(args.images_256, args.images_1)]
    images = torch.stack([splits.test[int(i)][0] for i in idx])
    model.set_active(None)
    with torch.inference_mode():
        check = model.forward_all(images[:32])
    agree = float((check.exit_logits[-1].argmax(1).numpy() == cache.preds[-2, idx[:32]]).mean())
    assert agree >= 0.95, f"the exit cache does not match the test split's order ({agree:.2f})"
    profs = {bs: profile(model, images[:bs], repeats=7, warmup=2) for bs in (1, 256)}
    prof_ort = profile_onnx(model, images[:1], repeats=7, warmup=2, threads=args.threads)
    settings = {"eager_b256": choose(cal, report, model, profs[256], None),
                "eager_b1": tail_checked(choose, cal, report, model, profs[1], args.max_tail, images[:1]),
                "eager_b1_mean_only": choose(cal, report, model, profs[1], None),
                "macs": choose(cal, report, model, model.cost, None),
                "eager_b256_certified": certified(cal, report, model, profs[256], args.max_tail),
                "eager_b1_certified": tail_checked(certified, cal, report, model, profs[1], args.max_tail, images[:1]),
                "onnxruntime_b1": choose(cal, report, model, prof_ort, args.max_tail)}
    plain = {bb: load_backbone(f"cifar-{bb}", str(backbone_file(args.backbones, bb)))[0].eval() for bb in PLAIN}
    acc_plain = plain_accuracy(plain, splits, n)
    mac_plain = plain_macs(plain)

    def ee(setting: dict[str, Any], never: bool = False) -> Callable[[Any], Any]:
        ts = [pol.never_exit_threshold(setting["policy"])] * model.num_exits if never else setting["thresholds"]

        def run(x: torch.Tensor) -> Any:
            model.set_active(setting["active_exits"])
            return model.predict(x, ts, setting["policy"])
        return run

    results: dict[str, Any] = {}
    with torch.inference_mode():
        b256 = list(images[: args.images_256].split(256))
        runs = {**plain, "early_exit": ee(settings["eager_b256"]), "early_exit_macs_choice": ee(settings["macs"]),
                "early_exit_certified": ee(settings["eager_b256_certified"])}
        results["eager_b256"] = summarise(timed(runs, b256, args.repeats), len(b256) * 256)
        b1 = list(images[: args.images_1].split(1))
        runs = {**plain, "early_exit": ee(settings["eager_b1"]), "early_exit_mean_only": ee(settings["eager_b1_mean_only"]),
                "early_exit_macs_choice": ee(settings["macs"]), "early_exit_certified": ee(settings["eager_b1_certified"]),
                "no_exit_selected": ee(settings["eager_b1"], True),
                "no_exit_certified": ee(settings["eager_b1_certified"], True),
                "no_exit_all_27": ee({**settings["eager_b1"], "active_exits": [True] * model.num_exits}, True)}
        results["eager_b1"] = summarise(timed(runs, b1, args.repeats), len(b1))
        runs = {**plain, "early_exit": ee(settings["eager_b1"]), "early_exit_certified": ee(settings["eager_b1_certified"]),
                "no_exit_selected": ee(settings["eager_b1"], True)}
        results["eager_b1_alone"] = summarise(timed_alone(runs, b1, args.repeats), len(b1))
    results.update(ort_times(model, plain, settings, images[: args.images_1], args))
    load["after"] = os.getloadavg()
    doc = build(settings, results, profs, acc_plain, report, model, load, args)
    doc["profiles"]["onnxruntime_1"] = prof_ort.to_dict()
    doc["allocator"] = allocator
    for rt in doc["plain"].values():
        for bb, v in rt.items():
            v["mac_ratio"] = mac_plain[bb]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"cifar10_time{args.tag}.json").write_text(json.dumps(doc, indent=1))
    plot(doc, args.out / f"cifar10_time{args.tag}.png")
    print(json.dumps({k: doc[k] for k in ("chosen", "load_average")}, indent=1))


def plain_macs(plain: dict[str, torch.nn.Module]) -> dict[str, float]:
    """Each plain model's MACs as a share of ResNet-56's."""
    from pteenet.tracing.cost import cumulative_macs, node_macs
    from pteenet.tracing.graph import trace

    macs = {}
    for k, m in plain.items():
        tb = trace(m, (3, 32, 32))
        macs[k] = cumulative_macs(tb, node_macs(tb, (3, 32, 32)))[-1]
    return {k: v / macs["resnet56"] for k, v in macs.items()}


def plain_accuracy(plain: dict[str, torch.nn.Module], splits: Any, n: int) -> dict[str, float]:
    """Accuracy of each plain model on the report half of test."""
    half = set(report_half(n, 1).tolist())
    loader = torch.utils.data.DataLoader(splits.test, batch_size=500)
    hits: dict[str, list[np.ndarray]] = {k: [] for k in plain}
    with torch.inference_mode():
        for x, y in loader:
            for k, m in plain.items():
                hits[k].append((m(x).argmax(1) == y).numpy())
    keep = np.array(sorted(half))
    return {k: float(np.concatenate(v)[keep].mean()) for k, v in hits.items()}


def ort_times(model: Any, plain: dict[str, torch.nn.Module], settings: dict[str, Any], images: torch.Tensor,
              args: argparse.Namespace) -> dict[str, Any]:
    """ONNX Runtime at batch 1: the plain models whole, the early-exit model as staged pieces, with
    the exits chosen on eager prices and on ONNX Runtime's own (``profile_onnx``); interleaved and
    back to back."""
    import onnxruntime as ort

    work = Path(tempfile.mkdtemp(prefix="cifar10_time_"))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = args.threads, 1, 3
    runs: dict[str, Callable[[Any], Any]] = {}
    for name, m in plain.items():
        onnx_plain(m, work / f"{name}.onnx")
        s = ort.InferenceSession(str(work / f"{name}.onnx"), opts, providers=["CPUExecutionProvider"])
        runs[name] = lambda x, s=s: s.run(None, {"x": x})
    xs = [x.numpy() for x in images.split(1)]
    same, pieces = {}, {}
    for name, key in (("early_exit", "eager_b1"), ("early_exit_ort_priced", "onnxruntime_b1")):
        setting = settings[key]
        model.set_active(setting["active_exits"])
        model.set_thresholds(setting["thresholds"], setting["policy"])
        export_pieces(model, work / name, onnx=True)
        staged = StagedModel(work / name, onnx_runner(args.threads))
        runs[name] = staged.run
        with torch.inference_mode():
            want = model.predict(images)
        got = np.concatenate([staged.run(x)[1] for x in xs])
        same[name], pieces[name] = float((got == want.exit_index.numpy()).mean()), len(staged.pieces)
    out = {"onnxruntime_b1": summarise(timed(runs, xs, args.repeats), len(xs)),
           "onnxruntime_b1_alone": summarise(timed_alone(runs, xs, args.repeats), len(xs))}
    for res in out.values():
        for name in same:
            res[name].update(same_exits_as_eager=same[name], pieces=pieces[name])
    return out


def build(settings: dict[str, Any], results: dict[str, Any], profs: dict[int, TimeProfile], acc_plain: dict[str, float],
          report: ExitCache, model: Any, load: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    which = {"eager_b256": "eager_b256", "eager_b1": "eager_b1", "onnxruntime_b1": "eager_b1",
             "eager_b1_alone": "eager_b1", "onnxruntime_b1_alone": "eager_b1"}
    chosen = {}
    for runtime, res in results.items():
        s = settings[which[runtime]]
        chosen[runtime] = {"time_ratio": res["early_exit"]["time_ratio"], "mac_ratio": s["mac_ratio"],
                           "accuracy": s["accuracy"], "drop_pt": s["drop_pt"],
                           "predicted_time_ratio": s["predicted_time_ratio"], "p50_ratio": res["early_exit"]["p50_ratio"],
                           "policy": s["policy"], "n_active_exits": s["n_active"],
                           "selection_priced_for": which[runtime]}
    chosen["eager_b1"]["no_exit_time_ratio"] = results["eager_b1"]["no_exit_selected"]["time_ratio"]
    m = settings["eager_b1_mean_only"]
    chosen["eager_b1_mean_only"] = {"time_ratio": results["eager_b1"]["early_exit_mean_only"]["time_ratio"],
                                    "p50_ratio": results["eager_b1"]["early_exit_mean_only"]["p50_ratio"],
                                    "mac_ratio": m["mac_ratio"], "accuracy": m["accuracy"], "drop_pt": m["drop_pt"],
                                    "predicted_time_ratio": m["predicted_time_ratio"], "n_active_exits": m["n_active"],
                                    "no_exit_predicted": m["no_exit_predicted"], "policy": m["policy"]}
    for k in ("eager_b256", "eager_b1"):
        chosen[k]["no_exit_predicted"] = settings[k]["no_exit_predicted"]
    chosen["eager_b1"]["max_tail_met"] = settings["eager_b1"]["max_tail_met"]
    mc = settings["macs"]
    chosen["mac_priced_choice"] = {"accuracy": mc["accuracy"], "drop_pt": mc["drop_pt"], "mac_ratio": mc["mac_ratio"],
                                   "n_active_exits": mc["n_active"],
                                   "time_ratio_eager_b256": results["eager_b256"]["early_exit_macs_choice"]["time_ratio"],
                                   "time_ratio_eager_b1": results["eager_b1"]["early_exit_macs_choice"]["time_ratio"]}
    o = settings["onnxruntime_b1"]  # exits chosen on ONNX Runtime's own prices (profile_onnx)
    for rt in ("onnxruntime_b1", "onnxruntime_b1_alone"):
        r = results[rt]["early_exit_ort_priced"]
        chosen[f"{rt}_ort_priced"] = {"time_ratio": r["time_ratio"], "p50_ratio": r["p50_ratio"],
                                      **{f: o[f] for f in ("mac_ratio", "accuracy", "drop_pt", "predicted_time_ratio",
                                                           "no_exit_predicted", "policy")},
                                      "n_active_exits": o["n_active"], "selection_priced_for": "onnxruntime_b1"}
    chosen["eager_b1_alone_certified"] = {"time_ratio": results["eager_b1_alone"]["early_exit_certified"]["time_ratio"]}
    chosen["eager_b1_alone"]["no_exit_time_ratio"] = results["eager_b1_alone"]["no_exit_selected"]["time_ratio"]
    chosen["eager_b1"]["no_exit_time_ratio_all_27_exits"] = results["eager_b1"]["no_exit_all_27"]["time_ratio"]
    chosen["eager_b1_certified_no_exit"] = {"time_ratio": results["eager_b1"]["no_exit_certified"]["time_ratio"],
                                            "predicted": settings["eager_b1_certified"]["no_exit_predicted"]}
    for k in ("eager_b256", "eager_b1"):  # the CLI's default rule: certified at confidence 0.9
        s, r = settings[f"{k}_certified"], results[k]["early_exit_certified"]
        chosen[f"{k}_certified"] = {"time_ratio": r["time_ratio"], "p50_ratio": r["p50_ratio"],
                                    **{f: s[f] for f in ("mac_ratio", "accuracy", "drop_pt", "predicted_time_ratio",
                                                         "no_exit_predicted", "policy", "certified_bound_pt")},
                                    "n_active_exits": s["n_active"]}
    plain = {rt: {bb: {"time_ratio": res[bb]["time_ratio"], "p50_ratio": res[bb]["p50_ratio"], "accuracy": acc_plain[bb]}
                  for bb in PLAIN} for rt, res in results.items()}
    fronts = {f"predicted_{k}": front(report, model, profs[bs], settings[k]["active_exits"])
              for k, bs in (("eager_b256", 256), ("eager_b1", 1))}
    return {"protocol": "B: thresholds and exit selection on one half of test (5,000), reported on the other",
            "backbone_accuracy_report_half": backbone_point(report).accuracy, "chosen": chosen, "plain": plain,
            "pareto_predicted_time": fronts, "settings": settings, "timings": results,
            "profiles": {str(k): v.to_dict() for k, v in profs.items()}, "load_average": load,
            "threads": args.threads, "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "images": {"batch_256": args.images_256, "batch_1": args.images_1}, "repeats": args.repeats,
            "note": "time ratios are to plain ResNet-56 in the same runtime, interleaved in one process; the machine "
                    "was shared (see load_average), so absolute times are noisy; the Pareto fronts are in predicted "
                    "time (TimeProfile), the chosen points in measured time"}


def table(doc: dict[str, Any]) -> str:
    """The summary as the markdown table of docs/speed.md."""
    rts = ("eager_b256", "eager_b1", "onnxruntime_b1")
    rows = ["| model | accuracy (report half) | MAC ratio | time ratio, eager b256 | mean time ratio, eager b1 "
            "| p50 ratio, eager b1 | mean time ratio, ONNX Runtime b1 |", "|---|---|---|---|---|---|---|"]
    for bb in PLAIN:
        p = {rt: doc["plain"][rt][bb] for rt in rts}
        rows.append(f"| plain {bb} | {100 * p['eager_b1']['accuracy']:.2f}% | {p['eager_b1'].get('mac_ratio', float('nan')):.3f} "
                    f"| {p['eager_b256']['time_ratio']:.3f} | "
                    f"{p['eager_b1']['time_ratio']:.3f} | {p['eager_b1']['p50_ratio']:.3f} | "
                    f"{p['onnxruntime_b1']['time_ratio']:.3f} |")
    c = doc["chosen"]
    b1 = doc["settings"]["eager_b1"]  # the bound asked for (the sweep may have tightened max_tail to meet it)
    mt = f'{(b1.get("tail_check") or {}).get("max_tail", b1.get("max_tail")):g}'
    for rt, label in (("eager_b256", "--no-guarantee, priced for batch 256"),
                      ("eager_b1", f"--no-guarantee, priced for batch 1, no-exit tail <= {mt}x"),
                      ("eager_b1_mean_only", "--no-guarantee, priced for batch 1, mean only"),
                      ("eager_b256_certified", "certified (the default), priced for batch 256"),
                      ("eager_b1_certified", f"certified (the default), priced for batch 1, tail <= {mt}x")):
        if rt not in c:  # a summary written before the certified rows
            continue
        x = c[rt]
        head = (f"| early exit, {label} ({x['n_active_exits']} exits decide) | {100 * x['accuracy']:.2f}% "
                f"({x['drop_pt']:.2f} pt drop) | {x['mac_ratio']:.3f} | ")
        if rt.startswith("eager_b256"):
            rows.append(head + f"**{x['time_ratio']:.3f}** | - | - | - |")
        else:
            ort = f"**{c['onnxruntime_b1']['time_ratio']:.3f}**" if rt == "eager_b1" else "-"
            rows.append(head + f"- | **{x['time_ratio']:.3f}** | {x['p50_ratio']:.3f} | {ort} |")
    if "onnxruntime_b1_ort_priced" in c:  # a summary written before ONNX Runtime pricing
        x = c["onnxruntime_b1_ort_priced"]
        rows.append(f"| early exit, --no-guarantee, priced for ONNX Runtime batch 1, tail <= {mt}x ({x['n_active_exits']} exits decide) "
                    f"| {100 * x['accuracy']:.2f}% ({x['drop_pt']:.2f} pt drop) | {x['mac_ratio']:.3f} | - | - | - "
                    f"| **{x['time_ratio']:.3f}** |")
    rows.append("")
    if "eager_b1_certified_no_exit" in c:
        t = c["eager_b1_certified_no_exit"]
        rows.append(f"- no exit taken, batch 1: the --no-guarantee exits {c['eager_b1']['no_exit_time_ratio']:.3f} (predicted "
                    f"{c['eager_b1']['no_exit_predicted']:.3f}), the certified choice's (the default) "
                    f"{t['time_ratio']:.3f} (predicted {t['predicted']:.3f})")
    if "eager_b1_alone" in c:
        pa, po = doc["plain"]["eager_b1_alone"], doc["plain"]["onnxruntime_b1_alone"]
        rows.append(f"- back to back (each model alone over the images, warm caches), batch 1: eager early exit "
                    f"{c['eager_b1_alone']['time_ratio']:.3f} (certified {c['eager_b1_alone_certified']['time_ratio']:.3f}), "
                    f"no exit taken {c['eager_b1_alone']['no_exit_time_ratio']:.3f}, plain ResNet-32 {pa['resnet32']['time_ratio']:.3f}, ResNet-20 {pa['resnet20']['time_ratio']:.3f}; "
                    f"ONNX Runtime early exit {c['onnxruntime_b1_alone']['time_ratio']:.3f} (priced for ONNX Runtime "
                    f"{c['onnxruntime_b1_alone_ort_priced']['time_ratio']:.3f}), plain ResNet-32 {po['resnet32']['time_ratio']:.3f}")
    for k, bs in (("eager_b256", "256"), ("eager_b1", "1"), ("eager_b1_mean_only", "1")):
        st = doc["settings"][k]
        r = TimeProfile.from_dict(doc["profiles"][bs]).ratios(st["exit_fractions"])  # the ideal needs no heads
        rows.append(f"- {k}: predicted {st['predicted_time_ratio']:.3f}, with free exits (the backbone's own time "
                    f"per stage only) {r['ideal_time_ratio']:.3f}, MAC ratio {st['mac_ratio']:.3f}; "
                    f"{100 * st['exit_fractions'][-1]:.1f}% run to the end")
    return "\n".join(rows)


TITLES = {"eager_b256": "PyTorch eager, batch 256", "eager_b1": "PyTorch eager, batch 1",
          "onnxruntime_b1": "ONNX Runtime, batch 1"}


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), sharey=True)
    for ax, rt in zip(axes, ("eager_b256", "eager_b1", "onnxruntime_b1")):
        if rt != "onnxruntime_b1":  # the fronts are predicted in eager time only
            f = doc["pareto_predicted_time"][f"predicted_{rt}"]
            ax.plot([p["cost"] for p in f], [100 * p["accuracy"] for p in f], "-", label="early exit, predicted time")
        ort = doc["chosen"].get("onnxruntime_b1_ort_priced") if rt == "onnxruntime_b1" else None
        if ort:
            ax.plot([ort["time_ratio"]], [100 * ort["accuracy"]], "b^", ms=9, label="exits priced in ONNX Runtime, measured")
        c = doc["chosen"][rt]
        ax.plot([c["time_ratio"]], [100 * c["accuracy"]], "r*", ms=12, label="--no-guarantee point, measured")
        cert = doc["chosen"].get(f"{rt}_certified")
        if cert:
            ax.plot([cert["time_ratio"]], [100 * cert["accuracy"]], "gD", ms=8, label="certified point (the default), measured")
        pl = doc["plain"][rt]
        ax.plot([pl[b]["time_ratio"] for b in PLAIN], [100 * pl[b]["accuracy"] for b in PLAIN], "ks--",
                label="plain ResNet-20/32/44/56, measured")
        ax.set_title(TITLES.get(rt, rt))
        ax.set_xlabel("time, share of plain ResNet-56 (same runtime)")
        ax.grid(alpha=0.3)
        ax.set_xlim(0.2, 1.3)
    axes[0].set_ylabel("accuracy, report half of CIFAR-10 JPEG test (%)")
    axes[0].set_ylim(84, 91)
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
