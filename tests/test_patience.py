"""Patience (PABEE): a sample leaves once T deciding exits in a row predict the same class. The
runtime carries (last class, run length) from exit to exit; the sweep derives the same scores from
the exit cache's predictions. Both must send every sample to the same exit: eager at batch 1 and
larger batches, with exit selection, and the staged programs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import pteenet
from helpers import HAS_ORT, assert_logits_close, build, cache_of, make_images, staged_runs
from pteenet.errors import PteenetError
from pteenet.evaluation.engine import exit_indices
from pteenet.exits import policies as pol
from pteenet.export.run import ExportConfig, export_model
from pteenet.sweep import ExitCache, certify, evaluate, restrict, sweep_global


@pytest.fixture(scope="module")
def model() -> pteenet.EarlyExitModel:
    # Cascade and ensemble: consecutive exits agree often, so every run length occurs.
    return build("pool", cascade=True, ensemble=True, exits=4)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return make_images(48)


def test_run_lengths_from_predictions() -> None:
    preds = np.array([[1, 2, 3], [1, 2, 4], [1, 5, 4], [1, 5, 4]])
    np.testing.assert_array_equal(pol.chain_scores(preds)["patience"], [[1, 1, 1], [2, 2, 1], [3, 1, 2], [4, 2, 3]])
    # Only deciding exits count: with exit 2 off, exit 3 follows exit 1.
    runs = pol.chain_scores(preds, [True, True, False, True])["patience"]
    assert np.isnan(runs[2]).all()
    np.testing.assert_array_equal(runs[[0, 1, 3]], [[1, 1, 1], [2, 2, 1], [3, 1, 2]])


def _check_runtime(model: pteenet.EarlyExitModel, images: torch.Tensor, cache: ExitCache,
                   settings: list[list[float]]) -> set[int]:
    with torch.no_grad():
        a = model.forward_all(images)
    per_exit = torch.stack(a.exit_logits + [a.final_logits])
    seen: set[int] = set()
    for ts in settings:
        want = exit_indices(cache, "patience", ts)
        seen.update(want.tolist())
        for bs in (1, 5, len(images)):
            got = [model.predict(images[i:i + bs], ts, "patience") for i in range(0, len(images), bs)]
            np.testing.assert_array_equal(torch.cat([g.exit_index for g in got]).numpy(), want, err_msg=f"T={ts} batch {bs}")
            assert_logits_close(torch.cat([g.logits for g in got]), per_exit[want, np.arange(len(want))])
    return seen


def test_runtime_matches_simulation(model: pteenet.EarlyExitModel, images: torch.Tensor) -> None:
    cache = cache_of(model, images)
    settings = [[t] * 4 for t in (1.0, 2.0, 3.0, 4.0, 5.0)] + [[3.0, 2.0, 2.0, 4.0], [5.0, 3.0, 1.0, 2.0]]
    assert _check_runtime(model, images, cache, settings) == {0, 1, 2, 3, 4}
    # Every sample takes exit 0 at T = 1 and no exit at T = E + 1 (the policy's own grid ends there).
    assert pol.grid_for("patience", np.linspace(0, 1, 5), 4).tolist() == [1, 2, 3, 4, 5]
    fr = [p.exit_fractions for p in sweep_global(cache, "patience", np.array([1.0, 5.0]))]
    assert fr[0][0] == 1.0 and fr[1][-1] == 1.0


def test_exit_selection_counts_only_deciding_exits(model: pteenet.EarlyExitModel, images: torch.Tensor) -> None:
    active = [True, False, True, True]
    model.set_active(active)
    try:
        cache = restrict(cache_of(model, images), active, model.cost, model.chained)
        seen = _check_runtime(model, images, cache, [[t] * 4 for t in (2.0, 3.0)])
        assert 1 not in seen and len(seen) >= 2
    finally:
        model.set_active([True] * 4)


def test_certified_patience(model: pteenet.EarlyExitModel, images: torch.Tensor) -> None:
    """The fixed sequence runs from the most patient (T = E + 1: nobody leaves) down."""
    cache = cache_of(model, torch.cat([images, make_images(200, seed=3)]))
    c = certify(cache, ["patience"], np.linspace(0, 1, 101), 20.0, 0.9)
    assert [ts[0] for p, _ in c.tested for ts in [p.thresholds]][:2] == [5.0, 4.0]
    assert c.point is not None and c.point.policy == "patience"


def test_old_cache_gains_patience(model: pteenet.EarlyExitModel, images: torch.Tensor, tmp_path: Path) -> None:
    """A cache saved before patience existed has no patience scores; loading derives them."""
    cache = cache_of(model, images)
    old = ExitCache(cache.preds, {k: v for k, v in cache.scores.items() if k != "patience"}, None, cache.costs,
                    cache.costs_paper)
    np.testing.assert_array_equal(old.scores["patience"], cache.scores["patience"])
    cache.save(tmp_path / "c.npz")
    assert evaluate(ExitCache.load(tmp_path / "c.npz"), "patience", 2.0).exit_fractions == \
        evaluate(cache, "patience", 2.0).exit_fractions


def test_staged_programs_carry_the_run(model: pteenet.EarlyExitModel, images: torch.Tensor, tmp_path: Path) -> None:
    model.set_thresholds([3.0, 2.0, 2.0, 3.0], "patience")
    model.set_active([True, False, True, True])
    try:
        formats = ("staged-torch-export", "staged-onnx") if HAS_ORT else ("staged-torch-export",)
        export_model(model, ExportConfig(output=tmp_path / "o", formats=formats))
        runs = [staged for _, staged in staged_runs(tmp_path / "o")]
        for staged in runs:
            assert [p["inputs"][-3:] for p in staged.pieces[1:3]] == [["last", "run", "threshold"]] * 2
            for batch in (images, images[:1], images[7:8], images[20:21]):
                _, exit_index = staged.run(batch.numpy())
                assert exit_index.tolist() == model.predict(batch).exit_index.tolist()
        with pytest.raises(PteenetError, match="staged-onnx"):
            export_model(model, ExportConfig(output=tmp_path / "p", formats=("torch-export",)))
    finally:
        model.set_active([True] * 4)
        model.set_thresholds(0.5, "confidence")


def test_patience_checkpoint_round_trip(model: pteenet.EarlyExitModel, images: torch.Tensor, tmp_path: Path) -> None:
    model.set_thresholds(2.0, "patience")
    try:
        pteenet.save_checkpoint(tmp_path / "m.safetensors", model)
        back = pteenet.load(tmp_path / "m.safetensors")
        assert back.policy == "patience"
        assert back.predict(images).exit_index.tolist() == model.predict(images).exit_index.tolist()
    finally:
        model.set_thresholds(0.5, "confidence")
