"""The batch-1 lean exit step (``pteenet/exits/lean.py``, ``EarlyExitModel.step_one``): the same
values as ``exit_step`` to the bit where it applies, None where it does not, and rebuilt when the
branch's parameters change, so that the latency path never answers with stale weights."""
from __future__ import annotations

import pytest
import torch

import pteenet
from helpers import make_images
from pteenet.exits import lean
from pteenet.exits.branches import Branch, BranchConfig, pool_plan
from pteenet.exits.chain import Carry, exit_step


def _branch(shape: tuple[int, ...], kind: str, grid: int = 4, cascade: bool = False) -> Branch:
    torch.manual_seed(1)
    b = Branch(shape, 10, BranchConfig(kind=kind, grid=grid, hidden=16, cascade=cascade))
    for m in b.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return b.eval()


@pytest.mark.parametrize("shape,kind,grid", [((8, 16, 16), "pool-mlp", 4), ((16, 8, 8), "pool", 4),
                                              ((4, 4, 4), "pool-mlp", 4), ((8, 12, 12), "pool-mlp", 2)])
def test_the_lean_step_gives_exit_steps_values_to_the_bit(shape: tuple[int, ...], kind: str, grid: int) -> None:
    b = _branch(shape, kind, grid)
    x = torch.randn(1, *shape)
    with torch.no_grad():
        step = lean.lean_step(b, x)
        assert step is not None
        want = exit_step(b, None, 0, x, Carry())
        got = step(x)
    assert torch.equal(got[0], want[1]) and torch.equal(got[1], want[2])


def test_no_lean_step_where_it_would_differ() -> None:
    x = torch.randn(1, 8, 8, 8)
    with torch.no_grad():
        assert lean.lean_step(_branch((8, 8, 8), "conv"), x) is None  # convs: exit_step
        assert lean.lean_step(_branch((8, 8, 8), "pool-mlp", cascade=True), x) is None  # reads the previous exit
        with pool_plan("nchw"):  # a forced pooling plan (comparisons) goes through GridPool
            assert lean.lean_step(_branch((8, 8, 8), "pool-mlp"), x) is None
    with torch.enable_grad():  # training: the trained layers, not the folded ones
        assert lean.lean_step(_branch((8, 8, 8), "pool-mlp"), x) is None


def test_batch_1_predictions_follow_parameter_changes_and_equal_the_batch() -> None:
    model = pteenet.attach(pteenet.AttachConfig(backbone="cifar-resnet20", input_size=(3, 16, 16), exits=3, branch="pool-mlp"))
    model.eval()
    x = make_images(6, seed=3)
    policy, never = "max-softmax", [1.5, 1.5, 1.5]
    for _ in range(2):  # before and after the heads change in place (an optimiser step, load_state_dict)
        with torch.no_grad():
            ref = model.forward_all(x)
        for i in range(len(x)):  # the batch-1 path: every head computed, nothing leaves
            one = model.predict(x[i:i + 1], never, policy)
            assert int(one.exit_index) == 3  # (batch 1 and batch 6 convolve in other orders: close, not equal)
            torch.testing.assert_close(one.logits, ref.final_logits[i:i + 1], rtol=0, atol=1e-4)
        # and at a threshold that lets some leave: each sample's exit and logits as forward_all says
        t = [0.0, 0.0, 0.0]
        got = model.predict(x[:1], t, policy)
        assert int(got.exit_index) == 0
        torch.testing.assert_close(got.logits, ref.exit_logits[0][:1], rtol=0, atol=1e-5)
        assert model._lean and all(hit[1] is not None for hit in model._lean.values())
        with torch.no_grad():
            for br in model.branches:
                br.classifier.bias.add_(3.0)
        changed = model.predict(x[:1], t, policy).logits  # before anything else reads the branches
        with torch.no_grad():
            torch.testing.assert_close(changed, model.forward_all(x[:1]).exit_logits[0], rtol=0, atol=1e-5)
