"""The early-exit loss against a hand computation in plain probability space, and its edge cases."""
from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from pteenet.errors import PteenetError
from pteenet.training.loss import LossConfig, early_exit_loss, targets_from_backbone


def _softmax(row: list[float], t: float = 1.0) -> list[float]:
    m = max(row)
    ex = [math.exp((v - m) / t) for v in row]
    return [v / sum(ex) for v in ex]


def _by_hand(zs, confs, final, costs, version, lam, target_rows):
    """Explicit loops: Y_i = h*y_i + (1-h)*Y_{i+1}, C_i likewise; target_rows[b] is a distribution."""
    b_n, e = len(final), len(zs)
    nll, cost = [0.0] * e, [0.0] * e
    for b in range(b_n):
        y_next, c_next = _softmax(final[b]), costs[e]
        for i in reversed(range(e)):
            h = 1 / (1 + math.exp(-confs[i][b]))
            y_i = _softmax(zs[i][b])
            y_next = [h * p + (1 - h) * q for p, q in zip(y_i, y_next)]
            c_next = h * costs[i] + (1 - h) * c_next
            nll[i] += -sum(t * math.log(p) for t, p in zip(target_rows[b], y_next) if t > 0) / b_n
            cost[i] += c_next / b_n
    if version == "v1":
        return nll[0] + lam * cost[0], nll[0], cost[0]
    return sum(n + lam * c for n, c in zip(nll, cost)) / e, sum(nll) / e, cost[0]


