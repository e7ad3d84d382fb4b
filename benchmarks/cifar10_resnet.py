"""CIFAR-10 benchmark: PTEENet exits on the fine-tuned CIFAR ResNets vs. the plain smaller ResNets.

Inputs (see ../shared/data/README.md): the unpacked CIFAR-10 JPEG set (``DATA/train``, ``DATA/test``)
and the folder of fine-tuned backbones (``resnet{20,32,44,56}_cifar10jpeg.safetensors``).

For each configuration of the grid: attach conv2 branches, train them on the backbone's own argmax
(v2 loss, cached features, no augmentation), build the exit caches of the calibration split (10% of
train, never trained on) and of the test split, sweep every policy with global and per-exit
thresholds, pick the operating points on the calibration split, and report them on test:
- the cheapest point whose calibration accuracy is at most 1 point below the backbone's;
- the cheapest point whose calibration agreement with the backbone is >= 97.15% (the paper's point).
Cost is the mean cumulative cost: backbone prefix + every branch a sample passed through, as a share
of the backbone. The best configuration's operating point is then timed with ``pteenet.bench.run``.

    python benchmarks/cifar10_resnet.py --data DIR --backbones DIR [--grid quick|full] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import backbone_file, best_b, eval_data, pareto_dicts, report_half
from pteenet import AttachConfig, load_checkpoint, save_checkpoint
from pteenet import attach
from pteenet.bench.run import BenchConfig, bench
from pteenet.errors import PteenetError
from pteenet.data import DataConfig, load_splits
from pteenet.training.loss import LossConfig
from pteenet.sweep import ExitCache, Point, backbone_point, build_cache, evaluate, oracle_point, pareto, restrict, search_per_exit, select_exits, sweep_global
from pteenet.training.run import TrainConfig, train_branches

POLICIES = ("confidence", "max-softmax", "entropy")
PAPER_AGREEMENT = 0.9715
L2L3 = {"at": ["layer2.0", "layer2.4", "layer2.8", "layer3.2", "layer3.5"]}  # the README floor's second set
MIXED = {"at": ["layer1.6", "layer2.1", "layer2.5", "layer3.0", "layer3.4"]}
# The paper's ConvX setting: conv2 branches, v2 loss with lambda 0.9 on the backbone's argmax.
PAPER = {"branch": "conv2", "cascade": False, "loss": {"version": "v2", "targets": "pseudo", "temperature": 1.0},
         "ensemble": False}


def cfg(name: str, backbone: str = "resnet56", loss: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    """One configuration: AttachConfig fields, TrainConfig fields (ensemble, views, augment, epochs)
    and LossConfig fields under ``loss``. Anything not given is the tool's default."""
    return {"name": name, "backbone": backbone, "loss": loss or {}, **kw}


# The chained configuration (r56-chained): each branch reads the previous exit's logits, and exit i answers
# with an ensemble of branches 0..i. In cifar10_resnet.json (the grid) and learning_curve.json it is named r56-default.
CHAINED = {"cascade": True, "ensemble": True}

