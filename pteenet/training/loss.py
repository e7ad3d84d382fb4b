"""The joint accuracy/cost loss of EENets/PTEENet, computed in log space so it stays finite.

Going backwards from the frozen backbone, exit i mixes its own prediction with everything after it:

    Y_E = softmax(final_logits) (detached),  C_E = costs[E]
    Y_i = h_i * y_i + (1 - h_i) * Y_{i+1},   C_i = h_i * c_i + (1 - h_i) * C_{i+1},   h_i = sigmoid(conf_i)

v1 = NLL(Y_0) + lam * mean(C_0);  v2 = mean_i [NLL(Y_i) + lam * mean(C_i)].

``ce`` is not the paper's: each head learns on its own (mean over exits of its cross-entropy against
the targets, i.e. distillation with soft targets), and each confidence head learns, by binary
cross-entropy, whether its exit's argmax agrees with the backbone. There is no cost term: with cheap
heads at every block, where samples leave is decided afterwards by the sweep, on measured costs.

Y_i is only ever held as log Y_i = logaddexp(logsigmoid(conf) + log_softmax(z), logsigmoid(-conf) + log Y_{i+1}):
every term is a finite log-probability for finite inputs, so saturated heads (conf = +-1e4) or
saturated logits never produce log(0) and the gradient of logaddexp (a softmax of two terms) is
bounded. C_i is a convex combination of finite costs, so normal space is exact enough there.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..configs import Config, check_choice, check_number
from ..errors import PteenetError

VERSIONS = ("v1", "v2", "ce")
TARGETS = ("pseudo", "soft", "labels")


@dataclass(kw_only=True)
class LossConfig(Config):
    version: str = "ce"  # ce | v1 | v2 (v1, v2: the paper's)
    lam: float = 0.9  # lambda, the paper's CIFAR-10 setting
    targets: str = "soft"  # pseudo | soft | labels
    # Weight of a direct cross-entropy term on every branch's own softmax, added to v1/v2. 0 is the
    # paper's loss exactly. The paper's terms reach branch i's classifier only through h_i, and when
    # the cost term drives h_i towards 0 the classifiers starve (measured on CIFAR-10 ResNet-56 with
    # lambda 0.9: r56-paper-fine4 in benchmarks/results/cifar10_resnet-paper.json).
    exit_ce: float = 1.0
    # Softens the backbone's distribution for soft targets (distillation): 2 measured best with pooled heads.
    temperature: float = 2.0

    def __post_init__(self) -> None:
        check_choice("loss version", self.version, VERSIONS)
        check_choice("loss target", self.targets, TARGETS)
        check_number("lam", self.lam, 0, hint="the cost weight lambda, e.g. --lambda 0.9")
        check_number("temperature", self.temperature, 0, low_open=True, hint="e.g. --temperature 2")
        check_number("exit_ce", self.exit_ce, 0, hint="0 gives the paper's loss, 1 the default (--exit-ce)")


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable w.r.t. branch outputs
    nll: float  # accuracy part of the returned formulation (v1: NLL(Y_0); v2: mean_i NLL(Y_i))
    cost: float  # mean C_0: expected cumulative cost per sample under the confidence heads


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    # Half/bfloat16 logits would round log-probabilities badly; compute in at least float32.
    return torch.promote_types(t.dtype, torch.float32)


def targets_from_backbone(
    final_logits: torch.Tensor, cfg: LossConfig, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """Hard targets [B] (pseudo: backbone argmax; labels: given) or soft targets [B, K].

    Soft targets are the backbone's softmax at temperature tau, and the NLL against them is the
    cross-entropy -sum_k p_k log Y_k (not a KL): it differs from the KL only by the targets'
    entropy, a constant with respect to the branches, so the gradients are identical.
    """
    final = final_logits.detach()
    if cfg.targets == "pseudo":
        return final.argmax(dim=1)
    if cfg.targets == "soft":
        return F.softmax(final.to(_work_dtype(final)) / cfg.temperature, dim=1)
    if labels is None:
        raise PteenetError("targets 'labels' need the true labels", "pass labels=..., or use targets 'pseudo'")
    labels = labels.detach().reshape(-1).long().to(final.device)
    b, k = final.shape
    if labels.numel() != b:
        raise PteenetError(f"got {labels.numel()} labels for a batch of {b}", "give one int label per sample")
    if b and (labels.min() < 0 or labels.max() >= k):
        raise PteenetError(f"labels must lie in [0, {k}), got {labels.min()}..{labels.max()}", "check the dataset's classes")
    return labels


def _nll(log_y: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -log Y[target] (hard) or -sum_k p_k log Y_k (soft)."""
    if targets.dim() == 1:
        return -log_y.gather(1, targets.unsqueeze(1)).mean()
    # log_y is finite by construction; the clamp only turns an impossible -inf into a finite value,
    # so that a zero target probability can never meet it as 0 * -inf = NaN. Its gradient is the
    # identity for every finite value.
    return -(targets * log_y.clamp(min=torch.finfo(log_y.dtype).min)).sum(dim=1).mean()


