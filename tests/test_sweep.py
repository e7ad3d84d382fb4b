"""Sweep engine on synthetic caches: cached evaluation vs a brute-force per-sample loop, search,
selection, parsing, persistence and report files. No models needed."""
from __future__ import annotations

import csv
import importlib.util
import json
import time

import numpy as np
import pytest
import torch

from pteenet.cli.sweep_cmd import print_points
from pteenet.errors import PteenetError
from pteenet.exits import policies as pol
from pteenet.sweep import (
    ExitCache,
    ExitCacheBuilder,
    backbone_point,
    build_document,
    cost_axis_label,
    curve_figure,
    evaluate,
    oracle_point,
    pareto,
    parse_range,
    search_per_exit,
    select,
    sweep_global,
    write_sweep_outputs,
)


def make_cache(e: int = 4, n: int = 400, k: int = 5, labels: bool = True, seed: int = 0,
               quantised: bool = True) -> ExitCache:
    rng = np.random.default_rng(seed)
    preds = rng.integers(0, k, (e + 1, n)).astype(np.int32)
    y = rng.integers(0, k, n)
    # Make exits and the backbone somewhat right so accuracies are not all ~1/k.
    preds[-1] = np.where(rng.random(n) < 0.7, y, preds[-1])
    for j in range(e):
        preds[j] = np.where(rng.random(n) < 0.3 + 0.1 * j, y, preds[j])
    # Scores on a 1/8 grid (exact in float32) so ties with the thresholds are exercised.
    draw = (lambda: rng.integers(0, 9, (e, n)) / 8) if quantised else (lambda: rng.random((e, n)))
    scores = {p: draw().astype(np.float32) for p in pol.POLICIES}
    branch = rng.uniform(0.01, 0.05, e)
    prefix = np.sort(rng.uniform(0.1, 0.9, e))
    costs = np.append(prefix + np.cumsum(branch), 1 + branch.sum())
    paper = np.append(prefix + branch, 1.0)
    return ExitCache(preds, scores, y if labels else None, costs, paper)


def brute_force(cache: ExitCache, policy: str, ts: list[float]) -> tuple:
    """Per-sample Python loop: leave at the first exit whose score passes."""
    e, n = cache.num_exits, cache.num_samples
    exits, right, agree = [], 0, 0
    for i in range(n):
        k = next((j for j in range(e) if pol.passes(policy, cache.scores[policy][j, i], ts[j])), e)
        exits.append(k)
        right += cache.labels is not None and cache.preds[k, i] == cache.labels[i]
        agree += cache.preds[k, i] == cache.preds[e, i]
    counts = np.bincount(exits, minlength=e + 1)
    return (right / n if cache.labels is not None else None, agree / n,
            float(np.mean(cache.costs[exits])), float(np.mean(cache.costs_paper[exits])),
            (counts / n).tolist())


@pytest.mark.parametrize("policy", pol.POLICIES)
@pytest.mark.parametrize("labels", [True, False])
def test_evaluate_matches_brute_force(policy: str, labels: bool) -> None:
    cache = make_cache(labels=labels)
    settings: list = [0.0, 0.25, 0.5, 0.625, 0.9, 1.0, [0.5, 0.875, 0.125, 1.0],
                      [0.0, 0.3, 0.75, 0.5]]
    for t in settings:
        ts = [t] * cache.num_exits if np.ndim(t) == 0 else t
        p = evaluate(cache, policy, t)
        acc, agr, cost, cost_paper, fr = brute_force(cache, policy, ts)
        assert p.accuracy == pytest.approx(acc) if labels else p.accuracy is None
        assert p.agreement == pytest.approx(agr)
        assert p.cost == pytest.approx(cost) and p.cost_paper == pytest.approx(cost_paper)
        assert p.exit_fractions == pytest.approx(fr)
        d = p.to_dict()
        assert d["policy"] == policy and d["threshold"] == t


def test_threshold_above_everything_runs_to_the_end() -> None:
    cache = make_cache()
    p = evaluate(cache, "confidence", 1.0)  # h > 1 never holds
    assert p.cost == pytest.approx(cache.costs[-1])
    assert p.cost_paper == pytest.approx(1.0)
    assert p.exit_fractions[-1] == 1.0
    assert p.accuracy == backbone_point(cache).accuracy
    assert p.agreement == 1.0


@pytest.mark.parametrize("policy", pol.POLICIES)
@pytest.mark.parametrize("quantised", [True, False])
def test_sweep_global_equals_evaluate(policy: str, quantised: bool) -> None:
    cache = make_cache(n=300, quantised=quantised, seed=3)
    ts = np.linspace(0.0, 1.0, 1000)
    ts[:9] = np.arange(9) / 8  # exact ties with the quantised scores
    points = sweep_global(cache, policy, ts)
    assert len(points) == 1000
    for t, p in zip(ts, points):
        assert p == evaluate(cache, policy, float(t))


