"""``train-branches --survivors``: each head learns only from the samples that reach it under the
checkpoint's chosen exit rule (CalexNet's survivors), and the survivors are the ones the runtime
would send on."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import pteenet
from helpers import cache_of, error_line, make_images, make_model, random_thresholds, run_cli
from pteenet.errors import PteenetError
from pteenet.evaluation.engine import exit_indices
from pteenet.training.config import TrainConfig
from pteenet.training.loss import LossConfig, early_exit_loss
from pteenet.training.step import BranchTrainer


def test_the_survivors_are_the_samples_the_runtime_sends_on() -> None:
    model, x = make_model(), make_images(48)
    cache = cache_of(model, x)
    ts = random_thresholds(cache, "max-softmax", np.random.default_rng(3))
    model.set_thresholds(ts, "max-softmax")
    with torch.no_grad():
        reach = model.reaching(model.forward_all(x)).numpy()
    first = exit_indices(cache, "max-softmax", ts)
    np.testing.assert_array_equal(reach, np.stack([first >= k for k in range(model.num_exits)]))
    assert reach[0].all() and not reach[-1].all()


def test_a_head_gets_no_gradient_from_samples_that_left_before_it() -> None:
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(8, 10, generator=g, requires_grad=True) for _ in range(2)]
    conf = [torch.randn(8, generator=g, requires_grad=True) for _ in range(2)]
    final = torch.randn(8, 10, generator=g)
    reach = torch.tensor([[True] * 8, [True] * 3 + [False] * 5])
    early_exit_loss(logits, conf, final, [0.3, 0.6, 1.0], LossConfig(), reach=reach).loss.backward()
    assert logits[1].grad is not None and conf[1].grad is not None
    assert (logits[1].grad[3:] == 0).all() and (conf[1].grad[3:] == 0).all()
    assert (logits[1].grad[:3].abs().sum(1) > 0).all() and (logits[0].grad.abs().sum(1) > 0).all()
    with pytest.raises(PteenetError, match="ce loss"):
        early_exit_loss(logits, conf, final, [0.3, 0.6, 1.0], LossConfig(version="v2"), reach=reach)


@pytest.mark.parametrize("survivors", [True, False])
def test_training_step_touches_only_heads_that_samples_reach(survivors: bool) -> None:
    model, x = make_model(), make_images(32)
    model.set_thresholds([0.0, 0.5, 0.5], "max-softmax")  # every sample leaves at exit 0
    before = [[p.detach().clone() for p in b.parameters()] for b in model.branches]
    trainer = BranchTrainer(model, TrainConfig(survivors=survivors, device="cpu"), torch.device("cpu"), total_steps=4)
    model.train()
    trainer.step(model.forward_all(x), torch.zeros(32, dtype=torch.long))
    moved = [any(not torch.equal(a, p) for a, p in zip(old, b.parameters())) for old, b in zip(before, model.branches)]
    # With every sample used, all heads learn; with survivors only, the heads no sample reaches do not.
    assert moved == ([True, False, False] if survivors else [True, True, True])


def test_survivors_need_a_chosen_rule_and_the_ce_loss(tmp_path: Path) -> None:
    with pytest.raises(PteenetError, match="--survivors"):
        TrainConfig(survivors=True, loss=LossConfig(version="v2"))
    path = tmp_path / "m.safetensors"
    pteenet.save_checkpoint(path, make_model())
    code, stdout, stderr = run_cli("train-branches", path, "-o", tmp_path / "o.safetensors", "--data", "synthetic",
                                   "--survivors", "--epochs", 1)
    assert code == 1 and "sweep-threshold" in error_line(stderr)
