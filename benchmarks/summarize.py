"""Print the results tables of docs/benchmarks.md (Markdown) from the files the benchmarks wrote.

    python benchmarks/summarize.py [benchmarks/results/cifar10_resnet.json ...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pteenet.training.config import recorded_configs

RESULTS = Path(__file__).parent / "results"
PROTOCOLS = {"chosen": "A: calibrate on held-out train", "chosen_test_halves": "B: calibrate on test half 1, report half 2"}


def _fmt(c: dict[str, Any] | str | None) -> str:
    if isinstance(c, str):
        return c
    if not c:
        return "none qualifies"
    t = c["test"]
    sel = f", {sum(c['active_exits'])} exits decide" if c.get("active_exits") else ""
    return (f"**{100 * c['test_cost_reduction']:.1f}%** at {c['test_drop_points']:+.2f} pt "
            f"(agreement {100 * t['agreement']:.2f}%, {c['val']['policy']}, {c['val'].get('kind', 'global')}{sel})")


def _setting(r: dict[str, Any]) -> str:
    """What a configuration changes: the branch and loss settings it records."""
    if "config" not in r:  # results written before the head grid
        return f"conv2, v2, λ={r['lambda']}, exit-ce={r.get('exit_ce', 0)}"
    b = r["branch"]
    tr, _ = recorded_configs(r.get("training") or {})  # either record layout
    loss = tr.loss
    return (f"{b['type']}{', cascade' if b.get('cascade') else ''}{', ensemble' if tr.ensemble else ''}; "
            f"{loss.version}, {loss.targets}" + (f" T={loss.temperature}" if loss.targets == "soft" else "")
            + (f", {tr.views} aug. views" if tr.views > 1 else "") + f", {tr.epochs} ep.")


def cifar(doc: dict[str, Any], name: str) -> None:
    limit = doc["setup"].get("train_limit")
    print(f"#### {name}: {doc['setup'].get('epochs')} epochs, {limit if limit not in (None, 'None') else 'all 45,000'} "
          "training images\n")
    print("| configuration | exits | setting | oracle reduction | protocol | ≤ 1 pt drop | ≤ 1 pt drop, exit selection "
          "| ≤ 1 pt drop, per-exit thresholds | agreement ≥ 97.15% |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in doc["configs"]:
        exits = f"all {len(r['exits'])}" if len(r["exits"]) > 8 else ", ".join(r["exits"])
        for i, (key, label) in enumerate(PROTOCOLS.items()):
            if key not in r:
                continue
            head = (f"{r['name']} | {exits} | {_setting(r)} | "
                    f"{100 * (1 - r['oracle_test']['cost']):.1f}%") if i == 0 else " | | |"
            # "-": not measured (results from before exit selection and the split by threshold kind)
            print(f"| {head} | {label} | {_fmt(r[key].get('drop1'))} | {_fmt(r[key].get('drop1_select', '-'))} | "
                  f"{_fmt(r[key].get('drop1_per_exit', '-'))} | {_fmt(r[key].get('agreement9715'))} |")
    print("\nPlain fine-tuned ResNets on the same test images:\n")
    print("| model | MACs | cost vs ResNet-56 | test accuracy |")
    print("|---|---|---|---|")
    for p in doc["plain"]:
        print(f"| {p['model']} | {p['macs'] / 1e6:.1f}M | {p['cost']:.3f} | {100 * p['accuracy']:.2f}% |")
    best = doc.get("best_resnet56")
    if best:
        print(f"\nMeasured speed of {best['name']} (pteenet bench, {doc['setup'].get('threads')} threads, "
              f"{doc['setup'].get('bench_images')} test images):\n")
        print("| operating point | exit fractions | MAC ratio | time ratio, batch 256 | p50 latency ratio, batch 1 |")
        print("|---|---|---|---|---|")
        for point, res in best["timing"].items():
            by_bs = {r["batch_size"]: r for r in res["results"]}
            b256, b1 = by_bs[256], by_bs[1]
            p50 = b1["early_exit"]["latency_ms"]["p50"] / b1["backbone"]["latency_ms"]["p50"]
            fr = ", ".join(f"{f:.2f}" for f in b256["exit_fractions"])
            print(f"| {point} | {fr} | {b256['mac_ratio']:.3f} | {b256['time_ratio']:.3f} | {p50:.3f} |")
        print("\n(ratios are early-exit / backbone: below 1 is faster; time ratio is the inverse of the throughput ratio)")


def main() -> None:
    paths = [Path(p) for p in sys.argv[1:]] or sorted(p for p in RESULTS.glob("cifar10_resnet*.json") if not p.stem.endswith("-summary"))
    for path in paths:
        cifar(json.loads(path.read_text()), path.name)
        print()


if __name__ == "__main__":
    main()
