"""The branch types beyond ConvX (pool, pool-mlp, conv-lite), cascade, the fitted ensemble and exit
selection: every one runs the same in the runtime as in the sweep's simulation, batched as one by one,
through a feature cache as from images, after a checkpoint round trip, and in torch.export."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import pteenet
from helpers import (
    assert_logits_close,
    build,
    cache_of,
    error_line,
    make_images,
    random_thresholds,
    run_cli,
    simulated_exits,
    swept_checkpoint,
)
from pteenet.exits.chain import computed_branches, fit_ensemble
from pteenet.export.programs import CondProgram
from pteenet.sweep import ExitCache, backbone_point, evaluate, restrict, select, select_exits, sweep_global
from pteenet.training.batches import _stem_shapes

VARIANTS = [  # (branch, cascade, ensemble)
    ("pool", False, False), ("pool-mlp", True, True), ("pool-mlp", False, True), ("conv-lite", True, False),
    ("conv1", False, True),
]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return make_images(40, seed=3)


@pytest.mark.parametrize("branch,cascade,ensemble", VARIANTS)
def test_runtime_equals_simulation_for_every_branch_type(branch: str, cascade: bool, ensemble: bool, images: torch.Tensor) -> None:
    model = build(branch, cascade, ensemble)
    cache = cache_of(model, images)
    with torch.no_grad():
        a = model.forward_all(images)
    per_exit = torch.stack(a.exit_logits + [a.final_logits])
    rng = np.random.default_rng(7)
    seen: set[int] = set()
    for _ in range(3):
        ts = random_thresholds(cache, "max-softmax", rng)
        want = simulated_exits(cache, "max-softmax", ts)
        seen.update(want.tolist())
        for bs in (1, 7, len(images)):
            got = [model.predict(images[i:i + bs], ts, "max-softmax") for i in range(0, len(images), bs)]
            np.testing.assert_array_equal(torch.cat([g.exit_index for g in got]).numpy(), want, err_msg=f"batch {bs}")
            # An ensemble sums log-probabilities of magnitude ~100 into logits of ~20, so batch-shape
            # noise is relative to those terms, not to the result: a wider relative tolerance.
            assert_logits_close(torch.cat([g.logits for g in got]), per_exit[want, np.arange(len(want))],
                                rel=1e-3 if ensemble else 3e-4)
    assert len(seen) >= 3


@pytest.mark.parametrize("branch,cascade,ensemble", VARIANTS[:2])
def test_feature_cache_rows_give_the_same_outputs(branch: str, cascade: bool, ensemble: bool, images: torch.Tensor) -> None:
    """Training from cached stem outputs computes what training from images computes."""
    model = build(branch, cascade, ensemble)
    with torch.no_grad():
        taps, final = model.backbone_taps(images)
        direct = model.branch_outputs(taps, final)
        stems = [b.stem(t) for b, t in zip(model.branches, taps)]
        cached = model.branch_outputs(stems, final, features=True)
    assert [tuple(s.shape[1:]) for s in stems] == _stem_shapes(model)
    if model.branch_config.cacheable_stem:
        # pooled vectors: never larger than the taps they replace, smaller where the map is large
        assert all(s[0].numel() <= t[0].numel() for s, t in zip(stems, taps))
        assert stems[0][0].numel() < taps[0][0].numel()
    for x, y in zip(direct.exit_logits + direct.exit_conf, cached.exit_logits + cached.exit_conf):
        torch.testing.assert_close(x, y)


def test_ensemble_is_fitted_non_negative_and_helps(images: torch.Tensor) -> None:
    model = build("pool-mlp", True, False)
    x = make_images(128, seed=9)
    with torch.no_grad():
        out = model.forward_all(x)
    targets = out.final_logits.argmax(1)
    ens = fit_ensemble(out.heads, targets, steps=200)
    w = ens.weights()
    assert (w >= 0).all() and torch.equal(w, w.tril())
    model.set_ensemble(ens)
    with torch.no_grad():
        fitted = model.forward_all(x)
    nll = lambda zs: float(sum(torch.nn.functional.cross_entropy(z, targets) for z in zs))  # noqa: E731
    assert nll(fitted.exit_logits) < nll(out.heads)  # fitted on these rows: it must not be worse there
    # exit 0's ensemble reads head 0 only
    assert_logits_close(fitted.exit_logits[0], torch.log_softmax(out.heads[0], 1) * w[0, 0] + ens.bias[0])


def test_checkpoint_round_trip_keeps_branches_ensemble_and_active(tmp_path: Path, images: torch.Tensor) -> None:
    model = build("pool-mlp", True, True)
    model.set_active([True, False, True])
    path = tmp_path / "m.safetensors"
    pteenet.save_checkpoint(path, model)
    back = pteenet.load(str(path))
    assert back.branch_config == model.branch_config and back.active == [True, False, True]
    assert back.ensemble is not None
    with torch.no_grad():
        for a, b in zip(model.forward_all(images).exit_logits, back.forward_all(images).exit_logits):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("chained", [False, True])
def test_inactive_exits_never_decide_and_their_branches_are_skipped(chained: bool, images: torch.Tensor) -> None:
    model = build("pool-mlp", chained, False, exits="all")
    e = model.num_exits
    active = [k in (1, 4) for k in range(e)]
    model.set_active(active)
    calls = [0] * e
    hooks = [b.register_forward_hook(lambda *_, k=k: calls.__setitem__(k, calls[k] + 1)) for k, b in enumerate(model.branches)]
    try:
        cache = cache_of(model, images)
        assert model.cost is not None
        sim = restrict(cache, active, model.cost, model.chained)
        calls[:] = [0] * e
        ts = [0.0] * e  # every active exit would take every sample: only exit 1 can
        pred = model.predict(images, ts, "max-softmax")
    finally:
        for h in hooks:
            h.remove()
    assert set(pred.exit_index.tolist()) == {1}
    point = evaluate(sim, "max-softmax", ts)
    assert point.exit_fractions[1] == 1.0
    # heads run: exit 0 only when a later head reads it (cascade); nothing after the last active exit
    assert calls[0] == (1 if chained else 0) and calls[1] == 1 and all(c == 0 for c in calls[2:])
    assert computed_branches(active, chained)[0] == chained
    costs = model.cost.costs(computed_branches(active, chained))
    assert sim.costs[1] == costs[1] < model.cost.costs()[1] + 1e-12
    assert costs[-1] < model.cost.final_cost  # the heads after exit 4 are not paid for


def _best(cache: Any, model: pteenet.EarlyExitModel, active: list[bool], grid: np.ndarray,
          **criterion: float) -> Any:
    """The point ``select`` picks with only ``active`` exits deciding (None: none qualifies)."""
    assert model.cost is not None
    points = sweep_global(restrict(cache, active, model.cost, model.chained), "max-softmax", grid)
    try:
        return select(points, backbone_point(cache), **criterion)
    except pteenet.PteenetError:  # a budget below what these exits reach
        return None


def _assert_locally_optimal(cache: Any, model: pteenet.EarlyExitModel, active: list[bool], grid: np.ndarray,
                            key: Any, **criterion: float) -> None:
    """No single further removal is as good (the greedy search takes ties, so each must be worse)."""
    here = key(_best(cache, model, active, grid, **criterion))
    for k in [k for k, a in enumerate(active) if a]:
        fewer = [a and j != k for j, a in enumerate(active)]
        assert key(_best(cache, model, fewer, grid, **criterion)) > here, f"dropping exit {k} too would not hurt"


def test_exit_selection_drops_exits_without_losing_the_point(images: torch.Tensor) -> None:
    model = build("pool-mlp", True, True, exits="all")
    x = make_images(200, seed=13)
    cache = cache_of(model, x)
    cache.labels = cache.preds[-1].astype(np.int64)  # agreement as accuracy: the criterion has work to do
    grid = np.linspace(0, 1, 51)
    assert model.cost is not None
    sel = select_exits(cache, model.cost, model.chained, "max-softmax", grid, max_drop=5.0)
    full = _best(cache, model, [True] * model.num_exits, grid, max_drop=5.0)  # every exit deciding
    assert sum(sel.active) < model.num_exits
    assert sel.point.cost <= full.cost + 1e-12 and sel.point.accuracy >= 0.95 - 1e-9
    _assert_locally_optimal(cache, model, sel.active, grid, lambda p: (np.inf,) if p is None else (p.cost, -p.metric),
                            max_drop=5.0)
    restricted = restrict(cache, sel.active, model.cost, model.chained)
    again = evaluate(restricted, "max-softmax", sel.point.thresholds or [])
    assert again.cost == pytest.approx(sel.point.cost) and again.accuracy == pytest.approx(sel.point.accuracy)
    # what the runtime then does with that selection is what the restricted cache says
    model.set_active(sel.active)
    pred = model.predict(x, sel.point.thresholds or [], "max-softmax")
    frac = np.bincount(pred.exit_index.numpy(), minlength=model.num_exits + 1) / len(x)
    np.testing.assert_allclose(frac, sel.point.exit_fractions)


def test_exit_selection_by_budget_is_never_worse_than_every_exit() -> None:
    model = build("pool-mlp", True, True, exits="all")
    cache = cache_of(model, make_images(200, seed=13))
    cache.labels = cache.preds[-1].astype(np.int64)
    grid = np.linspace(0, 1, 51)
    assert model.cost is not None
    budget = 0.45
    sel = select_exits(cache, model.cost, model.chained, "max-softmax", grid, budget=budget)
    full = _best(cache, model, [True] * model.num_exits, grid, budget=budget)
    assert sum(sel.active) < model.num_exits and sel.point.cost <= budget + 1e-9
    assert (sel.point.metric, -sel.point.cost) >= (full.metric, -full.cost)
    _assert_locally_optimal(cache, model, sel.active, grid,
                            lambda p: (np.inf,) if p is None else (-p.metric, p.cost), budget=budget)


class _HandCosts:
    """Costs of two non-chained exits as CostTable.costs(computed) prices them: the prefix up to the
    exit plus every computed branch passed; the second branch is dear (0.3 of the backbone)."""

    prefix, branch = np.array([0.2, 0.5]), np.array([0.05, 0.3])

    def costs(self, computed: list[bool]) -> list[float]:
        paid = np.cumsum(np.where(computed, self.branch, 0.0))
        return [*(self.prefix + paid), 1.0 + paid[-1]]


def test_exit_selection_by_budget_keeps_accuracy_before_cost() -> None:
    """A dear exit that corrects the backbone: dropping it is the cheapest removal but costs accuracy,
    so within the budget selection must drop the useless exit instead (accuracy first, then cost)."""
    n, wrong = 100, np.arange(80, 100)  # the backbone is wrong on the last 20 samples; only exit 1 is right there
    labels = np.zeros(n, dtype=np.int64)
    backbone = labels.copy()
    backbone[wrong] = 1
    preds = np.stack([backbone, 1 - labels, backbone])  # exit 1 says 1 everywhere but where it is sure
    preds[1, wrong] = 0
    scores = np.zeros((2, n), dtype=np.float32)  # exit 0 never passes; exit 1 passes on the 20 it corrects
    scores[1] = 0.1
    scores[1, wrong] = 0.9
    cache = ExitCache(preds, {"max-softmax": scores}, labels, _HandCosts().costs([True, True]),
                      _HandCosts().costs([True, True]))
    sel = select_exits(cache, _HandCosts(), False, "max-softmax", np.linspace(0, 1, 11), budget=1.3)
    assert sel.active == [False, True]
    assert sel.point.metric == pytest.approx(1.0) and sel.point.cost == pytest.approx(0.2 * 0.8 + 0.8 * 1.3)


def test_cond_program_with_ensemble_and_inactive_exits_equals_eager(images: torch.Tensor) -> None:
    model = build("pool-mlp", True, True)
    model.set_active([True, False, True])
    cache = cache_of(model, images)
    ts = random_thresholds(cache, "max-softmax", np.random.default_rng(1))
    model.set_thresholds(ts, "max-softmax")
    ep = torch.export.export(CondProgram(model, "max-softmax").eval(), (images[:1], torch.tensor(ts)))
    for i in range(6):
        logits, exit_index = ep.module()(images[i:i + 1], torch.tensor(ts))
        want = model.predict(images[i:i + 1])
        assert int(exit_index) == int(want.exit_index)
        assert_logits_close(logits, want.logits)


def test_attach_exits_all_and_branch_costs() -> None:
    model = pteenet.attach(pteenet.AttachConfig(backbone="cifar-resnet20", input_size=(3, 16, 16), exits="all", branch="pool",
                                                cascade=False))
    assert model.num_exits == 9  # every block of the three stages
    assert model.cost is not None
    for k, e in enumerate(model.cost.exits):
        c, h, w = model.tap_shapes[k]
        width = c * h * w if h <= 4 and w <= 4 else 2 * c * min(4, h) * min(4, w)
        # the two linear heads at least; pooling and BatchNorm add a little, never a conv's worth
        assert width * 11 <= e.branch_macs < width * 11 + 8 * c * h * w
    with pytest.raises(pteenet.PteenetError, match="'all'"):
        pteenet.attach(pteenet.AttachConfig(backbone="cifar-resnet20", input_size=(3, 16, 16), exits="most"))


def test_sweep_cli_select_exits_writes_the_active_exits(tmp_path: Path) -> None:
    model, ckpt = swept_checkpoint(tmp_path)
    tuned = tmp_path / "tuned.safetensors"
    code, stdout, stderr = run_cli("sweep-threshold", ckpt, "-o", tmp_path / "sw", "--thresholds", "0:1:0.05", "--max-drop", "100",
                                   "--select-exits", "--policy", "max-softmax", "--cost", "macs", "--write", tuned, "--json")
    assert code == 0, stderr
    chosen = json.loads(stdout)["chosen"]
    active = chosen["active_exits"]
    assert active is not None and sum(active) < model.num_exits
    assert pteenet.load(str(tuned)).active == active
    assert chosen["test"]["exit_fractions"][:-1] == pytest.approx(
        [f if a else 0.0 for f, a in zip(chosen["test"]["exit_fractions"][:-1], active)])
    code, _, stderr = run_cli("sweep-threshold", ckpt, "-o", tmp_path / "sw2", "--select-exits")
    assert code == 1 and error_line(stderr).startswith("Error: --select-exits needs")


@pytest.mark.parametrize("hw", [(32, 32), (16, 12), (7, 7)])
def test_grid_pool_fast_path_equals_adaptive_pooling(hw: tuple[int, int]) -> None:
    from pteenet.exits.branches import GridPool

    pool = GridPool(4, hw)
    x = torch.randn(32, 3, *hw)  # >= 16 rows: the fast path where the windows are equal
    want = torch.cat([torch.nn.functional.adaptive_avg_pool2d(x, pool.avg.output_size).flatten(1),
                      torch.nn.functional.adaptive_max_pool2d(x, pool.max.output_size).flatten(1)], 1)
    torch.testing.assert_close(pool(x), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pool(x[:1]), want[:1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape,grid", [((40, 16, 32, 32), 4), ((40, 8, 16, 16), 4), ((40, 32, 8, 8), 4),
                                        ((20, 4, 14, 14), 2)])
def test_every_pooling_plan_gives_the_same_bits_whatever_the_batch(shape: tuple[int, ...], grid: int) -> None:
    """A plan chosen by a clock cannot change a value: every plan pools to the same bits, and a
    sample's pooled values do not depend on the batch it came in (batch 1, odd sizes, the whole)."""
    from pteenet.exits.branches import POOL_PLANS, GridPool, pool_plan

    pool = GridPool(grid, shape[2:])
    x = torch.randn(*shape) * 3 + 1
    with pool_plan("pool2d"):
        want = pool(x)
    for plan in POOL_PLANS:
        with pool_plan(plan):
            assert torch.equal(pool(x), want), plan
            for size in (1, 3, 17):
                parts = torch.cat([pool(x[i:i + size]) for i in range(0, shape[0], size)])
                assert torch.equal(parts, want), (plan, size)
    assert torch.equal(torch.cat([pool(x[i:i + 1]) for i in range(shape[0])]), want)  # as timed, batch 1
