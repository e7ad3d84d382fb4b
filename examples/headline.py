"""Print the demo's headline from the sweep document: the chosen point on test vs the backbone.

With ``--save FILE`` the same figures are also written as JSON (``make demo`` writes
``runs/demo/headline.json``; ``benchmarks/results/demo.json`` is a copy of one such run).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--seconds", type=int, default=None)
    ap.add_argument("--save", type=Path, default=None, help="also write the figures as JSON here")
    args = ap.parse_args()
    doc = json.loads((args.out / "sweep.json").read_text())
    chosen = doc["chosen"]
    test = chosen.get("test") or chosen
    bb = test.get("backbone") or doc["backbone"]
    pct = lambda v: f"{100 * v:.2f}%"  # noqa: E731
    report = json.loads((args.out / "export" / "report.json").read_text())
    active = report.get("active_exits") or [True] * len(report["exits"])
    exits = ", ".join(e["name"] for e, a in zip(report["exits"], active) if a)
    print(f"pteenet demo: {doc['data']['spec']}, {report['backbone']['spec']} backbone, "
          f"{len(report['exits'])} {report['branch']} exits; {sum(active)} decide, at {exits}")
    print(f"  backbone      accuracy {pct(bb['accuracy'])}  cost 1.000")
    macs = test.get("mac_cost", test["cost"])
    timed = test.get("time_cost")
    print(f"  early exit    accuracy {pct(test['accuracy'])}  agreement {pct(test['agreement'])}  "
          f"mean MACs {macs:.3f} ({pct(abs(1 - macs))} {'fewer' if macs <= 1 else 'MORE'})"
          + ("" if timed is None else f", predicted time {timed:.3f} at batch {doc['cost_model']['batch_size']}")
          + f"  [test split; {chosen['policy']} threshold chosen on the calibration split]")
    if doc.get("guarantee"):
        g = doc["guarantee"]
        print(f"  guarantee     certified bound on the drop {g['bound_points']:.2f} pt "
              f"(target {g['target_points']:g} pt, {g['confidence']:.0%} confidence)")
    print(f"  report        {args.out / 'export' / 'report.md'}")
    print(f"  plots         {args.out / 'sweep' / 'curve.png'}, {args.out / 'sweep' / 'exits.png'}")
    print(f"  model         {args.out / 'export' / 'model.safetensors'}  (pteenet.load(path))")
    if args.seconds is not None:
        print(f"  took {args.seconds} s")
    if args.save is not None:
        record = {"data": doc["data"]["spec"], "backbone_spec": report["backbone"]["spec"],
                  "branch": report["branch"], "exits": len(report["exits"]), "deciding_exits": sum(active),
                  "policy": chosen["policy"], "split": "test", "backbone_accuracy": bb["accuracy"],
                  "accuracy": test["accuracy"], "agreement": test["agreement"], "cost": macs, "time_cost": timed,
                  "cost_model": {k: doc.get("cost_model", {}).get(k) for k in ("kind", "batch_size", "max_tail")},
                  "guarantee": doc.get("guarantee"), "seconds": args.seconds,
                  "machine": {"cpus": os.cpu_count(), "load_average": list(os.getloadavg()),
                              "python": platform.python_version()}}
        args.save.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
