"""One optimisation step of the branches (``BranchTrainer``: Adam over branch parameters only, the
cosine schedule, AMP, and the state a ``--resume`` needs), the figures it reports, and the RNG
state that makes a resumed run bit-identical. Every metric goes through the evaluation engine (``pteenet.evaluation``).
"""
from __future__ import annotations

import math
import platform
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import distributed, evaluation
from ..distributed import ALONE, Group
from ..errors import PteenetError
from ..progress import Sink
from ..runtime.model import AllExits, EarlyExitModel
from .batches import Autocast
from .config import TrainConfig
from .loss import early_exit_loss


def cosine_lr(base: float, step: int, total: int) -> float:
    """The learning rate of update ``step`` (0-based) out of ``total``: base -> 0 along half a cosine."""
    return base * 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))


def cache_metrics(cache: evaluation.ExitCache, threshold: float) -> dict[str, Any]:
    """Per-exit accuracy / agreement / mean confidence and the early-exit model at ``threshold``."""
    preds, e = cache.preds, cache.num_exits
    labels = cache.labels
    return {
        "samples": cache.num_samples,
        "accuracy": None if labels is None else [float((preds[k] == labels).mean()) for k in range(e)],
        "agreement": [float((preds[k] == preds[e]).mean()) for k in range(e)],
        "mean_confidence": [float(cache.scores["confidence"][k].mean()) for k in range(e)],
        "backbone_accuracy": None if labels is None else float((preds[e] == labels).mean()),
        "early_exit": evaluation.evaluate(cache, "confidence", threshold).to_dict(),
    }


def exit_cache_of(out: AllExits, labels: torch.Tensor, model: EarlyExitModel) -> evaluation.ExitCache:
    b = evaluation.ExitCacheBuilder()
    b.add_outputs(out, labels)
    return b.build_for(model)


class Meter:
    """Sample-weighted running means of the training figures of one epoch."""

    def __init__(self) -> None:
        self.n = 0
        self.sums: dict[str, np.ndarray] = {}

    def add(self, values: dict[str, Any], n: int) -> None:
        self.n += n
        for k, v in values.items():
            if v is not None:  # accuracy on images without labels
                self.sums[k] = self.sums.get(k, 0) + np.asarray(v, dtype=np.float64) * n

    def means(self) -> dict[str, Any]:
        return {k: (v / max(self.n, 1)).tolist() for k, v in self.sums.items()}


def short_number(v: float) -> str:
    """A loss in at most 7 characters: 0.1234, 12.34, 123.4, 1.1e+04 (a diverged run's)."""
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}" if abs(v) < 100 else f"{v:.1f}" if abs(v) < 1000 else f"{v:.1e}"


def exit_summary(values: list[float] | None) -> str:
    """Per-exit fractions in %, in a width that does not grow with the exits: every value up to 3
    exits, else first/median/last exit (``--json`` keeps them all)."""
    if not values:
        return "-"
    pct = [f"{100 * v:.0f}" for v in values]
    if len(pct) <= 3:
        return " ".join(pct)
    return f"{pct[0]}/{100 * float(np.median(values)):.0f}/{pct[-1]}"


def running_text(means: dict[str, Any]) -> str:
    """The running figures shown beside the epoch's progress bar (a few dozen characters)."""
    agree = exit_summary(means["agreement"])
    return f"loss {short_number(means['loss'])} agree% {agree} cost@T {means['ee_cost']:.3f}"


DIVERGED = 10.0  # an exit whose cross-entropy passes this many times ln K (a uniform guess's) diverged


def check_diverged(means: dict[str, Any], num_classes: int, epoch: int, held: str) -> None:
    """Stop a run whose heads diverged (with 1,000 classes a cascade of log-probabilities
    took the loss from 11,006 to 79,349 while every exit agreed with the backbone on under 1%):
    an exit's mean cross-entropy against the backbone's answer above ``DIVERGED`` x ln K is not
    learning, only growing. A learning head starts near ln K (a uniform guess) and goes down."""
    ce = means.get("exit_ce") or []
    limit = DIVERGED * math.log(max(num_classes, 2))
    worst = max(range(len(ce)), key=ce.__getitem__, default=None)
    if worst is None or ce[worst] <= limit:
        return
    raise PteenetError(f"training diverged in epoch {epoch}: exit {worst}'s cross-entropy against the backbone is "
                       f"{ce[worst]:.3g} (a uniform guess: {math.log(max(num_classes, 2)):.2g}; loss {means['loss']:.3g}); "
                       f"{held}", "lower --lr; a checkpoint whose cascade reads log-probabilities (attached before "
                       "branch schema 2) diverges with many classes: attach it again, or with --no-cascade")


def epoch_text(record: dict[str, Any]) -> str:
    """An epoch's calibration result, shown beside the epochs bar."""
    ee = (record["val"] or {}).get("early_exit") or {}
    acc = "-" if ee.get("accuracy") is None else f"{100 * ee['accuracy']:.1f}"
    return f"val acc@T {acc}%  cost@T {ee.get('cost', float('nan')):.3f}"