def test_sweep_global_without_labels_and_nan_scores() -> None:
    cache = make_cache(labels=False, quantised=False)
    cache.scores["entropy"][1, :50] = np.nan  # a NaN score never passes, in both paths
    cache.scores["confidence"][0, 50:90] = np.nan
    for policy in ("entropy", "confidence"):
        for t, p in zip(np.linspace(0, 1, 21), sweep_global(cache, policy, np.linspace(0, 1, 21))):
            assert p == evaluate(cache, policy, float(t)) and p.accuracy is None


def test_sweep_global_is_fast() -> None:
    # A guard against an accidental per-threshold Python loop, not a benchmark (CI machines vary).
    cache = make_cache(e=10, n=50_000, quantised=False)
    start = time.perf_counter()
    sweep_global(cache, "max-softmax", np.linspace(0, 1, 1000))
    assert time.perf_counter() - start < 3.0


@pytest.mark.parametrize("labels", [True, False])
def test_per_exit_never_worse_than_best_global(labels: bool) -> None:
    cache = make_cache(e=5, n=2000, labels=labels, quantised=False, seed=7)
    grid = parse_range("0:1:0.05")
    for policy in pol.POLICIES:
        glob = sweep_global(cache, policy, grid)
        budgets = [0.5, 0.7, 0.9, 1.2]
        for budget, p in zip(budgets, search_per_exit(cache, policy, budgets, grid)):
            best = max(q.metric for q in glob if q.cost <= budget + 1e-9)
            assert p.kind == "per-exit" and len(p.thresholds) == cache.num_exits
            assert p.cost <= budget + 1e-9
            assert p.metric >= best
            assert p == evaluate(cache, policy, p.thresholds)


def test_per_exit_budget_below_cheapest() -> None:
    cache = make_cache()
    with pytest.raises(PteenetError, match="cheapest reachable cost"):
        search_per_exit(cache, "confidence", [0.01], parse_range("0:1:0.1"))


@pytest.mark.parametrize("labels", [True, False])
def test_oracle_and_backbone(labels: bool) -> None:
    cache = make_cache(labels=labels)
    bb, orc = backbone_point(cache), oracle_point(cache)
    assert bb.cost == 1.0 and bb.agreement == 1.0 and bb.exit_fractions[-1] == 1.0
    assert orc.metric >= bb.metric
    if not labels:
        assert orc.agreement == 1.0 and orc.accuracy is None
    assert sum(orc.exit_fractions) == pytest.approx(1.0)
    # No threshold setting of these branches gets more samples right than the oracle.
    for t in (0.0, 0.5, 1.0):
        assert evaluate(cache, "max-softmax", t).metric <= orc.metric + 1e-12


def test_select_and_pareto() -> None:
    cache = make_cache(n=1000, quantised=False)
    points = sweep_global(cache, "confidence", parse_range("0:1:0.01"))
    bb = backbone_point(cache)
    chosen = select(points, bb, budget=0.6)
    assert chosen is not None and chosen.cost <= 0.6
    assert chosen.metric == max(p.metric for p in points if p.cost <= 0.6)
    cheapest = min(p.cost for p in points)
    with pytest.raises(PteenetError, match="cheapest reachable") as err:
        select(points, bb, budget=cheapest / 2)
    assert err.value.hint and "at least" in err.value.hint
    loose = select(points, bb, max_drop=100.0)  # anything goes: the cheapest point
    assert loose is not None and loose.cost == cheapest
    drop = select(points, bb, max_drop=2.0)
    assert drop is not None  # the high thresholds stay within 2 points of the backbone
    assert drop.metric >= bb.metric - 0.02 - 1e-12
    assert drop.cost == min(p.cost for p in points if p.metric >= bb.metric - 0.02 - 1e-12)
    assert select([p for p in points if p.metric < bb.metric - 0.5], bb, max_drop=0.0) is None
    with pytest.raises(PteenetError):
        select(points, bb, budget=0.5, max_drop=1.0)
    with pytest.raises(PteenetError):
        select(points, bb, max_drop=-1.0)
    front = pareto(points)
    assert [p.cost for p in front] == sorted(p.cost for p in front)
    assert all(a.metric < b.metric for a, b in zip(front, front[1:]))
    for p in points:  # every point is dominated by (or is) a front point
        assert any(f.cost <= p.cost and f.metric >= p.metric for f in front)


def test_parse_range() -> None:
    r = parse_range("0:1:0.01")
    assert len(r) == 101 and r[0] == 0.0 and r[-1] == 1.0 and r[30] == 0.3
    assert parse_range("0.2:0.5:0.1").tolist() == [0.2, 0.3, 0.4, 0.5]
    assert parse_range("0:0.95:0.2").tolist() == [0.0, 0.2, 0.4, 0.6, 0.8]
    assert parse_range("0.5").tolist() == [0.5]
    for bad in ("", "a:b:c", "0:1", "0:1:0", "0:1:-0.1", "1:0:0.1", "0:2:0.5", "-0.1:1:0.1",
                "0:1:nan", "0:1:0.1:3"):
        with pytest.raises(PteenetError):
            parse_range(bad)


