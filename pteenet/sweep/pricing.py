"""How a sweep prices its points: MACs (the cost table) or predicted time (a ``TimeProfile``
measured here, in eager PyTorch by ``runtime/timing.py`` or in ONNX Runtime by
``runtime/ort_timing.py``); both have ``costs(computed)``, so the engine and exit selection take
either."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..configs import check_choice
from ..distributed import ALONE, Group, from_main
from ..errors import PteenetError
from ..exits.chain import computed_branches
from ..runtime import timing
from ..runtime.model import EarlyExitModel
from ..runtime.ort_quant import QuantizedParts
from ..runtime.ort_timing import DEPLOY_RUNTIMES, profile_onnx
from ..runtime.timing import TimeProfile, read_profile, tune_allocator
from ..tracing.cost import CostTable

Pricing = CostTable | TimeProfile


def unit(cost_model: dict[str, Any]) -> str:
    """What a point's cost is measured in, for reports (``cost_model`` as ``pricing_for`` returns it)."""
    if cost_model.get("kind") != "time":
        return "MACs"
    where = " in ONNX Runtime" if cost_model.get("runtime") == "onnxruntime" else ""
    where += ", INT8" if cost_model.get("precision") == "int8" else ""
    return f"predicted time{where} at batch {cost_model.get('batch_size')}"


def pricing_for(model: EarlyExitModel, cost: str, batch_size: int, device: torch.device,
                group: Group = ALONE, runtime: str = "eager", profile: str | None = None,
                parts: QuantizedParts | None = None) -> tuple[Pricing, dict[str, Any]]:
    """MACs (the cost table), or time measured here on ``deploy_batch_size`` images with every head
    computed (exit selection then prices each one), in eager PyTorch or in ONNX Runtime
    (``runtime``, one of ``DEPLOY_RUNTIMES``), recorded with the machine it was measured on. At
    batch > 1 this process's allocator is tuned first, as ``pteenet bench`` does (``tune_allocator``).
    Under torchrun rank 0's profile prices every rank's points, so that all choose the same.
    ``profile``: a file holding a profile measured before, e.g. on the machine that will run the
    model (``timing.read_profile``); nothing is timed here then, and the choice is reproducible.
    ``parts``: INT8 programs to time in ONNX Runtime instead of the FP32 ones (``profile_onnx``)."""
    assert model.cost is not None
    check_choice("deploy_runtime", runtime, DEPLOY_RUNTIMES)
    if profile is not None and cost != "time":
        raise PteenetError("--profile is a time profile: it prices in time", "drop --cost macs, or drop --profile")
    if cost == "macs":
        return model.cost, {"kind": "macs", "note": "costs are MACs as a fraction of the backbone's (--cost time: "
                                                    "predicted time on this machine)"}
    if profile is not None:
        prof = read_profile(profile, model.num_exits, batch_size)
        cm = {"kind": "time", "batch_size": batch_size, "runtime": prof.machine.get("runtime", runtime),
              "profile_file": profile, "profile": prof.to_dict()}
        return prof, {**cm, "note": f"costs are {unit(cm)} as measured in {profile} (on {prof.machine.get('cpu', 'a machine')} "
                                    f"it records), as a fraction of the plain backbone's (MACs: --cost macs)"}
    # At batch > 1, as `pteenet bench` measures (bench/run.py): with glibc's default thresholds every
    # large activation is mmapped and unmapped, and stage times vary twofold from pass to pass.
    allocator = tune_allocator() if batch_size > 1 else None
    saved = model.active
    model.set_active(None)
    try:
        x = torch.randn(batch_size, *model.info.preprocess.input_size, device=device,
                        generator=torch.Generator(device=device).manual_seed(0))
        if runtime == "onnxruntime":
            prof = profile_onnx(model, x.cpu(), repeats=7, warmup=2, threads=torch.get_num_threads(), parts=parts)
        else:
            prof = timing.profile(model, x, repeats=7, warmup=2)
    finally:
        model.set_active(saved)
    prof = TimeProfile.from_dict(from_main(prof.to_dict(), group))
    cm = {"kind": "time", "batch_size": batch_size, "runtime": runtime, "precision": "fp32" if parts is None else "int8",
          "allocator": allocator, "profile": prof.to_dict()}
    return prof, {**cm, "note": f"costs are {unit(cm)} on this machine, as a fraction of the plain backbone's "
                                "(another batch size: --deploy-batch-size; runtime: --deploy-runtime; MACs: --cost macs)"}


def both_costs(exit_fractions: Sequence[float], model: EarlyExitModel, pricing: Pricing, active: list[bool] | None) -> dict[str, float]:
    """A point with these exit fractions priced both ways (MACs always; time where it was measured)."""
    assert model.cost is not None
    computed = computed_branches(active or [True] * model.num_exits, model.chained)
    out = {"mac_cost": float(np.dot(exit_fractions, model.cost.costs(computed)))}
    if isinstance(pricing, TimeProfile):
        out["time_cost"] = float(np.dot(exit_fractions, pricing.costs(computed)))
    return out