def early_exit_loss(
    exit_logits: Sequence[torch.Tensor],
    exit_conf: Sequence[torch.Tensor],
    final_logits: torch.Tensor,
    costs: Sequence[float],
    cfg: LossConfig,
    labels: torch.Tensor | None = None,
    reach: torch.Tensor | None = None,
) -> LossOutput:
    """The v1/v2 loss for E exits; exit i's cumulative cost is costs[i], the full backbone's costs[E].
    ``reach`` [E, B] (``ce`` only): exit i learns only from the samples that reach it (survivors)."""
    e = len(exit_logits)
    if e < 1 or len(exit_conf) != e:
        raise PteenetError(f"need one confidence per exit and at least one exit, got {e} logits and {len(exit_conf)} confidences")
    if len(costs) != e + 1:
        raise PteenetError(f"need {e + 1} costs for {e} exits (one per exit, then the full backbone), got {len(costs)}")
    if not all(math.isfinite(float(c)) for c in costs):
        raise PteenetError(f"costs must be finite, got {list(costs)}")
    if final_logits.dim() != 2:
        raise PteenetError(f"final logits must be [B, K], got shape {tuple(final_logits.shape)}")
    b = final_logits.shape[0]
    dtype = _work_dtype(final_logits)
    targets = targets_from_backbone(final_logits, cfg, labels)
    if cfg.version == "ce":
        return _per_exit_loss(exit_logits, exit_conf, final_logits, costs, cfg, targets, reach)
    if reach is not None:
        raise PteenetError(f"survivor training needs the ce loss, not {cfg.version}", "drop --survivors or pass --loss ce")

    # Everything downstream of the backbone's output is a constant: the backbone is frozen.
    log_y = F.log_softmax(final_logits.detach().to(dtype), dim=1)
    cost = torch.full((b,), float(costs[e]), dtype=dtype, device=final_logits.device)
    nlls: list[torch.Tensor] = []
    costs_mean: list[torch.Tensor] = []
    own_nlls: list[torch.Tensor] = []
    for i in reversed(range(e)):
        z = exit_logits[i].to(dtype)
        conf = exit_conf[i].to(dtype).reshape(-1)
        if z.shape != final_logits.shape or conf.numel() != b:
            raise PteenetError(f"exit {i}: logits {tuple(z.shape)} / confidence {tuple(exit_conf[i].shape)} "
                               f"do not match the backbone's {tuple(final_logits.shape)}")
        own = F.log_softmax(z, dim=1)
        # logsigmoid(+-conf) are log h and log(1 - h) without ever forming 1 - h = 0.
        log_y = torch.logaddexp(F.logsigmoid(conf).unsqueeze(1) + own, F.logsigmoid(-conf).unsqueeze(1) + log_y)
        h = torch.sigmoid(conf)
        cost = h * float(costs[i]) + torch.sigmoid(-conf) * cost
        nlls.append(_nll(log_y, targets))
        costs_mean.append(cost.mean())
        own_nlls.append(_nll(own, targets))

    # nlls[-1] / costs_mean[-1] belong to exit 0 (the loop ran backwards).
    if cfg.version == "v1":
        nll = nlls[-1]
        loss = nll + cfg.lam * costs_mean[-1]
    else:
        nll = torch.stack(nlls).mean()
        loss = nll + cfg.lam * torch.stack(costs_mean).mean()
    if cfg.exit_ce:
        loss = loss + cfg.exit_ce * torch.stack(own_nlls).mean()
    # One host transfer for the two figures (each float() would wait for the device).
    figures = torch.stack([nll.detach(), costs_mean[-1].detach()]).tolist()
    return LossOutput(loss=loss, nll=figures[0], cost=figures[1])


def _per_exit_loss(exit_logits: Sequence[torch.Tensor], exit_conf: Sequence[torch.Tensor], final_logits: torch.Tensor,
                   costs: Sequence[float], cfg: LossConfig, targets: torch.Tensor,
                   reach: torch.Tensor | None = None) -> LossOutput:
    """The ``ce`` loss: every head's own cross-entropy (``exit_ce`` does not apply) and a BCE that
    teaches each confidence head whether its exit agrees with the backbone. With ``reach`` [E, B],
    each exit's two terms average over the samples that reach it only (none: the exit adds 0)."""
    dtype = _work_dtype(final_logits)
    agree_with = final_logits.detach().argmax(1)
    ces, bces, h_mean = [], [], []
    for k, (z, conf) in enumerate(zip(exit_logits, exit_conf)):
        z, conf = z.to(dtype), conf.to(dtype).reshape(-1)
        if z.shape != final_logits.shape or conf.numel() != final_logits.shape[0]:
            raise PteenetError(f"exit logits {tuple(z.shape)} / confidence {tuple(conf.shape)} "
                               f"do not match the backbone's {tuple(final_logits.shape)}")
        hit = (z.detach().argmax(1) == agree_with).to(dtype)
        if reach is None:
            ces.append(_nll(F.log_softmax(z, dim=1), targets))
            bces.append(F.binary_cross_entropy_with_logits(conf, hit))
        else:
            w = reach[k].to(dtype)
            per_sample = -(targets * F.log_softmax(z, dim=1).clamp(min=torch.finfo(dtype).min)).sum(1)
            ces.append((w * per_sample).sum() / w.sum().clamp(min=1.0))
            bces.append((w * F.binary_cross_entropy_with_logits(conf, hit, reduction="none")).sum() / w.sum().clamp(min=1.0))
        h_mean.append(torch.sigmoid(conf.detach()))
    nll = torch.stack(ces).mean()
    loss = nll + torch.stack(bces).mean()
    # Monitoring: the expected cost if each sample left where its confidence heads say (as C_0).
    cost = torch.full_like(h_mean[0], float(costs[-1]))
    for i in reversed(range(len(h_mean))):
        cost = h_mean[i] * float(costs[i]) + (1 - h_mean[i]) * cost
    # One host transfer for the two figures (each float() would wait for the device).
    figures = torch.stack([nll.detach(), cost.mean()]).tolist()
    return LossOutput(loss=loss, nll=figures[0], cost=figures[1])