@pytest.mark.parametrize("labels", [True, False])
def test_cache_round_trip(tmp_path, labels: bool) -> None:
    cache = make_cache(labels=labels, quantised=False)
    path = tmp_path / "cache.npz"
    cache.save(path)
    back = ExitCache.load(path)
    assert np.array_equal(back.preds, cache.preds) and back.preds.dtype == np.int32
    assert (back.labels is None) == (not labels)
    if labels:
        assert np.array_equal(back.labels, cache.labels)
    assert set(back.scores) == set(cache.scores)
    for p in cache.scores:
        assert np.array_equal(back.scores[p], cache.scores[p])
    assert np.array_equal(back.costs, cache.costs)
    assert np.array_equal(back.costs_paper, cache.costs_paper)
    assert not [f for f in tmp_path.iterdir() if f.name != "cache.npz"]  # no temp file left
    with pytest.raises(PteenetError):
        ExitCache.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(PteenetError):
        ExitCache.load(tmp_path / "junk.npz")


def test_builder_matches_policies() -> None:
    torch.manual_seed(0)
    builder = ExitCacheBuilder()
    batches = []
    for b in (7, 5):
        logits = [torch.randn(b, 10) for _ in range(3)]
        conf = [torch.randn(b) for _ in range(3)]
        final, y = torch.randn(b, 10), torch.randint(0, 10, (b,))
        builder.add(logits, conf, final, y)
        batches.append((logits, conf, final, y))
    cache = builder.build([0.3, 0.6, 0.9, 1.1], [0.25, 0.5, 0.8, 1.0])
    assert cache.preds.shape == (4, 12) and cache.labels.tolist() == torch.cat(
        [b[3] for b in batches]).tolist()
    want = torch.cat([torch.stack([pol.scores(lg, c)["entropy"] for lg, c in zip(b[0], b[1])])
                      for b in batches], dim=1).numpy()
    assert np.allclose(cache.scores["entropy"], want)
    assert cache.preds[-1].tolist() == torch.cat([b[2].argmax(1) for b in batches]).tolist()
    with pytest.raises(PteenetError):
        ExitCacheBuilder().build([1.0], [1.0])


@pytest.mark.parametrize("labels", [True, False])
def test_write_sweep_outputs(tmp_path, labels: bool) -> None:
    val, test = make_cache(labels=labels, seed=1), make_cache(labels=labels, seed=2)
    grid = parse_range("0:1:0.125")
    points = [p for policy in pol.POLICIES for p in sweep_global(val, policy, grid)]
    points += search_per_exit(val, "confidence", [0.8], grid)
    chosen = select(points, backbone_point(val), budget=0.8)
    doc = build_document(val, points, chosen, test, budget=0.8)
    assert set(doc) >= {"backbone", "oracle", "points", "chosen"}
    assert doc["backbone"]["agreement"] == 1.0
    assert doc["chosen"]["test"]["policy"] == chosen.policy
    warning = write_sweep_outputs(tmp_path / "out", doc)
    out = tmp_path / "out"
    assert json.loads((out / "sweep.json").read_text()) == json.loads(json.dumps(doc))
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert len(rows) == len(points) and rows[-1]["kind"] == "per-exit"
    assert len(rows[-1]["threshold"].split(";")) == val.num_exits
    if importlib.util.find_spec("matplotlib") is not None:
        assert warning is None
        for name in ("curve.png", "exits.png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert warning and "pteenet[plots]" in warning
    assert not list(out.glob("*.tmp"))
    print_points(points[:3], title="points")  # smoke: renders to stderr


def test_curve_axis_says_what_the_cost_is() -> None:
    # curve.png's x-axis names the sweep's pricing: predicted time at the deploy batch size (eager or
    # ONNX Runtime) or MACs; a sweep.json written before time pricing has no cost_model and was MACs.
    time_b1 = {"cost_model": {"kind": "time", "batch_size": 1, "runtime": "eager"}}
    assert "predicted time at batch 1" in cost_axis_label(time_b1)
    assert "predicted time in ONNX Runtime at batch 256" in cost_axis_label(
        {"cost_model": {"kind": "time", "batch_size": 256, "runtime": "onnxruntime"}})
    assert "MACs" in cost_axis_label({"cost_model": {"kind": "macs"}}) and "MACs" in cost_axis_label({})
    assert "time" not in cost_axis_label({})
    if importlib.util.find_spec("matplotlib") is None:
        return
    from matplotlib.figure import Figure
    val = make_cache(seed=1)
    points = sweep_global(val, "max-softmax", parse_range("0:1:0.25"))
    doc = {**build_document(val, points, None, None), **time_b1}
    assert curve_figure(Figure(), doc).axes[0].get_xlabel() == cost_axis_label(time_b1)
