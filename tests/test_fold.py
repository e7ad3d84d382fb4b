"""Inference-time forms of the heads: BatchNorm folded into its neighbours and the two heads in one
matmul (``pteenet/exits/fold.py``), the ensemble's running sums, and the equal-window pooling plans. Each
gives the training-time modules' values; the folded form follows the parameters when they change."""
from __future__ import annotations

import pytest
import torch

from pteenet.exits.branches import POOL_PLANS, Branch, BranchConfig, GridPool
from pteenet.exits.chain import Carry, Ensemble, exit_step


def randomised(shape: tuple[int, ...], kind: str, convs: int = 2, cascade: bool = False, seed: int = 0) -> Branch:
    """A branch whose BatchNorms have non-trivial statistics and affine parameters."""
    torch.manual_seed(seed)
    b = Branch(shape, 10, BranchConfig(kind=kind, convs=convs, cascade=cascade, hidden=16))
    for m in b.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_(1, 0.2)
            m.bias.data.normal_(0, 0.2)
    return b.eval()


CASES = [((8, 8, 8), "pool", 0, False), ((8, 8, 8), "pool-mlp", 0, True), ((8, 8, 8), "conv-lite", 0, True),
         ((8, 8, 8), "conv", 2, False), ((8, 8, 8), "conv", 0, True), ((24,), "pool-mlp", 0, True), ((24,), "pool", 0, False)]


@pytest.mark.parametrize("shape,kind,convs,cascade", CASES)
def test_folded_head_equals_the_trained_layers(shape: tuple[int, ...], kind: str, convs: int, cascade: bool) -> None:
    b = randomised(shape, kind, convs, cascade)
    x, prev = torch.randn(5, *shape), torch.randn(5, 10)
    with torch.enable_grad():  # autograd on: the trained layers
        ref = b(x, prev)
    with torch.no_grad():  # eval inference: the folded form
        got = b(x, prev)
    assert b._folded is not None
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r.detach(), rtol=1e-5, atol=1e-5)


def test_folded_form_follows_parameter_changes() -> None:
    b = randomised((8, 8, 8), "pool-mlp", cascade=True)
    x = torch.randn(3, 8, 8, 8)
    with torch.no_grad():
        before = b(x)[0]
        b.classifier.bias.add_(1.0)  # in place, as an optimiser step or load_state_dict does
        after = b(x)[0]
    torch.testing.assert_close(after, before + 1.0)
    b.double()  # tensors replaced
    with torch.no_grad():
        assert b(x.double())[0].dtype == torch.float64


@pytest.mark.parametrize("plan", sorted(POOL_PLANS))
@pytest.mark.parametrize("c,h", [(3, 16), (4, 8), (2, 12)])
def test_every_pooling_plan_equals_adaptive_pooling(plan: str, c: int, h: int) -> None:
    pool = GridPool(4, (h, h))
    x = torch.randn(16, c, h, h)
    ref = torch.cat([pool.avg(x).flatten(1), pool.max(x).flatten(1)], 1)
    avg, mx = POOL_PLANS[plan](x, pool.windows)
    torch.testing.assert_close(torch.cat([avg.flatten(1), mx.flatten(1)], 1), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pool(x), ref, rtol=1e-5, atol=1e-6)  # whichever plan it timed fastest


def test_ensemble_running_sums_equal_the_weighted_mean_of_heads() -> None:
    torch.manual_seed(0)
    e, k = 4, 6
    ens = Ensemble(e, k)
    with torch.no_grad():
        ens.raw.normal_(0, 1)
        ens.bias.normal_(0, 1)
    heads = [torch.randn(7, k) for _ in range(e)]
    logps = [torch.log_softmax(h, 1) for h in heads]
    w = ens.weights()
    acc = None
    for i in range(e):
        with torch.no_grad():
            z, acc = ens.add_head(i, logps[i], acc)
        ref = sum(w[i, j] * logps[j] for j in range(i + 1)) + ens.bias[i]
        torch.testing.assert_close(z, ref.detach())
    assert acc is None  # nothing is carried past the last exit


def test_carry_rows_follow_the_samples() -> None:
    carry = Carry(torch.arange(6.).view(3, 2), torch.arange(12.).view(2, 3, 2))
    sel = carry.select(torch.tensor([True, False, True]))
    assert sel.prev.tolist() == [[0, 1], [4, 5]]
    assert sel.acc[:, 1].tolist() == [[4, 5], [10, 11]]
    assert carry.like(carry.tensors()).prev is carry.prev


def test_exit_step_with_ensemble_answers_with_the_ensemble() -> None:
    b = randomised((8, 4, 4), "pool", seed=1)
    ens = Ensemble(1, 10)
    x = torch.randn(4, 8, 4, 4)
    with torch.no_grad():
        head, logits, _, carry = exit_step(b, ens, 0, x, Carry())
    torch.testing.assert_close(logits, torch.log_softmax(head, 1) * ens.weights()[0, 0])
    assert carry.acc is None and carry.prev is None