# Each lever against the chained configuration (pool-mlp heads after all 27 blocks, cascade, ensemble
# fitted on the calibration split, distillation at temperature 2): one change per row. r56-default is
# the tool's default now: the same heads, unchained (no cascade, no ensemble), so that a head runs only
# where its exit decides, which time-priced exit selection at batch 1 needs (benchmarks/cifar10_time.py).
GRIDS: dict[str, list[dict[str, Any]]] = {
    "heads": [
        cfg("r56-default"),
        cfg("r56-chained", **CHAINED),
        # Lighter heads for batch 1, where each head is a matrix-vector product that reads all its
        # weights: the hidden layer at 32 wide instead of 128 (a quarter of the weights).
        cfg("r56-hidden32", hidden=32),
        cfg("r56-hidden256", hidden=256),  # and wider: better exits for heads that cost more
        cfg("r56-grid2", grid=2),  # a 2x2 pooling grid: a quarter of the first layer's weights
        cfg("r56-epochs20", epochs=20),  # twice the sized number of epochs (10 for 45,000 images)
        cfg("r56-no-ensemble", cascade=True, ensemble=False),
        cfg("r56-no-cascade", cascade=False, ensemble=True),
        cfg("r56-pseudo", loss={"targets": "pseudo", "temperature": 1.0}, **CHAINED),
        cfg("r56-pool-linear", branch="pool", cascade=False, ensemble=False),
        cfg("r20-default", backbone="resnet20", **CHAINED),
        # Three augmented views of every training image in the cache; 5 epochs over them are as
        # many steps as 15 over one view.
        cfg("r56-aug3", views=3, augment=True, epochs=5, **CHAINED),
        cfg("r56-mixed5", **MIXED, **CHAINED),
        # conv-lite has no parameter-free stem, so its cache holds whole taps: 27 of them would need
        # 22 GiB in float16 for the training set; five exits take 3.5 GiB.
        cfg("r56-conv-lite-mixed5", branch="conv-lite", **MIXED, **CHAINED),
    ],
    # The ConvX grid (results/cifar10_resnet-paper.json, written by an earlier version of this
    # script: conv2 branches, 20,000 images and 5 epochs).
    "paper": [
        cfg("r56-paper-fine4", exits=4, placement="fine", **{**PAPER, "loss": {**PAPER["loss"], "exit_ce": 0.0}}),
        cfg("r56-mixed-ce", **MIXED, **PAPER),
        cfg("r56-l2l3-ce", **L2L3, **PAPER),
        cfg("r20-fine4-ce", backbone="resnet20", exits=4, placement="fine", **PAPER),
    ],
}
ATTACH_KEYS = ("at", "exits", "placement", "branch", "cascade", "grid", "hidden")


def curve(cache: ExitCache, grid: Any) -> dict[str, list[dict[str, Any]]]:
    """Global-threshold Pareto front per policy, plus per-exit thresholds along it."""
    out = {}
    for policy in POLICIES:
        glob = sweep_global(cache, policy, grid)
        per_exit = search_per_exit(cache, policy, budgets(glob, 8), grid)
        out[policy] = [p.to_dict() for p in pareto(glob)] + [dict(p.to_dict(), kind="per-exit") for p in per_exit]
    return out