def _batch(b: int, e: int, k: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    zs = [torch.randn(b, k, generator=g, dtype=torch.float64) * 2 for _ in range(e)]
    confs = [torch.randn(b, generator=g, dtype=torch.float64) * 2 for _ in range(e)]
    final = torch.randn(b, k, generator=g, dtype=torch.float64) * 2
    costs = sorted((0.1 + 0.9 * torch.rand(e, generator=g)).tolist()) + [1.0 + 0.05 * e]  # cumulative, rising
    return zs, confs, final, costs


def _one_hot(idx: list[int], k: int = 3) -> list[list[float]]:
    return [[1.0 if j == c else 0.0 for j in range(k)] for c in idx]


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("b,e", [(2, 2), (3, 3), (3, 1)])
@pytest.mark.parametrize("targets", ["pseudo", "soft", "labels"])
def test_matches_hand_computation(version: str, b: int, e: int, targets: str) -> None:
    zs, confs, final, costs = _batch(b, e, seed=b * 10 + e)
    labels = torch.tensor([(j + 1) % 3 for j in range(b)])
    cfg = LossConfig(version=version, lam=0.7, targets=targets, temperature=2.0, exit_ce=0.0)
    out = early_exit_loss(zs, confs, final, costs, cfg, labels=labels)
    fl = final.tolist()
    rows = {
        "pseudo": _one_hot([max(range(3), key=r.__getitem__) for r in fl]),
        "soft": [_softmax(r, 2.0) for r in fl],
        "labels": _one_hot(labels.tolist()),
    }[targets]
    loss, nll, cost = _by_hand([z.tolist() for z in zs], [c.tolist() for c in confs], fl, costs, version, 0.7, rows)
    assert out.loss.item() == pytest.approx(loss, rel=1e-9)
    assert out.nll == pytest.approx(nll, rel=1e-9)
    assert out.cost == pytest.approx(cost, rel=1e-9)
    # exit_ce adds the mean of each branch's own NLL against the same targets
    own = [sum(-sum(t * math.log(p) for t, p in zip(rows[j], _softmax(z[j]))) for j in range(b)) / b for z in (zz.tolist() for zz in zs)]
    with_ce = early_exit_loss(zs, confs, final, costs, dataclasses.replace(cfg, exit_ce=0.3), labels=labels)
    assert with_ce.loss.item() == pytest.approx(loss + 0.3 * sum(own) / e, rel=1e-9)


def test_targets_from_backbone() -> None:
    final = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    assert targets_from_backbone(final, LossConfig(targets="pseudo")).tolist() == [1, 0]
    soft = targets_from_backbone(final, LossConfig(targets="soft", temperature=4.0))
    assert soft.shape == (2, 3) and torch.allclose(soft.sum(1), torch.ones(2))
    assert torch.allclose(soft, torch.softmax(final / 4.0, 1))
    assert targets_from_backbone(final, LossConfig(targets="labels"), torch.tensor([2, 1])).tolist() == [2, 1]


def test_gradients_reach_branches_but_not_backbone() -> None:
    zs, confs, final, costs = _batch(3, 2)
    zs = [z.float().requires_grad_() for z in zs]
    confs = [c.float().unsqueeze(1).requires_grad_() for c in confs]  # [B, 1] is accepted too
    final = final.float().requires_grad_()
    for version in ("v1", "v2"):
        out = early_exit_loss(zs, confs, final, costs, LossConfig(version=version, targets="soft"))
        out.loss.backward()
        for t in zs + confs:
            assert t.grad is not None and t.grad.abs().sum() > 0
            t.grad = None
        assert final.grad is None


@pytest.mark.parametrize("targets", ["pseudo", "soft", "labels"])
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_extreme_inputs_stay_finite(targets: str, version: str) -> None:
    big = 1e4
    zs = [torch.tensor([[big, -big, 0.0], [-big, big, -big]], requires_grad=True) for _ in range(3)]
    confs = [torch.tensor([big, -big], requires_grad=True), torch.tensor([-big, -big], requires_grad=True),
             torch.tensor([big, big], requires_grad=True)]
    final = torch.tensor([[-big, big, -big], [big, -big, -big]])  # backbone disagrees with every branch
    labels = torch.tensor([2, 0])
    out = early_exit_loss(zs, confs, final, [0.3, 0.6, 0.9, 1.2], LossConfig(version=version, targets=targets), labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for t in zs + confs:
        assert torch.isfinite(t.grad).all()
    assert all(math.isfinite(v) for v in [out.nll, out.cost])


def test_half_precision_inputs_are_finite() -> None:
    zs = [torch.full((2, 3), 6e4, dtype=torch.float16)]
    zs[0][:, 0] = -6e4
    out = early_exit_loss(zs, [torch.full((2,), -6e4, dtype=torch.float16)], torch.zeros(2, 3, dtype=torch.float16),
                          [0.5, 1.1], LossConfig())
    assert torch.isfinite(out.loss)


def test_lambda_zero_removes_cost_term() -> None:
    zs, confs, final, costs = _batch(3, 2)
    for version in ("v1", "v2"):
        out = early_exit_loss(zs, confs, final, costs, LossConfig(version=version, lam=0.0, exit_ce=0.0))
        assert out.loss.item() == pytest.approx(out.nll, rel=1e-12)
        assert out.cost > 0
    v1 = early_exit_loss(zs, confs, final, costs, LossConfig(version="v1", lam=0.5, exit_ce=0.0))
    assert v1.loss.item() == pytest.approx(v1.nll + 0.5 * v1.cost, rel=1e-12)


def test_limits_of_the_confidence_heads() -> None:
    zs, _, final, costs = _batch(3, 3)
    lam = 0.9
    cfg = LossConfig(version="v1", lam=lam, targets="labels", exit_ce=0.0)
    labels = torch.tensor([0, 1, 2])

    def nll(logits: torch.Tensor) -> float:
        return torch.nn.functional.cross_entropy(logits, labels).item()

    never = [torch.full((3,), -30.0, dtype=torch.float64)] * 3  # h_i -> 0: everything runs to the end
    out = early_exit_loss(zs, never, final, costs, cfg, labels)
    assert out.loss.item() == pytest.approx(nll(final) + lam * costs[-1], rel=1e-9)
    assert out.cost == pytest.approx(costs[-1], rel=1e-9)

    first = [torch.full((3,), 30.0, dtype=torch.float64)] + never[1:]  # h_0 -> 1: everything leaves at exit 0
    out = early_exit_loss(zs, first, final, costs, cfg, labels)
    assert out.loss.item() == pytest.approx(nll(zs[0]) + lam * costs[0], rel=1e-9)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(costs=[0.5, 1.0]), "costs"),
        (dict(costs=[0.5, 0.8, float("inf")]), "costs"),
        (dict(cfg=LossConfig(targets="labels")), "labels"),
        (dict(cfg=LossConfig(targets="labels"), labels=torch.tensor([0, 5, 1])), r"\[0, 3\)"),
        (dict(cfg=LossConfig(targets="labels"), labels=torch.tensor([0, 1])), "labels"),
        (dict(exit_conf=[torch.zeros(3)]), "confidence"),
        (dict(exit_logits=[], exit_conf=[]), "at least one exit"),
    ],
)
def test_invalid_inputs_raise(kwargs: dict, match: str) -> None:  # bad LossConfigs: tests/test_configs.py
    zs, confs, final, costs = _batch(3, 2)
    args = dict(exit_logits=zs, exit_conf=confs, final_logits=final, costs=costs, cfg=LossConfig(), labels=None)
    args.update(kwargs)
    with pytest.raises(PteenetError) as err:
        early_exit_loss(**args)
    assert re.search(match, str(err.value))  # str() carries the hint, where valid names are listed


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_exit_ce_adds_the_mean_per_exit_cross_entropy(version: str) -> None:
    torch.manual_seed(3)
    zs = [torch.randn(4, 3) for _ in range(2)]
    confs = [torch.randn(4) for _ in range(2)]
    final = torch.randn(4, 3)
    costs = [0.3, 0.6, 1.2]
    paper = early_exit_loss(zs, confs, final, costs, LossConfig(version=version, targets="pseudo", exit_ce=0.0))
    both = early_exit_loss(zs, confs, final, costs, LossConfig(version=version, targets="pseudo", exit_ce=0.5))
    targets = final.argmax(1)
    ce = sum(float(torch.nn.functional.cross_entropy(z, targets)) for z in zs) / 2
    assert float(both.loss) == pytest.approx(float(paper.loss) + 0.5 * ce, rel=1e-6)
    # the classifiers get a gradient even when every confidence head says "never exit"
    z = torch.randn(4, 3, requires_grad=True)
    out = early_exit_loss([z], [torch.full((4,), -30.0)], final, [0.3, 1.2], LossConfig(version=version))
    out.loss.backward()
    assert z.grad is not None and float(z.grad.abs().sum()) > 1e-3