# -- the optimisation step -------------------------------------------------------------------------
class BranchTrainer:
    """Adam over the branch parameters only, the cosine schedule, AMP, and resumable state."""

    def __init__(self, model: EarlyExitModel, cfg: TrainConfig, device: torch.device, total_steps: int,
                 group: Group = ALONE) -> None:
        if model.cost is None or model.num_exits < 1:
            raise PteenetError("the checkpoint has no exits to train", "create one with `pteenet attach ... --exits N`")
        self.model, self.cfg, self.total_steps = model, cfg, total_steps
        self.costs = model.cost.costs()
        self.optimizer = torch.optim.Adam(model.branches.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.step_count = 0
        self.group = group
        self.autocast = Autocast(device, cfg.amp)
        # float16 gradients underflow without loss scaling; bfloat16 has float32's range.
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.autocast.dtype == torch.float16)

    def step(self, out: AllExits, labels: torch.Tensor) -> dict[str, Any]:
        """One update from a batch's exit outputs; returns the batch's figures (loss, T = 0.5 metrics)."""
        reach = self.model.reaching(out) if self.cfg.survivors else None  # under the model's chosen setting
        res = early_exit_loss(out.heads, out.exit_conf, out.final_logits, self.costs, self.cfg.loss,
                              labels.to(out.final_logits.device), reach)
        loss = distributed.mean_loss(res.loss, self.group)  # every rank stops together on a bad loss
        if not math.isfinite(loss):
            raise PteenetError(f"the loss became {loss} at step {self.step_count + 1}",
                               "lower --lr or --lambda, or drop --amp; the output keeps the last good epoch")
        for group in self.optimizer.param_groups:
            group["lr"] = cosine_lr(self.cfg.lr, self.step_count, self.total_steps)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(res.loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step_count += 1
        m = cache_metrics(exit_cache_of(out, labels, self.model), self.cfg.threshold)
        ee = m["early_exit"]
        with torch.no_grad():  # each head's cross-entropy against the backbone's answer: the divergence guard's
            answer = out.final_logits.argmax(1)
            exit_ce = [float(F.cross_entropy(h.float(), answer)) for h in out.heads]
        return {"loss": loss, "nll": res.nll, "head_cost": res.cost, "agreement": m["agreement"], "exit_ce": exit_ce,
                "accuracy": m["accuracy"], "ee_accuracy": ee["accuracy"], "ee_agreement": ee["agreement"],
                "ee_cost": ee["cost"]}

    def state(self) -> dict[str, torch.Tensor]:
        st: dict[str, torch.Tensor] = {"step": torch.tensor(self.step_count, dtype=torch.int64)}
        for i, s in self.optimizer.state_dict()["state"].items():
            st.update({f"optim.{i}.{k}": v if torch.is_tensor(v) else torch.tensor(v) for k, v in s.items()})
        if self.scaler.is_enabled():
            sd = self.scaler.state_dict()
            st["scaler.scale"] = torch.tensor(sd["scale"], dtype=torch.float64)
            st["scaler.growth_tracker"] = torch.tensor(sd["_growth_tracker"], dtype=torch.int64)
        return st

    def load_state(self, st: dict[str, torch.Tensor]) -> None:
        self.step_count = int(st["step"])
        per_param: dict[int, dict[str, torch.Tensor]] = {}
        for key, v in st.items():
            if key.startswith("optim."):
                _, i, k = key.split(".", 2)
                per_param.setdefault(int(i), {})[k] = v
        sd = self.optimizer.state_dict()
        self.optimizer.load_state_dict({"state": per_param, "param_groups": sd["param_groups"]})
        if self.scaler.is_enabled() and "scaler.scale" in st:
            self.scaler.load_state_dict({**self.scaler.state_dict(), "scale": float(st["scaler.scale"]),
                                         "_growth_tracker": int(st["scaler.growth_tracker"])})


def rng_state(device: torch.device, order: torch.Generator) -> dict[str, torch.Tensor]:
    st = {"rng.cpu": torch.get_rng_state(), "rng.order": order.get_state()}
    if device.type == "cuda":
        st["rng.cuda"] = torch.cuda.get_rng_state(device)
    return st


def set_rng_state(st: dict[str, torch.Tensor], device: torch.device, order: torch.Generator) -> None:
    torch.set_rng_state(st["rng.cpu"])
    order.set_state(st["rng.order"])
    if device.type == "cuda" and "rng.cuda" in st:
        torch.cuda.set_rng_state(st["rng.cuda"], device)


def cpu_name() -> str:
    """The CPU's model name and the instruction set PyTorch's kernels dispatch to (which decides how
    their vector loops round)."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} ({torch.backends.cpu.get_cpu_capability()})"


def numerics_record() -> dict[str, Any]:
    """What besides the command, the seed and the data decides a run's bits (docs/real-models.md):
    recorded with the run, so that a resume can say when it differs."""
    return {"threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": cpu_name()}


_NUMERICS_WORDS = {"threads": "CPU threads", "torch": "torch", "cpu": "the CPU"}


def warn_numerics_changed(model: EarlyExitModel, sink: Sink) -> None:
    """Warn where the run being resumed recorded another thread count, torch version or CPU: the
    kernels then round differently, so the resumed result is close to an uninterrupted run's, not
    equal to it. Runs recorded before a key was recorded are not checked for it."""
    training = model.meta.get("training", {})
    now = numerics_record()
    for key, words in _NUMERICS_WORDS.items():
        was = training.get(key)
        if was is not None and was != now[key]:
            said = f"{was} {words}, this one {now[key]}" if key == "threads" else f"{words} {was}, this one {now[key]}"
            sink.warn(f"the run being resumed used {said}: its result may differ from an uninterrupted run's "
                      "in the last bits")
