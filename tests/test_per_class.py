"""Per-class thresholds (``sweep-threshold --per-class``): the family is monotone and falls back to
the exit's threshold for rare classes; the certified choice keeps its promise on synthetic caches; the
runtime (eager at batch 1 and larger, staged programs) sends each sample where the simulation does;
the CLI writes a checkpoint that keeps the table."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

import pteenet
from helpers import HAS_ORT, SYNTH_COST, build, cache_of, error_line, make_images, run_cli, staged_runs, synthetic_cache
from pteenet.export.run import ExportConfig, export_model
from pteenet.sweep import Point, backbone_point, per_class

SAMPLES, DELTA, TARGET = 1000, 0.2, 0.02  # a large delta: fewer draws tell a broken promise from a kept one
GRID_TS = np.round(np.arange(0, 1.0001, 0.01), 4)

DRAWS = 60


def test_family_is_monotone_and_falls_back_for_rare_classes() -> None:
    cache = synthetic_cache(3000, np.random.default_rng(0))
    # Class 9 predicted rarely at exit 0: drop most of its samples there.
    rare = np.flatnonzero(cache.preds[0] == 9)[20:]
    cache.preds[0, rare] = 8
    for policy in ("max-softmax", "entropy"):
        fam = per_class.fit(cache, policy)
        assert per_class.monotone(fam)
        assert fam.table.shape == (per_class.LEVELS.size, 3, 10)
        assert (0, 9) in fam.fallback and all(k == 0 for k, _ in fam.fallback)
        pooled = per_class.fit(cache.take(np.arange(3000)), policy, min_samples=10 ** 9).table[:, 0, 0]
        np.testing.assert_array_equal(fam.table[:, 0, 9], pooled)  # the exit's own threshold at each level
        # Conservative to aggressive: the share of samples that leave never falls along the levels.
        left = [(per_class.exit_indices(cache, policy, t) < 3).mean() for t in fam.table]
        assert all(b >= a for a, b in zip(left, left[1:])) and left[-1] > left[0]
    broken = per_class.ClassFamily("max-softmax", np.array([0.0, 0.1]), np.array([[[0.5]], [[0.6]]], np.float32), [])
    assert not per_class.monotone(broken)  # the check can fail


def test_certified_per_class_keeps_the_promise() -> None:
    pop, rng = synthetic_cache(100_000, np.random.default_rng(123)), np.random.default_rng(11)
    over = none = 0
    for _ in range(DRAWS):
        c, fam = per_class.certify_per_class(synthetic_cache(SAMPLES, rng), ["max-softmax"], GRID_TS, 100 * TARGET, 1 - DELTA)
        if c.point is None:
            none += 1
            continue
        assert c.point.kind == "per-class" and per_class.chosen_level(fam, c.point) is not None
        table = np.asarray(c.point.class_thresholds)
        over += backbone_point(pop).metric - per_class.evaluate(pop, "max-softmax", table).metric > TARGET
    assert none <= DRAWS // 10
    assert over / DRAWS <= DELTA + 2 * math.sqrt(DELTA * (1 - DELTA) / DRAWS), over


def test_runtime_and_staged_programs_match_the_simulation(tmp_path: Path) -> None:
    model = build("pool", cascade=False, ensemble=False, exits=3)
    x = make_images(64, seed=2)
    cache = cache_of(model, x)
    # Each (exit, class) threshold halfway between the two middle scores of the samples the exit
    # predicts as that class (no score within reach of a rounding step); 1.5 (never) for the rest.
    table = np.full((3, 10), 1.5, np.float32)
    s = cache.scores["max-softmax"]
    for k in range(3):
        for c in range(10):
            v = np.sort(s[k, cache.preds[k] == c].astype(np.float64))
            if v.size >= 2:
                table[k, c] = (v[v.size // 2 - 1] + v[v.size // 2]) / 2
    want = per_class.exit_indices(cache, "max-softmax", table)
    assert len(set(want.tolist())) >= 3
    point = per_class.evaluate(cache, "max-softmax", table)
    model.set_thresholds(point.thresholds, "max-softmax", point.class_thresholds)
    for bs in (1, 5, 64):
        got = torch.cat([model.predict(x[i:i + bs]).exit_index for i in range(0, 64, bs)]).numpy()
        np.testing.assert_array_equal(got, want, err_msg=f"batch {bs}")
    # An explicit threshold replaces the table for that call.
    assert model.predict(x, 1.5).exit_index.eq(3).all()
    formats = ("staged-torch-export", "staged-onnx") if HAS_ORT else ("staged-torch-export",)
    export_model(model, ExportConfig(output=tmp_path / "o", formats=formats))
    runs = [staged for _, staged in staged_runs(tmp_path / "o")]
    for staged in runs:
        for bs in (1, 64):
            got = np.concatenate([staged.run(x[i:i + bs].numpy())[1] for i in range(0, 64, bs)])
            np.testing.assert_array_equal(got, want)
        assert (staged.run(x.numpy(), [1.5] * 3)[1] == 3).all()
    pteenet.save_checkpoint(tmp_path / "m.safetensors", model)
    back = pteenet.load(tmp_path / "m.safetensors")
    assert back.class_thresholds == model.class_thresholds
    np.testing.assert_array_equal(back.predict(x).exit_index.numpy(), want)


def test_points_of_older_sweeps_have_no_table() -> None:
    d = {"threshold": 0.5, "accuracy": 0.9, "agreement": 0.9, "cost": 0.5, "cost_paper": 0.5,
         "exit_fractions": [0.5, 0, 0, 0.5], "policy": "max-softmax", "kind": "global"}
    p = Point.from_dict(d, 3)
    assert p.class_thresholds is None and p.to_dict() == d


def test_cli_per_class(trained: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "m.safetensors"
    code, stdout, stderr = run_cli("sweep-threshold", trained, "-o", tmp_path / "o", "--per-class", "--policy", "max-softmax", "--cost", "macs",
                                "--max-drop", 30, "--write", ckpt, "--json")
    assert code == 0, stderr
    doc = json.loads(stdout)
    pc = doc["guarantee"]["per_class"]
    assert pc["policy"] == "max-softmax" and pc["level"] is not None
    assert doc["chosen"]["kind"] == "per-class" and "test" in doc["chosen"]
    if pc["fallback"]:  # the tiny split has rare classes: the report names them
        assert "per-class:" in stderr and pc["fallback"] and doc["warnings"]
    model = pteenet.load(str(ckpt))
    assert model.class_thresholds == doc["chosen"]["class_thresholds"]
    for args, needle in ((["--per-class"], "--max-drop"), (["--per-class", "--max-drop", 1, "--no-guarantee"], "--max-drop"),
                         (["--per-class", "--policy", "patience", "--max-drop", 1], "per-class")):
        code, stdout, stderr = run_cli("sweep-threshold", trained, "-o", tmp_path / "x", *args)
        assert code == 1 and needle in error_line(stderr)


def test_costs_priced_with_exit_selection() -> None:
    """With a cost table the structure part chooses exits; the family then fits only those."""
    c, fam = per_class.certify_per_class(synthetic_cache(2000, np.random.default_rng(5)), ["max-softmax"], GRID_TS, 5.0, 0.9,
                                         cost=SYNTH_COST, chained=True)
    assert c.active is not None and len(c.active) == 3
    off = [k for k, a in enumerate(c.active) if not a]
    assert all(k not in off for k, _ in fam.fallback)
