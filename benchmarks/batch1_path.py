"""The batch-1 path when no sample leaves: what the exits cost a sample that runs to the end.

The default head layout (pool-mlp after every block of CIFAR ResNet-56, cascade, ensemble) with the
threshold set so that nothing leaves, at batch 1, against the plain backbone, interleaved in one
process (order rotated each repeat), medians over images and repeats: with all 27 exits deciding,
and with fewer exits computed (the last deciding exit ends the chain: with a cascade or ensemble
every head before it is computed). Beside each measured ratio, the ``TimeProfile`` prediction
(``runtime/timing.py``), so the cost model is checked against the clock on the same run. Timing does
not depend on the weights, so an attached (untrained) checkpoint serves; without an ensemble in it, a
random one of the right shape is set.

    python benchmarks/batch1_path.py --model r56-default-attached.safetensors [--threads 1]
"""
from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any, Callable

import torch

from common import arguments, start
from pteenet.exits import policies as pol
from pteenet.exits.chain import Ensemble
from pteenet.runtime.timing import profile


def main() -> None:
    ap = arguments(__doc__, "batch1_path.json", repeats=5)
    ap.add_argument("--images", type=int, default=64)
    args = ap.parse_args()
    model, load = start(args)
    if model.ensemble is None:
        model.set_ensemble(Ensemble(model.num_exits, model.info.num_classes))
    e = model.num_exits
    never = [pol.never_exit_threshold(model.policy)] * e
    images = torch.randn(args.images, *model.info.preprocess.input_size, generator=torch.Generator().manual_seed(0))
    sets = {"all_27": [True] * e, "last_at_18": [k <= 18 for k in range(e)], "last_at_9": [k <= 9 for k in range(e)],
            "every_3rd_to_18": [k % 3 == 0 and k <= 18 for k in range(e)]}

    def run(active: list[bool]) -> Callable[[torch.Tensor], Any]:
        def f(x: torch.Tensor) -> Any:
            model.set_active(active)
            return model.predict(x, never)
        return f

    runs: dict[str, Callable[[torch.Tensor], Any]] = {"backbone": model.backbone, **{k: run(a) for k, a in sets.items()}}
    with torch.inference_mode():
        model.set_active(None)
        prof = profile(model, images[:1], repeats=9, warmup=2)
        times = interleaved(runs, list(images.split(1)), args.repeats)
    ref = statistics.median(times["backbone"])
    doc = {"threads": args.threads, "images": args.images, "repeats": args.repeats, "torch": torch.__version__,
           "load_average": {**load, "after": os.getloadavg()}, "cpu_count": os.cpu_count(),
           "backbone_ms_p50": 1e3 * ref, "profile": prof.to_dict(),
           "no_exit": {k: {"measured_p50_ratio": statistics.median(times[k]) / ref,
                           "measured_mean_ratio": statistics.fmean(times[k]) / statistics.fmean(times["backbone"]),
                           "predicted_ratio": prof.costs(model.computed_branches(a))[-1], "computed_branches": sum(model.computed_branches(a))}
                       for k, a in sets.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc["no_exit"], indent=1), doc["load_average"])


def interleaved(runs: dict[str, Callable[[torch.Tensor], Any]], batches: list[torch.Tensor], repeats: int) -> dict[str, list[float]]:
    """Seconds per image of each run; the runs take turns image by image, order rotated each repeat."""
    names = list(runs)
    out: dict[str, list[float]] = {n: [] for n in names}
    for n in names:
        for b in batches[:3]:
            runs[n](b)
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for b in batches:
            for n in order:
                t0 = time.perf_counter()
                runs[n](b)
                out[n].append(time.perf_counter() - t0)
    return out


if __name__ == "__main__":
    main()