def test_ce_loss_is_each_heads_cross_entropy_plus_agreement_bce() -> None:
    torch.manual_seed(5)
    zs = [torch.randn(6, 4) for _ in range(3)]
    confs = [torch.randn(6) for _ in range(3)]
    final = torch.randn(6, 4)
    cfg = LossConfig(version="ce", targets="soft", temperature=2.0)
    out = early_exit_loss(zs, confs, final, [0.2, 0.5, 0.8, 1.1], cfg)
    soft = torch.softmax(final / 2.0, 1)
    ces = [float(-(soft * torch.log_softmax(z, 1)).sum(1).mean()) for z in zs]
    bces = [float(torch.nn.functional.binary_cross_entropy_with_logits(c, (z.argmax(1) == final.argmax(1)).float()))
            for z, c in zip(zs, confs)]
    assert float(out.loss) == pytest.approx(sum(ces) / 3 + sum(bces) / 3, rel=1e-6)
    assert out.nll == pytest.approx(sum(ces) / 3, rel=1e-6)
    # both the classifier and the confidence head learn (the BCE target is the detached argmax)
    z = torch.randn(6, 4, requires_grad=True)
    c = torch.zeros(6, requires_grad=True)
    early_exit_loss([z], [c], final, [0.3, 1.0], cfg).loss.backward()
    assert z.grad is not None and c.grad is not None and float(c.grad.abs().sum()) > 0
