"""The README's central promises, each checked where it would break (issue 19): rows that leave stop
computing, scores as the README defines them, the cascade's detached input, the ensemble's fitting
split, no unpickling, the published checkpoint format, ``PTEENET_DEBUG``, export with an ensemble.
``benchmarks/mutation.py`` breaks each on purpose and records which test notices."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import pteenet
import pteenet.training.batches as batches_mod
from helpers import (
    assert_logits_close,
    build,
    cache_of,
    make_images,
    make_model,
    random_thresholds,
    run_cli,
    simulated_exits,
)
from pteenet.backbones.specs import load_backbone
from pteenet.backbones.weights import read_state_dict
from pteenet.data import DataConfig, load_splits
from pteenet.errors import PteenetError
from pteenet.exits import policies as pol
from pteenet.export.programs import exported_program
from pteenet.training.run import TrainConfig, train_branches


# -- real early exit: rows per stage ---------------------------------------------------------------
def _rows_per_stage(model: pteenet.EarlyExitModel, x: torch.Tensor, ts: list[float], bs: int) -> list[int]:
    """How many rows each stage the runtime runs (``run_plan``) received over ``x`` run in batches of
    ``bs`` (forward pre-hooks)."""
    stages = model.run_plan()[1].modules
    counts = [0] * len(stages)

    def hook(k: int) -> Any:
        return lambda mod, args: counts.__setitem__(k, counts[k] + int(args[0].shape[0]))

    handles = [m.register_forward_pre_hook(hook(k)) for k, m in enumerate(stages)]
    try:
        for i in range(0, len(x), bs):
            model.predict(x[i:i + bs], ts, "max-softmax")
    finally:
        for h in handles:
            h.remove()
    return counts


@pytest.mark.parametrize("bs", [1, 7, 48])
def test_samples_that_leave_stop_computing(bs: int) -> None:
    model = make_model()
    assert model.stages.shrinkable
    x = make_images(48)
    cache = cache_of(model, x)
    ts = random_thresholds(cache, "max-softmax", np.random.default_rng(3))
    want = simulated_exits(cache, "max-softmax", ts)  # the exit each sample leaves at (E: the end)
    assert len(set(want.tolist())) >= 3, "the thresholds should spread samples over the exits"
    # Stage 0 sees every row; stage j (after exit j-1) only the rows that did not leave before it.
    expected = [len(x)] + [int((want >= j).sum()) for j in range(1, model.num_exits + 1)]
    assert _rows_per_stage(model, x, ts, bs) == expected


def test_an_inactive_last_exit_computes_nothing_after_the_last_decision() -> None:
    model = make_model()
    model.set_active([True, True, False])
    x = make_images(16)
    counts = _rows_per_stage(model, x, [0.0, 0.0, 0.0], 16)  # max-softmax >= 0: all leave at exit 0
    # Unchained, exit 2's branch is not computed, so the backbone is not even cut there.
    assert model.run_plan()[0] == ([0, 1, 2] if model.chained else [0, 1])
    assert counts == ([16, 0, 0, 0] if model.chained else [16, 0, 0])


def test_the_runtime_cuts_the_backbone_only_where_a_branch_is_computed() -> None:
    model = make_model()  # unchained, the default
    assert not model.chained
    model.set_active([False, True, False])
    idx, stages = model.run_plan()
    assert idx == [1] and len(stages.modules) == 2  # one cut, at exit 1, and the end
    x = make_images(24)
    full = model.backbone(x)
    for bs in (1, 24):  # the rows that stay get the backbone's own logits from the merged stages
        pred = torch.cat([model.predict(x[i:i + bs], [2.0] * 3, "max-softmax").logits for i in range(0, 24, bs)])
        torch.testing.assert_close(pred, full)
    model.set_active(None)
    assert model.run_plan()[1] is model.stages


# -- policies: scores by hand ------------------------------------------------------------------------
def _by_hand(name: str, logits: np.ndarray, conf: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    if name == "confidence":
        return 1.0 / (1.0 + np.exp(-conf.astype(np.float64)))
    if name == "max-softmax":
        return p.max(1)
    if name == "entropy":
        return -(p * np.log(np.clip(p, 1e-300, None))).sum(1) / math.log(z.shape[1])
    raise AssertionError(f"no hand formula for policy {name!r}: add one")


@pytest.mark.parametrize("name", pol.SCORED)
def test_scores_equal_the_formulas_of_the_readme(name: str) -> None:
    g = torch.Generator().manual_seed(1)
    logits, conf = 3 * torch.randn(200, 10, generator=g), 3 * torch.randn(200, generator=g)
    got = pol.score(name, logits, conf).double().numpy()
    want = _by_hand(name, logits.numpy(), conf.numpy())
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
    assert want.min() < 0.3 and want.max() > 0.7  # the check covers the whole range, not one corner
    # two classes: the bound of the normalisation is reached (uniform logits -> entropy 1, top p 1/2)
    flat = torch.zeros(3, 2)
    np.testing.assert_allclose(pol.score(name, flat, torch.zeros(3)).double().numpy(),
                               _by_hand(name, flat.numpy(), np.zeros(3)), atol=1e-6)


# -- the cascade's detach ----------------------------------------------------------------------------
def test_no_gradient_reaches_the_previous_head_through_the_next() -> None:
    model = build("pool-mlp", True, False)
    assert model.branch_config.cascade
    model.train()
    out = model.forward_all(make_images(8, seed=4))
    out.heads[1].logsumexp(1).sum().backward()  # the loss of head 1 alone, which reads head 0's logits
    assert all(p.grad is None or not p.grad.any() for p in model.branches[0].parameters())
    assert any(p.grad is not None and p.grad.any() for p in model.branches[1].parameters())


def test_a_cascade_head_reads_the_previous_heads_logits() -> None:
    model = build("pool-mlp", True, False)
    x = make_images(8, seed=4)
    with torch.no_grad():
        taps, final = model.backbone_taps(x)
        out = model.branch_outputs(taps, final)
        fed, _ = model.branches[1](taps[1], out.heads[0])
        alone, _ = model.branches[1](taps[1], None)
    assert_logits_close(out.heads[1], fed)
    assert (out.heads[1] - alone).abs().max() > 1e-2  # the previous head's logits do change the answer


def test_each_exit_answers_with_its_row_of_the_ensemble_weights() -> None:
    model = build("pool-mlp", True, True)
    assert model.ensemble is not None
    with torch.no_grad():
        out = model.forward_all(make_images(16, seed=6))
        w, bias = model.ensemble.weights(), model.ensemble.bias
        logp = [torch.log_softmax(h.float(), 1) for h in out.heads]
        for k in range(model.num_exits):  # exit k: sum over heads j <= k of w[k, j] * log p_j, plus bias k
            want = sum(w[k, j] * logp[j] for j in range(k + 1)) + bias[k]
            assert_logits_close(out.exit_logits[k], want, rel=1e-4)


# -- the ensemble is fitted on the calibration split ------------------------------------------------
def test_the_ensemble_is_fitted_on_the_calibration_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    ck = tmp_path / "attached.safetensors"
    pteenet.save_checkpoint(ck, pteenet.attach(pteenet.AttachConfig(backbone="cifar-resnet20", input_size=(3, 16, 16), exits=2)))
    seen: list[tuple[list[torch.Tensor], torch.Tensor]] = []
    real = batches_mod.fit_ensemble
    monkeypatch.setattr(batches_mod, "fit_ensemble", lambda h, t, **kw: seen.append((h, t)) or real(h, t, **kw))
    data = DataConfig(spec="synthetic", limit=96, augment=False)
    train_branches(ck, tmp_path / "trained.safetensors", data,
                   TrainConfig(epochs=1, batch_size=32, lr=1e-2, device="cpu", ensemble=True))
    assert len(seen) == 1
    heads, targets = seen[0]
    trained = pteenet.load(str(tmp_path / "trained.safetensors"))
    splits = load_splits(data, trained.info.preprocess, trained.info.num_classes)
    val = torch.stack([splits.calibration[i][0] for i in range(len(splits.calibration))])
    assert 0 < len(val) < len(splits.train)
    with torch.no_grad():
        want = trained.forward_all(val)
    assert all(h.shape[0] == len(val) for h in heads)
    for h, w in zip(heads, want.heads):
        torch.testing.assert_close(h, w, atol=1e-4, rtol=1e-4)
    assert torch.equal(targets, want.final_logits.argmax(1))


# -- weights files: nothing is unpickled, the published format loads ---------------------------------
class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))  # what unpickling would run


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".th"])
def test_a_pickle_that_runs_code_is_refused(tmp_path: Path, suffix: str) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / f"evil{suffix}"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": _Payload(marker)}, path)
    with pytest.raises(PteenetError, match="cannot read weights file"):
        read_state_dict(path)
    assert not marker.exists(), "the pickle's code ran"


def test_the_published_state_dict_module_format_loads(tmp_path: Path) -> None:
    torch.manual_seed(3)
    net, _ = load_backbone("cifar-resnet20")
    for p in net.parameters():  # not the weights a fresh build would have
        p.data.normal_()
    path = tmp_path / "resnet20-12fca82f.th"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}, "best_prec1": 91.7}, path)
    loaded, _ = load_backbone("cifar-resnet20", weights=str(path))
    want = net.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


# -- PTEENET_DEBUG -----------------------------------------------------------------------------------
@pytest.mark.parametrize("debug", [False, True])
def test_pteenet_debug_shows_the_traceback_and_only_then(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          debug: bool) -> None:
    monkeypatch.setenv("PTEENET_DEBUG", "1" if debug else "")  # an empty value is off
    code, _, stderr = run_cli("info", tmp_path / "missing.safetensors")
    assert code == 1
    lines = stderr.strip().splitlines()
    assert [ln for ln in lines if ln.startswith("Error:")] and "missing.safetensors" in stderr
    assert ("Traceback" in stderr) is debug, stderr
    assert (len(lines) == 1) is not debug, stderr  # without it: one line, the error alone


# -- export with an ensemble -------------------------------------------------------------------------
def test_the_static_program_with_an_ensemble_equals_eager() -> None:
    """What ``export`` writes for the static formats (``exported_program``); the torch.cond program with
    an ensemble is checked in test_branches."""
    model = build("pool-mlp", True, True)
    assert model.ensemble is not None
    x = make_images(12, seed=8)
    with torch.no_grad():
        a = model.forward_all(x)
        static = exported_program(model, static=True).module()(x)
    assert not torch.allclose(a.exit_logits[1], a.heads[1])  # the ensemble changes what an exit answers
    want = [t for lg, c in zip(a.exit_logits, a.exit_conf) for t in (lg, torch.sigmoid(c))] + [a.final_logits]
    for g, w in zip(static, want, strict=True):
        assert_logits_close(g, w, rel=1e-3)
