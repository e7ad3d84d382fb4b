"""CalexNet's survivor training on the default ResNet-56 model, one round and two, as the CLI runs it.

Round r starts from the model of round r-1 (round 0: ``cifar10_resnet.py``'s ``r56-default``):

1. ``sweep-threshold --policy max-softmax --max-drop 1 --cost macs --write``: the exit rule whose
   survivors the heads learn from, chosen and certified on the calibration split;
2. ``train-branches --survivors``: every head retrained (the tool's sized epochs, the benchmark's
   learning rate) on the training images that reach it under that rule.

A round whose sweep finds that nothing pays (no exit decides) ends the study: every image would
reach every head, which is a plain training round. Each round's model is written to ``--work`` as
``r56-survivors{r}.safetensors``; measure it with ``cifar10_decisions.py --model
survivors{r}=WORK/r56-survivors{r}`` (the test cache, with each exit's logits, is built there from
the checkpoint's recorded data). The rounds' sweeps and training records
go to ``benchmarks/results/cifar10_survivors.json``.

    python benchmarks/cifar10_survivors.py --model /work/cache/bench-cifar10/r56-default \\
        --data /work/cache/cifar10 --features /work/cache/bench-cifar10/features [--rounds 2] [--work /work/cache/bench-cifar10]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from common import cli


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="PREFIX of the first-round model (PREFIX.safetensors)")
    ap.add_argument("--data", type=Path, required=True, help="unpacked cifar10-jpeg-q75 folder (train/, test/): the first round's data")
    ap.add_argument("--features", type=Path, required=True, help="the feature cache folder of its training (--cache-dir)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-drop", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=2e-3, help="cifar10_resnet.py's learning rate")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache/pteenet/bench-cifar10")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results/cifar10_survivors.json")
    args = ap.parse_args()
    doc: dict[str, Any] = {"setup": {"model": f"{args.model}.safetensors", "rounds": args.rounds, "max_drop": args.max_drop,
                                     "rule": "max-softmax, every exit deciding, MACs, certified at 0.9 on the calibration split",
                                     "lr": args.lr, "loadavg_start": os.getloadavg()}, "rounds": []}
    src = Path(f"{args.model}.safetensors")
    for r in range(1, args.rounds + 1):
        t0 = time.time()
        tuned, out = args.work / f"r56-survivors{r}-rule.safetensors", args.work / f"r56-survivors{r}.safetensors"
        sweep = cli("sweep-threshold", str(src), "-o", str(args.work / f"r56-survivors{r}-sweep"), "--policy", "max-softmax",
                    "--max-drop", str(args.max_drop), "--cost", "macs", "--write", str(tuned))
        if sweep.get("nothing_pays"):  # no exit decides: every image would reach every head, a plain round
            doc["rounds"].append({"round": r, "from": str(src), "nothing_pays": sweep["nothing_pays"]})
            print(f"round {r}: nothing pays on {src}, no rule to train the survivors of", flush=True)
            break
        out.unlink(missing_ok=True)
        train = cli("train-branches", str(tuned), "-o", str(out), "--survivors", "--data", f"imagefolder:{args.data}",
                    "--no-augment", "--cache-features",
                    "--cache-dir", str(args.features), "--lr", str(args.lr))
        chosen = sweep.get("chosen") or {}
        doc["rounds"].append({"round": r, "from": str(src), "model": str(out), "seconds": time.time() - t0,
                              "rule": {k: chosen.get(k) for k in ("policy", "threshold", "accuracy", "cost", "exit_fractions")},
                              "training": {k: train["final"].get(k) for k in ("epochs_done", "seconds", "val")}})
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"round {r}: {out} ({time.time() - t0:.0f} s)", flush=True)
        src = out
    doc["setup"]["loadavg_end"] = os.getloadavg()
    args.out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