def budgets(points: list[Point], n: int = 12) -> list[float]:
    """Costs spread along the Pareto front: where the per-exit search looks for better settings."""
    front = pareto(points)
    return sorted({p.cost for p in front[:: max(1, len(front) // n)]})


def pick(cal: ExitCache, report: ExitCache, grid: Any, model: Any) -> dict[str, Any]:
    """Operating points chosen on ``cal`` (global and per-exit thresholds, every policy), measured on
    ``report``; ``drop1_select`` adds exit selection (global thresholds, each policy) to ``drop1``."""
    bb_cal, bb_rep = backbone_point(cal), backbone_point(report)
    points = [p for pol in POLICIES for p in sweep_global(cal, pol, grid)]
    points += [p for pol in POLICIES for p in search_per_exit(cal, pol, budgets(points), grid)]
    chosen: dict[str, Any] = {}
    # drop1: one global threshold (what the CLI does without --per-exit); drop1_per_exit adds the
    # per-exit search, which has 27 thresholds to fit on the calibration data and can overfit it.
    for criterion, pts in (("drop1", [p for p in points if p.kind == "global"]), ("drop1_per_exit", points),
                           ("agreement9715", points)):
        p = choose(pts, bb_cal, criterion)
        if p is None:
            chosen[criterion] = None
            continue
        on_report = evaluate(report, p.policy, p.thresholds)
        chosen[criterion] = {"val": p.to_dict(), "test": on_report.to_dict(),
                             "test_drop_points": 100 * (bb_rep.accuracy - on_report.accuracy),
                             "test_cost_reduction": 1 - on_report.cost}
    sels = []
    for policy in POLICIES:
        try:
            sels.append(select_exits(cal, model.cost, model.chained, policy, grid, max_drop=1.0))
        except PteenetError:
            pass
    if sels:
        sel = min(sels, key=lambda s: (s.point.cost, -s.point.metric))
        on_report = evaluate(restrict(report, sel.active, model.cost, model.chained), sel.point.policy,
                             sel.point.thresholds)
        chosen["drop1_select"] = {"val": sel.point.to_dict(), "test": on_report.to_dict(), "active_exits": sel.active,
                                  "test_drop_points": 100 * (bb_rep.accuracy - on_report.accuracy),
                                  "test_cost_reduction": 1 - on_report.cost}
    return chosen


def choose(val_points: list[Point], backbone: Point, criterion: str) -> Point | None:
    """Cheapest calibration point that meets the criterion (1-point accuracy drop, or agreement)."""
    if criterion.startswith("drop1"):
        ok = [p for p in val_points if p.accuracy is not None and p.accuracy >= backbone.accuracy - 0.01]
    else:
        ok = [p for p in val_points if p.agreement >= PAPER_AGREEMENT]
    return min(ok, key=lambda p: p.cost) if ok else None


def run_config(c: dict[str, Any], args: argparse.Namespace, work: Path, grid: Any) -> dict[str, Any]:
    t0 = time.time()
    name, bb = c["name"], c["backbone"]
    attached, trained = work / f"{name}-attached.safetensors", work / f"{name}.safetensors"
    val_npz, test_npz = work / f"{name}-val.npz", work / f"{name}-test.npz"
    if not (args.reuse and trained.exists() and val_npz.exists() and test_npz.exists()):
        model = attach(AttachConfig(backbone=f"cifar-{bb}", weights=str(backbone_file(args.backbones, bb)),
                                    **{k: c[k] for k in ATTACH_KEYS if k in c}))
        save_checkpoint(attached, model)
        data_cfg = DataConfig(spec=f"imagefolder:{args.data}", limit=args.train_limit, augment=c.get("augment", False),
                              calibration_split=0.1, seed=0)
        tcfg = TrainConfig(epochs=c.get("epochs", args.epochs), batch_size=128, lr=args.lr, cache_features=True,
                           cache_dir=str(work / "features"),
                           views=c.get("views", 1), ensemble=c.get("ensemble", TrainConfig.ensemble),
                           loss=LossConfig(**c["loss"]))
        trained.unlink(missing_ok=True)
        train_branches(attached, trained, data_cfg, tcfg)
        model = load_checkpoint(trained).model
        splits = load_splits(eval_data(args), model.info.preprocess, model.info.num_classes)
        build_cache(model, splits.calibration, batch_size=256).save(val_npz)
        # The test cache keeps each exit's logits: learned schedulers (--policy eenet) read them.
        build_cache(model, splits.test, batch_size=256, logits=True).save(test_npz)
    model = load_checkpoint(trained).model
    val, test = ExitCache.load(val_npz), ExitCache.load(test_npz)
    bb_test = backbone_point(test)
    # Protocol A: calibrate on the 10% of train held out from branch training (what the CLI does).
    chosen = pick(val, test, grid, model)
    # Protocol B: the fine-tuned backbone was trained on that split too (97% accuracy there, 89.5% on
    # test), so it is easier than new data. Calibrate on a random half of test instead and report on
    # the other half: thresholds never see the images they are measured on.
    report = test.take(report_half(test.num_samples))
    chosen_test_halves = pick(test.take(report_half(test.num_samples, 0)), report, grid, model)
    front = pareto([p for pol in POLICIES for p in sweep_global(report, pol, grid)])
    return {
        "name": name, "backbone": bb, "config": c, "exits": [e.name for e in model.exit_points],
        "branch": model.branch_config.to_dict(), "training": model.meta.get("training"),
        "cost_table": model.cost.to_dict(), "train_last_epoch": (model.meta.get("history") or [None])[-1],
        "backbone_test": bb_test.to_dict(), "oracle_test": oracle_point(test).to_dict(),
        "oracle_val": oracle_point(val).to_dict(), "test_curves": curve(test, grid), "chosen": chosen,
        "chosen_test_halves": chosen_test_halves,
        "report_half_front": [{"cost": p.cost, "accuracy": p.accuracy, "agreement": p.agreement, "policy": p.policy}
                              for p in front],
        "backbone_report_half": backbone_point(report).to_dict(),
        "seconds": time.time() - t0,
    }


def summary(doc: dict[str, Any], best: dict[str, Any]) -> dict[str, Any]:
    """``cifar10_resnet-summary.json``: the best ResNet-56 configuration under protocol B, the plain models,
    and that configuration's Pareto front on the half of test the thresholds never saw."""
    key, c = best_b(best)  # type: ignore[misc]
    return {
        "backbone": "resnet56", "protocol": "B",
        "best": {"config": best["name"] + ("+select" if key == "drop1_select" else ""),
                 "reduction": c["test_cost_reduction"], "drop_pt": c["test_drop_points"],
                 "agreement": c["test"]["agreement"], "policy": c["val"]["policy"],
                 "active_exits": c.get("active_exits")},
        "protocol_A": {k: best["chosen"].get(k) and {"reduction": best["chosen"][k]["test_cost_reduction"],
                                                     "drop_pt": best["chosen"][k]["test_drop_points"]}
                       for k in ("drop1", "drop1_select", "drop1_per_exit")},
        "per_exit_B": best["chosen_test_halves"].get("drop1_per_exit") and {
            "reduction": best["chosen_test_halves"]["drop1_per_exit"]["test_cost_reduction"],
            "drop_pt": best["chosen_test_halves"]["drop1_per_exit"]["test_drop_points"]},
        "plain": {p["model"]: {"cost": p["cost"], "accuracy": p["accuracy_report_half"],
                               "accuracy_full_test": p["accuracy"]} for p in doc["plain"]},
        "backbone_report_half": {"accuracy": best["backbone_report_half"]["accuracy"]},
        "curve": [{"cost": p["cost"], "accuracy": p["accuracy"]} for p in best["report_half_front"]],
        # Per plain model: does the curve reach its accuracy at no more than its cost (same half)?
        "above_plain": {p["model"]: any(q["cost"] <= p["cost"] and q["accuracy"] >= p["accuracy_report_half"]
                                        for q in best["report_half_front"]) for p in doc["plain"][:-1]},
    }


def plain_points(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Accuracy and MACs of the plain fine-tuned ResNets on the same test images."""
    from pteenet.backbones.specs import load_backbone
    from pteenet.tracing.cost import cumulative_macs, node_macs
    from pteenet.tracing.graph import trace

    out = []
    for bb in ("resnet20", "resnet32", "resnet44", "resnet56"):
        module, info = load_backbone(f"cifar-{bb}", str(backbone_file(args.backbones, bb)))
        splits = load_splits(eval_data(args),
                             info.preprocess, info.num_classes)
        tb = trace(module, info.preprocess.input_size)
        macs = cumulative_macs(tb, node_macs(tb, info.preprocess.input_size))[-1]
        loader = torch.utils.data.DataLoader(splits.test, batch_size=500)
        hits = []
        with torch.no_grad():
            for x, y in loader:
                hits.append((module(x).argmax(1) == y).numpy())
        hit = np.concatenate(hits)
        out.append({"model": bb, "macs": macs, "accuracy": float(hit.mean()),
                    "accuracy_report_half": float(hit[report_half(len(hit))].mean())})
    base = out[-1]["macs"]
    for r in out:
        r["cost"] = r["macs"] / base
    return out


def timing(result: dict[str, Any], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Wall clock of the chosen operating points: throughput at batch 256, p50 latency at batch 1."""
    model = load_checkpoint(work / f"{result['name']}.safetensors").model
    splits = load_splits(eval_data(args),
                         model.info.preprocess, model.info.num_classes)
    images = torch.stack([splits.test[i][0] for i in range(args.bench_images)])
    out = {}
    for protocol in ("chosen", "chosen_test_halves"):
        for criterion in ("drop1", "drop1_select"):  # the headline points; each timing takes minutes
            c = result[protocol].get(criterion)
            if c is None:
                continue
            model.set_active(c.get("active_exits"))
            cfg = BenchConfig(batch_sizes=(1, 256), threshold=c["val"]["threshold"], policy=c["val"]["policy"],
                              threads=args.threads, repeats=args.repeats)
            out[f"{protocol}/{criterion}"] = bench(model, images, cfg)
    return out


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    base = doc["plain"][-1]["macs"]  # every cost on ResNet-56's scale, whatever the configuration's backbone
    for r in doc["configs"]:
        scale = r["cost_table"]["backbone_macs"] / base
        pts = [p for pol in ("max-softmax", "confidence", "entropy") for p in r["test_curves"][pol]]
        front = pareto_dicts(pts)
        ax.plot([scale * p["cost"] for p in front], [100 * p["accuracy"] for p in front], "-",
                label=f"{r['name']} (best of all policies)")
        ax.plot([scale * r["oracle_test"]["cost"]], [100 * r["oracle_test"]["accuracy"]], "*", ms=9,
                color=ax.lines[-1].get_color(), label=f"{r['name']} oracle")
    ax.plot([p["cost"] for p in doc["plain"]], [100 * p["accuracy"] for p in doc["plain"]], "ks--", label="plain ResNet-20/32/44/56")
    ax.set_xlabel("mean cumulative cost (share of ResNet-56 MACs, branches included)")
    ax.set_ylabel("top-1 accuracy on CIFAR-10 JPEG test (%)")
    ax.set_ylim(80, 96)  # the region that matters: within a few points of the backbone
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="unpacked cifar10-jpeg-q75 folder (train/, test/)")
    ap.add_argument("--backbones", type=Path, required=True, help="folder with resnet*_cifar10jpeg.safetensors")
    ap.add_argument("--grid", choices=sorted(GRIDS), default="heads")
    ap.add_argument("--only", nargs="*", help="run only these configuration names")
    ap.add_argument("--epochs", type=lambda v: None if v == "auto" else int(v), default=20,
                    help="N, or auto: the tool's default, sized from the training split (training.config.auto_epochs)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--train-limit", type=int, default=None, help="training images for the branches (of 45,000; default all)")
    ap.add_argument("--eval-limit", type=int, default=None, help="cap on calibration/test images (smoke runs only)")
    ap.add_argument("--tag", default="", help="suffix of the results files (cifar10_resnet{TAG}.json/.png, cifar10_resnet{TAG}-summary.json)")
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from the results JSON and stop")
    ap.add_argument("--finish-only", action="store_true",
                    help="from the results JSON of a run stopped early: time the best configuration, write the summary and plot")
    ap.add_argument("--reuse", action="store_true", help="reuse trained checkpoints and caches found in --work")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bench-images", type=int, default=2048, help="0: no timing")
    ap.add_argument("--plain-from", type=Path, help="a results JSON of this script on the same test images: its plain "
                                                    "models' points instead of evaluating them again")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache/pteenet/bench-cifar10")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if args.plot_only:
        result = args.out / f"cifar10_resnet{args.tag}.json"
        plot(json.loads(result.read_text()), result.with_suffix(".png"))
        return
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    grid = np.round(np.linspace(0, 1, 201), 4)
    configs = [c for c in GRIDS[args.grid] if not args.only or c["name"] in args.only]
    doc: dict[str, Any]
    if args.finish_only:
        doc = json.loads((args.out / f"cifar10_resnet{args.tag}.json").read_text())
        doc["setup"].update({k: str(getattr(args, k)) for k in ("bench_images", "threads", "repeats")})
    else:
        doc = {"setup": {k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__,
               "plain": json.loads(args.plain_from.read_text())["plain"] if args.plain_from else plain_points(args),
               "configs": []}
        for c in configs:
            doc["configs"].append(run_config(c, args, args.work, grid))
            (args.out / f"cifar10_resnet{args.tag}.json").write_text(json.dumps(doc, indent=1))
    r56 = [r for r in doc["configs"] if r["backbone"] == "resnet56" and best_b(r)]
    if r56:
        best = max(r56, key=lambda r: best_b(r)[1]["test_cost_reduction"])
        if args.bench_images:
            doc["best_resnet56"] = {"name": best["name"], "timing": timing(best, args, args.work)}
        (args.out / f"cifar10_resnet{args.tag}-summary.json").write_text(json.dumps(summary(doc, best), indent=1))
    (args.out / f"cifar10_resnet{args.tag}.json").write_text(json.dumps(doc, indent=1))
    plot(doc, args.out / f"cifar10_resnet{args.tag}.png")
    print(json.dumps({r["name"]: {k: (v and {"test_cost_reduction": v["test_cost_reduction"],
                                              "test_drop_points": v["test_drop_points"]}) for k, v in r["chosen"].items()}
                      for r in doc["configs"]}, indent=1))


if __name__ == "__main__":
    main()
