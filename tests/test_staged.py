"""Staged programs (``export --format staged-onnx / staged-torch-export``): a model with an exit after
every block, cascade and ensemble (the default head layout) gives the same exits and logits as
eager in torch.export and ONNX Runtime, at batch 1 and at a larger batch, and exit selection drops
the pieces of exits that are not computed."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import pteenet
from helpers import HAS_ORT, TIE_GAP, assert_logits_close, cache_of, make_images, perturb, staged_driver, staged_runs
from pteenet.exits.chain import Ensemble
from pteenet.export.run import ExportConfig, export_model
from pteenet.export.staged import plan, torch_runner


def many_exit_model(seed: int = 0, chained: bool = True) -> pteenet.EarlyExitModel:
    """cifar-resnet20 at 16x16 with an exit after each of its 9 blocks, pool-mlp, cascade and an
    ensemble (``chained``; else neither)."""
    torch.manual_seed(seed)
    model = pteenet.attach(pteenet.AttachConfig(backbone="cifar-resnet20", input_size=(3, 16, 16), exits="all",
                                                cascade=chained))
    perturb(model, seed)
    if not chained:
        return model.eval()
    ens = Ensemble(model.num_exits, model.info.num_classes)
    with torch.no_grad():
        ens.raw.normal_(0, 1, generator=torch.Generator().manual_seed(seed))
    model.set_ensemble(ens)
    return model.eval()


def settings(model: pteenet.EarlyExitModel, x: torch.Tensor) -> list[list[float]]:
    """Two per-exit max-softmax settings that send the samples to several exits, each threshold in
    the middle of a gap between scores near a quantile (no score within TIE_GAP: another runtime's
    rounding cannot move a sample across it); an exit without such a gap never lets one leave."""
    s = cache_of(model, x).scores["max-softmax"].astype(np.float64)
    out = []
    for q in (0.8, 0.93):
        ts = []
        for k in range(model.num_exits):
            v = np.sort(s[k])
            gaps = np.flatnonzero(np.diff(v) > 2 * TIE_GAP + 1e-6)
            i = gaps[np.argmin(np.abs(gaps - q * (len(v) - 1)))] if gaps.size else None
            ts.append(1.5 if i is None else float((v[i] + v[i + 1]) / 2))
        out.append(ts)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[pteenet.EarlyExitModel, Path]:
    model = many_exit_model()
    model.set_thresholds(0.9, "max-softmax")
    folder = tmp_path_factory.mktemp("staged") / "out"
    formats = ("staged-torch-export", "staged-onnx") if HAS_ORT else ("staged-torch-export",)
    export_model(model, ExportConfig(output=folder, formats=formats))
    return model, folder


def test_staged_programs_equal_eager_at_batch_1_and_16(exported: tuple[pteenet.EarlyExitModel, Path]) -> None:
    model, folder = exported
    assert model.num_exits == 9 and model.chained
    x = make_images(16, seed=5)
    seen: set[int] = set()
    for name, staged in staged_runs(folder):
        assert len(staged.pieces) == model.num_exits + 1
        for ts in settings(model, x):
            for batch in (x, x[:1], x[7:8], x[11:12]):
                want = model.predict(batch, ts, "max-softmax")
                logits, exit_index = staged.run(batch.numpy(), ts)
                assert exit_index.tolist() == want.exit_index.tolist(), name
                assert_logits_close(torch.from_numpy(logits), want.logits, rel=1e-3)  # another runtime's kernels
                seen.update(exit_index.tolist())
    assert len(seen) >= 3, seen  # the settings really exercise several exits, and compaction


def test_the_recorded_thresholds_are_the_default(exported: tuple[pteenet.EarlyExitModel, Path]) -> None:
    model, folder = exported
    x = make_images(8, seed=6)
    for _, staged in staged_runs(folder):
        assert staged.thresholds == model.thresholds and staged.policy == "max-softmax"
        assert staged.run(x.numpy())[1].tolist() == model.predict(x).exit_index.tolist()


@pytest.mark.parametrize("chained", [True, False])
def test_exit_selection_drops_pieces(tmp_path: Path, chained: bool) -> None:
    model = many_exit_model(seed=1, chained=chained)
    model.set_active([k in (2, 5, 6) for k in range(9)])
    # One piece per deciding exit (2, 5, 6), then the end; chained: exits 0..6 are computed (later
    # ones read them) inside those pieces; 7 and 8 never are.
    want = [(0, 2, (0, 1, 2)), (3, 5, (3, 4, 5)), (6, 6, (6,))] if chained else [(0, 2, (2,)), (3, 5, (5,)), (6, 6, (6,))]
    assert [(s.first, s.last, s.heads) for s in plan(model)] == [*want, (7, 9, ())]
    x = make_images(16, seed=7)
    model.set_thresholds(settings(model, x)[0], "max-softmax")
    export_model(model, ExportConfig(output=tmp_path / "o", formats=("staged-torch-export",)))
    staged = staged_driver(tmp_path / "o" / "staged_pt2").StagedModel(tmp_path / "o" / "staged_pt2", torch_runner)
    assert len(staged.pieces) == 4
    seen: set[int] = set()
    for batch in (x, x[:1], x[4:5], x[9:10]):
        want_pred = model.predict(batch)
        logits, exit_index = staged.run(batch.numpy())
        assert exit_index.tolist() == want_pred.exit_index.tolist()
        assert_logits_close(torch.from_numpy(logits), want_pred.logits, rel=1e-3)
        seen.update(exit_index.tolist())
    assert len(seen) >= 2


@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime/onnxscript not installed")
def test_uneven_pooling_windows_export_to_onnx(tmp_path: Path) -> None:
    """A 14x14 input makes 14, 7 and 4-pixel maps: pooled to 4x4 the first two have unequal windows
    (ImageNet's 14x14 and 7x7 taps do too), which ONNX's adaptive pooling cannot express."""
    torch.manual_seed(3)
    model = pteenet.attach(pteenet.AttachConfig(backbone="cifar-resnet20", input_size=(3, 14, 14), exits="all"))
    perturb(model, 3)
    model.eval()
    assert any(b.windows is None and not b.whole for b in model.modules() if hasattr(b, "bins"))
    x = torch.randn(8, 3, 14, 14, generator=torch.Generator().manual_seed(9))
    model.set_thresholds(settings(model, x)[0], "max-softmax")
    export_model(model, ExportConfig(output=tmp_path / "o", formats=("staged-onnx",)))
    staged = staged_driver(tmp_path / "o" / "staged_onnx").StagedModel(tmp_path / "o" / "staged_onnx")
    for batch in (x, x[:1], x[5:6]):
        want = model.predict(batch)
        logits, exit_index = staged.run(batch.numpy())
        assert exit_index.tolist() == want.exit_index.tolist()
        assert_logits_close(torch.from_numpy(logits), want.logits, rel=1e-3)
