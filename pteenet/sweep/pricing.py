"""How a sweep prices its points: MACs (the cost table) or predicted time (a ``TimeProfile``
measured here, ``runtime/timing.py``); both have ``costs(computed)``, so the engine and exit
selection take either."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..exits.chain import computed_branches
from ..runtime import timing
from ..runtime.model import EarlyExitModel
from ..runtime.timing import TimeProfile
from ..tracing.cost import CostTable
from .engine import Point

Pricing = CostTable | TimeProfile


def pricing_for(model: EarlyExitModel, cost: str, batch_size: int, device: torch.device) -> tuple[Pricing, dict[str, Any]]:
    """MACs (the cost table), or time measured here on ``deploy_batch_size`` images with every head
    computed (exit selection then prices each one), recorded with the machine it was measured on."""
    assert model.cost is not None
    if cost == "macs":
        return model.cost, {"kind": "macs"}
    saved = model.active
    model.set_active(None)
    try:
        x = torch.randn(batch_size, *model.info.preprocess.input_size, device=device,
                        generator=torch.Generator(device=device).manual_seed(0))
        prof = timing.profile(model, x, repeats=7, warmup=2)
    finally:
        model.set_active(saved)
    return prof, {"kind": "time", "batch_size": batch_size, "profile": prof.to_dict(),
                  "note": f"costs are predicted time at batch {batch_size} on this machine, "
                          "as a fraction of the plain backbone's"}


def both_costs(p: Point, model: EarlyExitModel, pricing: Pricing, active: list[bool] | None) -> dict[str, float]:
    """The chosen point priced both ways (MACs always; time where it was measured)."""
    assert model.cost is not None
    computed = computed_branches(active or [True] * model.num_exits, model.chained)
    out = {"mac_cost": float(np.dot(p.exit_fractions, model.cost.costs(computed)))}
    if isinstance(pricing, TimeProfile):
        out["time_cost"] = float(np.dot(p.exit_fractions, pricing.costs(computed)))
    return out
