"""A cascade that trains with 1,000 classes (issue 18): the previous exit's logits reach the next
head standardised (``exits/cascade.py``), not as log-probabilities, which with 1,000 classes
dominate the head's input, compound along the exits and made the loss grow by orders of magnitude.
Also: such a run stops with an error that names the exit, and keeps the last good epoch."""
from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import pytest
import torch

import pteenet.training.step as step_mod
from pteenet import AttachConfig, attach, save_checkpoint
from pteenet.data import DataConfig, load_splits
from pteenet.errors import PteenetError
from pteenet.exits.branches import BranchConfig
from pteenet.runtime.checkpoint import load_checkpoint
from pteenet.training.run import TrainConfig, train_branches, train_exits

DATA = DataConfig(spec="synthetic", augment=False, seed=0, limit=300)
CFG = TrainConfig(epochs=8, batch_size=32, lr=1e-3, device="cpu", cache_features=True, ensemble=False)


def model_reading(form: str) -> object:
    torch.manual_seed(0)
    m = attach(AttachConfig(backbone="tiny_models:tanh_stack", num_classes=1000, input_size=(3, 8, 8), exits=8, cascade=True))
    if form != m.branch_config.cascade_input:
        m.branch_config = dataclasses.replace(m.branch_config, cascade_input=form)
        for b in m.branches:
            b.cascade_input = form
    return m


def test_cascade_converges_with_1000_classes_where_log_probabilities_diverge(tmp_path: Path) -> None:
    new = model_reading("zscore")
    assert new.branch_config.cascade and new.branch_config.cascade_input == "zscore"  # the default
    splits = load_splits(DATA, new.info.preprocess, 1000)
    x = torch.stack([splits.train[i][0] for i in range(len(splits.train))])
    with torch.no_grad():
        answers = Counter(new.backbone(x).argmax(1).tolist())
    chance = answers.most_common(1)[0][1] / len(x)  # always answering the backbone's commonest class
    assert len(answers) > 50 and chance < 0.1
    epochs = train_exits(new, DATA, CFG)["epochs"]
    losses = [r["train"]["loss"] for r in epochs]
    agreement = [r["train"]["agreement"][-1] for r in epochs]
    assert losses[-1] < losses[0] < 20, losses
    assert agreement[-1] > 2 * chance and agreement[-1] > agreement[0], (agreement, chance)
    # What issue 18 saw, log-probabilities into each head: the loss grows by orders of magnitude
    # (here an exit's cross-entropy is 50x a uniform guess's in the first epoch), and the guard
    # stops the run naming the exit.
    with pytest.raises(PteenetError, match=r"training diverged in epoch 1: exit \d+'s cross-entropy") as e:
        train_exits(model_reading("logprob"), DATA, CFG)
    assert "--no-cascade" in (e.value.hint or "")


def test_divergence_stops_the_run_and_keeps_the_last_good_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    attached, out = tmp_path / "attached.safetensors", tmp_path / "out.safetensors"
    save_checkpoint(attached, attach(AttachConfig(backbone="cifar-resnet20", input_size=(3, 16, 16), exits=2)))
    real = step_mod.BranchTrainer.step
    per_epoch = 2  # 64 training images in batches of 32

    def growing(self: step_mod.BranchTrainer, *a: object, **kw: object) -> dict:
        figures = real(self, *a, **kw)
        if self.step_count > per_epoch:  # from epoch 2 on, exit 1 "diverges"
            figures["exit_ce"] = [figures["exit_ce"][0], 1e4]
        return figures

    monkeypatch.setattr(step_mod.BranchTrainer, "step", growing)
    cfg = TrainConfig(epochs=3, batch_size=32, device="cpu")
    with pytest.raises(PteenetError, match="training diverged in epoch 2: exit 1's cross-entropy .* 1e[+]04") as e:
        train_branches(attached, out, DataConfig(spec="synthetic", limit=64), cfg)
    assert f"{out} keeps epoch 1, the last good one" in str(e.value)
    kept = load_checkpoint(out)
    assert kept.model.meta["training"]["epochs_done"] == 1 and int(kept.state["epoch"]) == 1


def test_old_branch_records_keep_reading_log_probabilities() -> None:
    legacy = {"type": "pool-mlp", "schema_version": 1, "kind": "pool-mlp", "convs": 2, "grid": 4, "hidden": 128,
              "cascade": True}  # a record written before branch schema 2
    assert BranchConfig.from_dict(legacy).cascade_input == "logprob"
    new = BranchConfig(kind="pool", cascade=True)
    assert new.cascade_input == "zscore" and BranchConfig.from_dict(new.to_dict()) == new
    with pytest.raises(PteenetError, match="branch schema 9"):
        BranchConfig.from_dict({**new.to_dict(), "branch_schema": 9})
