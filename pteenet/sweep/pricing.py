"""How a sweep prices its points: MACs (the cost table) or predicted time (a ``TimeProfile``
measured here, ``runtime/timing.py``); both have ``costs(computed)``, so the engine and exit
selection take either."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..distributed import ALONE, Group, from_main
from ..exits.chain import computed_branches
from ..runtime import timing
from ..runtime.model import EarlyExitModel
from ..runtime.timing import TimeProfile
from ..tracing.cost import CostTable

Pricing = CostTable | TimeProfile


def pricing_for(model: EarlyExitModel, cost: str, batch_size: int, device: torch.device,
                group: Group = ALONE) -> tuple[Pricing, dict[str, Any]]:
    """MACs (the cost table), or time measured here on ``deploy_batch_size`` images with every head
    computed (exit selection then prices each one), recorded with the machine it was measured on.
    Under torchrun rank 0's profile prices every rank's points, so that all choose the same."""
    assert model.cost is not None
    if cost == "macs":
        return model.cost, {"kind": "macs", "note": "costs are MACs as a fraction of the backbone's (--cost time: "
                                                    "predicted time on this machine)"}
    saved = model.active
    model.set_active(None)
    try:
        x = torch.randn(batch_size, *model.info.preprocess.input_size, device=device,
                        generator=torch.Generator(device=device).manual_seed(0))
        prof = timing.profile(model, x, repeats=7, warmup=2)
    finally:
        model.set_active(saved)
    prof = TimeProfile.from_dict(from_main(prof.to_dict(), group))
    return prof, {"kind": "time", "batch_size": batch_size, "profile": prof.to_dict(),
                  "note": f"costs are predicted time at batch {batch_size} on this machine, as a fraction of the "
                          "plain backbone's (another batch size: --deploy-batch-size; MACs: --cost macs)"}


def both_costs(exit_fractions: Sequence[float], model: EarlyExitModel, pricing: Pricing, active: list[bool] | None) -> dict[str, float]:
    """A point with these exit fractions priced both ways (MACs always; time where it was measured)."""
    assert model.cost is not None
    computed = computed_branches(active or [True] * model.num_exits, model.chained)
    out = {"mac_cost": float(np.dot(exit_fractions, model.cost.costs(computed)))}
    if isinstance(pricing, TimeProfile):
        out["time_cost"] = float(np.dot(exit_fractions, pricing.costs(computed)))
    return out
