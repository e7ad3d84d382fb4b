"""The early-exit model: the frozen backbone cut into stages, one branch per exit, and the runtime
that really stops computing for samples that leave.

Run time: stage 0 -> branch 0 -> decide -> the samples that stay (and every carried value, indexed
the same way) go on to stage 1, and so on; outputs come back in input order. Training: every exit is
computed (``forward_all``), with the backbone under ``no_grad`` once per batch.
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..backbones.specs import BackboneInfo
from ..backbones.weights import module_sha256
from ..configs import check_choice
from ..errors import PteenetError
from ..exits import eenet, lean, policies
from ..exits.branches import Branch, BranchConfig
from ..exits.chain import Carry, Ensemble, computed_branches, exit_step
from ..exits.policies import check_policy
from ..tracing.cost import CostTable
from ..tracing.graph import ExitPoint, Stages
from ..tracing.probe import RUNTIMES, probe


@dataclass
class AllExits:
    exit_logits: list[torch.Tensor]  # E x [B, K]: what each exit decides and answers with
    exit_conf: list[torch.Tensor]  # E x [B]: confidence-head logits (h = sigmoid)
    final_logits: torch.Tensor  # [B, K]: the backbone's own output
    head_logits: list[torch.Tensor] | None = None  # E x [B, K]: each head alone (differs with an ensemble)

    @property
    def heads(self) -> list[torch.Tensor]:
        return self.exit_logits if self.head_logits is None else self.head_logits


@dataclass
class Prediction:
    logits: torch.Tensor  # [B, K]: the logits of the exit each sample left at
    pred: torch.Tensor  # [B]
    exit_index: torch.Tensor  # [B]: 0..E-1 for a branch, E for the backbone's end


class EarlyExitModel(nn.Module):
    """``backbone``, ``branches`` and the optional ``ensemble`` are the only registered children, so
    ``state_dict`` holds each tensor once; the stages are fx GraphModules that read their parameters
    from ``backbone``.

    ``active[k]`` says whether exit k takes decisions (exit selection). An inactive exit's branch is
    still computed when a later active exit needs it (cascade or ensemble: ``chained``), else never;
    nothing after the last active exit is computed. ``cost_for_active`` prices exactly that."""

    def __init__(self, backbone: nn.Module, info: BackboneInfo, exits: Sequence[str], branch: BranchConfig,
                 cost: CostTable | None = None, runtime: str = "staged") -> None:
        super().__init__()
        self.backbone = backbone
        check_choice("runtime", runtime, RUNTIMES)
        # "staged": the fx graph cut into stages; "hooks": the fallback for untraceable backbones
        # (tracing/hooks.py), no real early exit.
        self.runtime = runtime
        self.info = info
        self.branch_config = branch
        self.cost = cost
        self._build_stages(list(exits))
        self.branches = nn.ModuleList(
            Branch(self._tap_shapes[k], info.num_classes, branch, p.layout) for k, p in enumerate(self.exit_points)
        )
        self.ensemble: Ensemble | None = None
        self.scheduler: eenet.Scheduler | None = None  # EENet's, for policy "eenet" (set_scheduler)
        self.policy = "confidence"
        self.thresholds = [0.5] * len(self.exit_points)
        # Per-class thresholds [E][C] (``sweep-threshold --per-class``), looked up by the exit's
        # predicted class; None: one threshold per exit.
        self.class_thresholds: list[list[float]] | None = None
        self.active = [True] * len(self.exit_points)
        self.meta: dict[str, Any] = {}  # free-form sections (training, history, data, sweep, bench)
        # The hash the backbone had when it was attached; every save checks it still holds.
        self.backbone_sha256 = module_sha256(backbone)
        self.train(False)

    # -- structure -------------------------------------------------------------------------------
    def _build_stages(self, exits: list[str]) -> None:
        pb = probe(self.backbone, self.info.preprocess.input_size, self.runtime, count_macs=False)
        points = pb.resolve(exits)
        stages, shapes = pb.stages(points), [pb.shapes[p.node] for p in points]
        # Plain attributes, not submodules: they share the backbone's parameters.
        self.exit_points: list[ExitPoint] = points  # a plain list: nn.Module registers no submodule for it
        object.__setattr__(self, "_stages", stages)
        object.__setattr__(self, "_tap_shapes", shapes)
        object.__setattr__(self, "_plans", {})  # computed-branch flags -> (exit indices, stages)
        object.__setattr__(self, "_lean", {})  # exit -> (what it depends on, its lean batch-1 step or None, the fold)

    @property
    def tap_shapes(self) -> list[tuple[int, ...]]:
        """Per exit, the shape (without batch) of the tensor its branch reads."""
        return list(self._tap_shapes)  # type: ignore[attr-defined]

    @property
    def num_exits(self) -> int:
        return len(self.exit_points)

    @property
    def stages(self) -> Stages:
        return self._stages  # type: ignore[return-value]

    def run_plan(self) -> tuple[list[int], Stages]:
        """The stages inference runs: the backbone cut only where a branch is computed, with the exit
        each cut serves. Every stage call costs Python work (on a CPU at batch 1, ResNet-56's 28 stages
        timed one by one sum to 8.1 ms against 7.7 ms for the whole backbone: ``profiles["1"]`` in
        benchmarks/results/cifar10_time.json), so after
        exit selection the uncomputed exits are not cut at all."""
        computed = tuple(self.computed_branches())
        if all(computed) or self.runtime != "staged":
            return list(range(self.num_exits)), self.stages
        plans: dict[tuple[bool, ...], tuple[list[int], Stages]] = self._plans  # type: ignore[attr-defined]
        if computed not in plans:
            idx = [k for k, c in enumerate(computed) if c]
            pb = probe(self.backbone, self.info.preprocess.input_size, self.runtime, count_macs=False)
            plans[computed] = (idx, pb.stages(pb.resolve([self.exit_points[k].name for k in idx])))
        return plans[computed]

    def _apply(self, fn: Any, recurse: bool = True) -> "EarlyExitModel":
        # .to()/.half() may replace buffer tensors; rebuild the stages so they read the new ones.
        super()._apply(fn, recurse)
        self._build_stages([p.name for p in self.exit_points])
        return self

    def train(self, mode: bool = True) -> "EarlyExitModel":
        """Only the branches ever train: the backbone stays in eval mode (BN statistics frozen)."""
        super().train(mode)
        self.backbone.eval()
        return self

    @property
    def chained(self) -> bool:
        """Whether an exit's answer depends on earlier heads (cascade or ensemble)."""
        return self.branch_config.cascade or self.ensemble is not None

    def set_ensemble(self, ensemble: Ensemble | None) -> None:
        if ensemble is not None and ensemble.num_exits != self.num_exits:
            raise PteenetError(f"an ensemble of {ensemble.num_exits} exits does not fit {self.num_exits} exits")
        dev = next(self.branches.parameters()).device if self.num_exits else torch.device("cpu")
        self.ensemble = None if ensemble is None else ensemble.to(dev).requires_grad_(False)

    def set_scheduler(self, scheduler: eenet.Scheduler | None) -> None:
        """EENet's fitted scheduler (``pteenet.sweep.eenet``), which policy "eenet" decides with;
        None removes it. Registered as an attribute, not a submodule: ``state_dict`` stays as it was."""
        if scheduler is not None and (max(scheduler.exits) >= self.num_exits
                                      or scheduler.num_classes != self.info.num_classes):
            raise PteenetError(f"the scheduler's exits {scheduler.exits} or {scheduler.num_classes} classes do not fit this model",
                               "fit the scheduler on this model's exit cache")
        object.__setattr__(self, "scheduler", scheduler)

    def set_active(self, active: Sequence[bool] | None) -> None:
        """Which exits take decisions (None: all of them)."""
        mask = [True] * self.num_exits if active is None else [bool(a) for a in active]
        if len(mask) != self.num_exits:
            raise PteenetError(f"{len(mask)} active flags given for {self.num_exits} exits", "give one per exit")
        self.active = mask

    def computed_branches(self, active: Sequence[bool] | None = None) -> list[bool]:
        """Per exit, whether the runtime computes its branch under ``active`` (default: the model's)."""
        return computed_branches(self.active if active is None else active, self.chained)

    # -- thresholds ------------------------------------------------------------------------------
    def set_thresholds(self, thresholds: float | Sequence[float], policy: str | None = None,
                       class_thresholds: Sequence[Sequence[float]] | None = None) -> None:
        """The model's setting: one threshold, or one per exit; with ``class_thresholds`` [E][C]
        the exits decide by those instead (``thresholds`` then only shows each exit's loosest)."""
        self.thresholds, self.policy = self.resolve_thresholds(thresholds, policy)
        self.class_thresholds = None if class_thresholds is None else self._class_table(class_thresholds)

    def _class_table(self, table: Sequence[Sequence[float]]) -> list[list[float]]:
        rows = [[float(v) for v in row] for row in table]
        if len(rows) != self.num_exits or any(len(r) != self.info.num_classes for r in rows):
            raise PteenetError(f"per-class thresholds must be {self.num_exits} x {self.info.num_classes} (exits x classes)",
                               "re-run pteenet sweep-threshold --per-class")
        return rows

    def resolve_thresholds(self, thresholds: float | Sequence[float], policy: str | None = None) -> tuple[list[float], str]:
        """One threshold for every exit, or one per exit; the policy defaults to the model's own.
        ``predict`` checks here too, so a bad call fails with a clear error, not an IndexError."""
        policy = policy or self.policy
        check_policy(policy)
        # numbers.Real also covers numpy scalars, which are not Python floats (np.float32).
        values = [float(thresholds)] * self.num_exits if isinstance(thresholds, numbers.Real) else [float(t) for t in thresholds]
        if len(values) != self.num_exits:
            raise PteenetError(f"{len(values)} thresholds given for {self.num_exits} exits", "give one, or one per exit")
        if policy == eenet.NAME and self.scheduler is None:
            raise PteenetError("policy eenet needs a fitted scheduler, and this model has none",
                               "fit one with pteenet sweep-threshold --policy eenet --write, or choose another policy")
        return values, policy

    # -- running ---------------------------------------------------------------------------------
    def backbone_taps(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The backbone's tensor at every exit and its logits, under no_grad (one backbone pass)."""
        taps = []
        with torch.no_grad():
            state: tuple[Any, ...] = (x,)
            for stage in self.stages.modules[:-1]:
                out = stage(*state)
                state, tap = out[:-1], out[-1]
                taps.append(tap)
            final = self.stages.modules[-1](*state)
        return taps, final

    def branch_outputs(self, taps: Sequence[torch.Tensor], final: torch.Tensor, features: bool = False) -> AllExits:
        """Every exit on its tap (with gradients when training). With ``features``, ``taps`` are the
        branches' stem outputs, as a feature cache holds them."""
        heads, logits, conf = [], [], []
        carry = Carry()
        for k, t in enumerate(taps):
            h, z, c, carry = exit_step(self.branches[k], self.ensemble, k, t, carry, features)
            heads.append(h)
            logits.append(z)
            conf.append(c)
        return AllExits(logits, conf, final, heads)

    @torch.no_grad()
    def reaching(self, out: AllExits) -> torch.Tensor:
        """[E, B] bools: per exit, the samples of ``out`` that reach it under the model's own setting
        (policy, thresholds or class table, deciding exits), as ``predict`` would run them: the
        survivors of the exits before (``train-branches --survivors`` trains each head on its own)."""
        rule, n = policies.get(self.policy), out.final_logits.shape[0]
        here = torch.ones(n, dtype=torch.bool, device=out.final_logits.device)
        reach, decided = [], None
        for k, (logits, conf) in enumerate(zip(out.exit_logits, out.exit_conf)):
            reach.append(here)
            if self.active[k]:
                s, decided = rule.decide(logits.detach(), conf.detach(), decided)
                t = (self.thresholds[k] if self.class_thresholds is None else
                     torch.tensor(self.class_thresholds[k], dtype=torch.float32, device=here.device)[logits.argmax(1)])
                here = here & ~rule.passes(s, t)
        return torch.stack(reach) if reach else torch.ones(0, n, dtype=torch.bool)

    def forward_all(self, x: torch.Tensor) -> AllExits:
        """Every exit's outputs and the backbone's logits (what training and the sweep use)."""
        return self.branch_outputs(*self.backbone_taps(x))

    def predict(self, x: torch.Tensor, threshold: float | Sequence[float] | None = None,
                policy: str | None = None) -> Prediction:
        """Early-exit inference: each sample leaves at the first exit whose score passes."""
        own = threshold is None and policy in (None, self.policy)  # the model's setting: its class table too
        thresholds, policy = self.resolve_thresholds(self.thresholds if threshold is None else threshold, policy)
        table = self.class_thresholds if own else None
        if self.training:
            # Inference on a model left in training mode: branch BatchNorm must use (and keep) its
            # running statistics. Switching walks every module, so the usual eval-mode call skips it.
            self.train(False)
            try:
                return self.predict(x, None if own else thresholds, None if own else policy)
            finally:
                self.train(True)
        with torch.no_grad():
            if x.shape[0] == 1:
                return self._predict_one(x, thresholds, policy, table)
            return self._predict_batch(x, thresholds, policy, table)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predict(x).logits

    def step_one(self, k: int, tap: torch.Tensor, carry: Carry, context: tuple[Any, ...]) -> tuple[torch.Tensor, torch.Tensor, Carry]:
        """Exit k on a batch-1 tap: (logits, confidence logit, carry). Unchained, the lean step
        (``exits/lean.py``: the same ops and values, none of the Python between them), rebuilt
        when ``context`` (``lean.context()``, taken once per prediction) or the branch changes."""
        if not self.chained:
            hit = self._lean.get(k)  # type: ignore[attr-defined]
            branch = self.branches[k]
            if hit is None or hit[0] != (context, lean.key(branch, tap)):
                step = lean.lean_step(branch, tap)
                # The folded form is kept with it: alive, its id (in the key) cannot be reused.
                hit = self._lean[k] = ((context, lean.key(branch, tap)), step, branch._folded)  # type: ignore[attr-defined]
            if hit[1] is not None:
                logits, conf = hit[1](tap)
                return logits, conf, carry
        _, logits, conf, carry = exit_step(self.branches[k], self.ensemble, k, tap, carry)
        return logits, conf, carry

    def _predict_one(self, x: torch.Tensor, thresholds: list[float], policy: str,
                     table: list[list[float]] | None = None) -> Prediction:
        """Batch size 1, the latency case: no index bookkeeping at all."""
        state: tuple[Any, ...] = (x,)
        carry = Carry()
        idx, stages = self.run_plan()
        sched = self.scheduler if policy == eenet.NAME else None
        rule, context, util = policies.get(policy) if sched is None else None, lean.context(), []
        decided: Any = None  # a stateful policy's state (patience: last class, run length)
        for k, stage in zip(idx, stages.modules[:-1]):
            out = stage(*state)
            state = out[:-1]
            logits, conf, carry = self.step_one(k, out[-1], carry, context)
            if not self.active[k]:
                continue
            t = thresholds[k] if table is None else table[k][int(logits.argmax(1))]
            if sched is not None:
                leave = k in sched.slot and eenet.leaves_one(sched, k, logits, util, t)
            elif rule.stateful:  # type: ignore[union-attr]
                s, decided = rule.decide(logits, conf, decided)  # type: ignore[union-attr]
                leave = bool(rule.passes(s, t))  # type: ignore[union-attr]
            else:
                leave = rule.leaves_one(logits, conf, t)  # type: ignore[union-attr]  # no tensor ops, mostly
            if leave:
                return Prediction(logits, logits.argmax(1), torch.tensor([k], device=x.device))
        logits = stages.modules[-1](*state)
        return Prediction(logits, logits.argmax(1), torch.tensor([self.num_exits], device=x.device))

    def _predict_batch(self, x: torch.Tensor, thresholds: list[float], policy: str,
                       table: list[list[float]] | None = None) -> Prediction:
        n = x.shape[0]
        out_logits = x.new_empty(n, self.info.num_classes)
        exit_index = torch.full((n,), self.num_exits, dtype=torch.long, device=x.device)
        rows = torch.arange(n, device=x.device)  # original position of each row of the running batch
        pending = torch.ones(n, dtype=torch.bool, device=x.device)  # rows still waiting for an answer
        state: tuple[Any, ...] = (x,)
        carry = Carry()
        idx, stages = self.run_plan()
        sched = self.scheduler if policy == eenet.NAME else None
        rule = policies.get(policy) if sched is None else None
        decided: Any = None  # a stateful policy's state, one row per row in flight
        # float32, as the scores and the exit cache's comparison
        by_class = None if table is None else torch.tensor(table, dtype=torch.float32, device=x.device)
        for j, (k, stage) in enumerate(zip(idx, stages.modules[:-1])):
            out = stage(*state)
            state = out[:-1]
            _, logits, conf, carry = exit_step(self.branches[k], self.ensemble, k, out[-1], carry)
            if not self.active[k] or (sched is not None and k not in sched.slot):
                continue
            if sched is not None:
                s, util = sched.step(k, logits, carry.util)
                carry = dataclasses.replace(carry, util=util)
                leave = (s >= thresholds[k]) & pending
            else:
                s, decided = rule.decide(logits, conf, decided)  # type: ignore[union-attr]
                leave = rule.passes(s, thresholds[k] if by_class is None else by_class[k][logits.argmax(1)]) & pending  # type: ignore[union-attr]
            if not bool(leave.any()):
                continue
            out_logits[rows[leave]] = logits[leave].to(out_logits.dtype)
            exit_index[rows[leave]] = k
            pending = pending & ~leave
            if not bool(pending.any()):
                return Prediction(out_logits, out_logits.argmax(1), exit_index)
            # Only the rows still pending run on. If a carried value depends on the batch size the
            # batch cannot shrink: rows that left ride along and their later results are ignored.
            if stages.shrinkable:
                flags = stages.batched[j + 1]
                # index_select, not a boolean mask: on the CPU masking a large activation map is
                # slower (CIFAR ResNet-56 stage 1, batch 256: benchmarks/results/branch_cost.json).
                keep = pending.nonzero().squeeze(1)
                state = tuple(v.index_select(0, keep) if b else v for v, b in zip(state, flags))
                carry = carry.select(keep)
                decided = None if decided is None else tuple(v.index_select(0, keep) for v in decided)
                rows, pending = rows.index_select(0, keep), pending.index_select(0, keep)
        final = stages.modules[-1](*state)
        out_logits[rows[pending]] = final[pending].to(out_logits.dtype)
        return Prediction(out_logits, out_logits.argmax(1), exit_index)
