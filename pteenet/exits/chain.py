"""From a tap to an exit's answer, in one place for training, the sweep, the runtime and export.

An exit's head (``Branch``) may read the previous head's logits (cascade), and the exit may answer
with an ensemble of every head so far instead of its own head (``Ensemble``). Both need what earlier
exits produced, which ``Carry`` holds for the samples still in flight. ``exit_step`` is the only code
that turns (tap, carry) into (head logits, decision logits, confidence logit, next carry), so the
runtime's decisions equal the sweep's simulation by construction.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PteenetError
from .branches import Branch


class Ensemble(nn.Module):
    """Exit k answers with a weighted sum of the log-probabilities of heads 0..k plus a per-class
    bias (a geometric ensemble, as in Zero Time Waste). Weights are softplus of a free parameter,
    so they are non-negative; their sum also acts as a learned temperature."""

    def __init__(self, num_exits: int, num_classes: int) -> None:
        super().__init__()
        raw = torch.full((num_exits, num_exits), -4.0)  # softplus(-4) ~ 0.02: earlier heads start small
        raw.diagonal().fill_(0.5413)  # softplus(0.5413) = 1: each exit starts as its own head
        self.raw = nn.Parameter(raw)
        self.bias = nn.Parameter(torch.zeros(num_exits, num_classes))
        self._frozen: tuple[tuple[int, int], torch.Tensor] | None = None

    @property
    def num_exits(self) -> int:
        return self.raw.shape[0]

    def weights(self) -> torch.Tensor:
        """[E, E], row k: the weights of heads 0..k for exit k (zero above the diagonal)."""
        return F.softplus(self.raw).tril()

    def _inference_weights(self) -> torch.Tensor:
        """``weights()``, computed once while the parameter stays the same (it is fitted once,
        then fixed): three fewer ops per exit at run time."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.weights()
        key = (self.raw.data_ptr(), self.raw._version)
        if self._frozen is None or self._frozen[0] != key:
            self._frozen = (key, self.weights())
        return self._frozen[1]

    def add_head(self, k: int, logp: torch.Tensor, acc: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Head k's log-probabilities [B, K] join the running sums of exits k..E-1 (``acc``
        [E-k, B, K], None at exit 0). Returns (exit k's logits, the sums exits k+1.. go on with).

        One fused multiply-add per head instead of stacking heads 0..k at every exit: at batch 1
        the ensemble then costs about as much as one more small op, whatever the exit's depth."""
        w = self._inference_weights()[k:, k].to(logp.dtype)
        term = w[:, None, None] * logp[None]
        acc = term if acc is None else acc + term
        return acc[0] + self.bias[k].to(logp.dtype), (acc[1:] if acc.shape[0] > 1 else None)


def computed_branches(active: Sequence[bool], chained: bool) -> list[bool]:
    """Per exit, whether the runtime computes its branch when only ``active`` exits decide: an active
    exit's branch, and with a cascade or an ensemble (``chained``) every branch before the last active
    exit too, since later exits read them; nothing after the last active exit."""
    last = max((k for k, a in enumerate(active) if a), default=-1)
    return [k <= last and (bool(a) or chained) for k, a in enumerate(active)]


@dataclass
class Carry:
    """What later exits need from earlier ones, one row per sample in flight."""

    prev: torch.Tensor | None = None  # the last head's logits (cascade)
    acc: torch.Tensor | None = None  # [E-k, B, K]: the ensemble sums of the exits still to come
    util: torch.Tensor | None = None  # [B, j]: EENet's utilities of the deciding exits so far (exits/eenet.py)

    def select(self, rows: torch.Tensor) -> "Carry":
        return Carry(None if self.prev is None else self.prev[rows], None if self.acc is None else self.acc[:, rows],
                     None if self.util is None else self.util[rows])

    def tensors(self) -> list[torch.Tensor]:
        """The carried tensors, for programs that pass them on explicitly (torch.cond)."""
        return [t for t in (self.prev, self.acc, self.util) if t is not None]

    def like(self, tensors: Sequence[torch.Tensor]) -> "Carry":
        """A carry of this one's layout holding ``tensors`` (the inverse of ``tensors``)."""
        it = iter(tensors)
        return Carry(*(None if t is None else next(it) for t in (self.prev, self.acc, self.util)))


def exit_step(branch: Branch, ensemble: Ensemble | None, k: int, x: torch.Tensor, carry: Carry,
              features: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Carry]:
    """Exit k on its tap (or, with ``features``, on its stem's cached output).

    Returns (head logits, the logits the exit decides and answers with, confidence logit, carry).
    """
    head, conf = (branch.head(x, carry.prev) if features else branch(x, carry.prev))
    acc, logits = carry.acc, head
    if ensemble is not None:
        z, acc = ensemble.add_head(k, torch.log_softmax(head.float(), 1), acc)
        logits = z.to(head.dtype)
    return head, logits, conf, dataclasses.replace(carry, prev=head if branch.cascade else None, acc=acc)


def fit_ensemble(head_logits: list[torch.Tensor], targets: torch.Tensor, steps: int = 300,
                 lr: float = 0.05) -> Ensemble:
    """Fit an ensemble on every head's logits over a set of samples the heads did NOT train on
    (fitting on their own training rows makes it overconfident). ``targets``: [N] class indices
    (the backbone's argmax) or [N, K] probabilities. Full batch Adam: E*E + E*K parameters only."""
    e = len(head_logits)
    if e == 0 or head_logits[0].shape[0] == 0:
        raise PteenetError("no samples to fit the exit ensemble on", "train with a calibration split (--calibration-split > 0, or --calibration SPEC)")
    k = head_logits[0].shape[1]
    ens = Ensemble(e, k)
    stacked = torch.stack([torch.log_softmax(h.detach().float(), 1) for h in head_logits])  # [E, N, K]
    opt = torch.optim.Adam(ens.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        # Every exit at once: the same sums as ``exit_logits``, in one einsum (only the fit is vectorised).
        lp = torch.log_softmax(torch.einsum("jnc,kj->knc", stacked, ens.weights()) + ens.bias[:, None], -1)
        per_exit = -(targets[None] * lp).sum(-1) if targets.dim() == 2 else -lp.gather(-1, targets[None, :, None].expand(e, -1, 1)).squeeze(-1)
        per_exit.mean().backward()
        opt.step()
    return ens.requires_grad_(False)
