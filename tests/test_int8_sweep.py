"""``sweep-threshold --quantize int8`` (``sweep/quantized.py``): the cache of the INT8 programs is
what the exported INT8 program decides, drops are measured against the FP32 backbone, and the
sweep's choice travels to ``export --quantize int8``."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import pteenet
from helpers import (
    build,
    cache_of,
    error_line,
    make_images,
    random_thresholds,
    run_cli,
    saved_checkpoint,
    simulated_exits,
)

pytest.importorskip("onnxruntime")
from pteenet.evaluation.engine import exit_indices  # noqa: E402
from pteenet.export import driver  # noqa: E402
from pteenet.export.quantize import quantize_staged  # noqa: E402
from pteenet.export.staged import export_pieces  # noqa: E402
from pteenet.sweep import restrict  # noqa: E402
from pteenet.sweep.guarantee import certify  # noqa: E402
from pteenet.sweep.quantized import int8_exits, quantization_images  # noqa: E402


def _data(x: torch.Tensor, labels: torch.Tensor | None = None) -> TensorDataset:
    return TensorDataset(x, torch.zeros(len(x), dtype=torch.long) if labels is None else labels)


def test_the_int8_program_decides_as_the_sweeps_int8_cache(tmp_path: Path) -> None:
    model = build("pool-mlp", False, False, exits=2, seed=4)
    calibration = _data(make_images(60, seed=4))
    x = make_images(48, seed=9)
    with int8_exits(model, calibration, 8, "test", 1) as (exits, record):
        cache = exits.cache(_data(x), 16, 0)
    images, _ = quantization_images(calibration, 8, "test")
    export_pieces(model, tmp_path / "fp32", onnx=True)
    quantize_staged(model, tmp_path / "fp32", tmp_path / "int8", images, record)
    staged = driver.StagedModel(tmp_path / "int8", driver.onnx_runner(1))
    rng = np.random.default_rng(0)
    for _ in range(4):
        ts = random_thresholds(cache, model.policy, rng)
        logits, where = staged.run(x.numpy(), ts)
        want = simulated_exits(cache, model.policy, ts)
        np.testing.assert_array_equal(where, want)
        np.testing.assert_array_equal(logits.argmax(1), cache.preds[want, np.arange(len(x))])
        one, w1 = staged.run(x[:1].numpy(), ts)  # batch 1 decides the same
        assert w1[0] == want[0]


def test_parts_quantized_before_a_setting_is_chosen_decide_by_that_setting(tmp_path: Path) -> None:
    """The sweep quantizes under the checkpoint's policy; a setting chosen after with another policy
    and fewer exits, exported from those parts, must decide by the chosen policy (the heads compute
    ``leave``), as the cache simulates it, at every threshold."""
    model = build("pool-mlp", False, False, exits=3, seed=4)
    model.set_thresholds([0.5] * 3, "confidence")
    calibration = _data(make_images(60, seed=4))
    x = make_images(48, seed=9)
    active = [True, False, True]
    with int8_exits(model, calibration, 8, "test", 1) as (exits, record):
        cache = exits.cache(_data(x), 16, 0)
        images, _ = quantization_images(calibration, 8, "test")
        assert exits.parts.policy == "confidence"
        rng = np.random.default_rng(1)
        model.set_thresholds(random_thresholds(cache, "max-softmax", rng), "max-softmax")
        model.set_active(active)
        export_pieces(model, tmp_path / "fp32", onnx=True)
        quantize_staged(model, tmp_path / "fp32", tmp_path / "int8", images, record, parts=exits.parts)
    staged = driver.StagedModel(tmp_path / "int8", driver.onnx_runner(1))
    view = restrict(cache, active, model.cost, False)  # the inactive exit never decides
    spread = set()
    for _ in range(4):
        ts = random_thresholds(cache, "max-softmax", rng)
        logits, where = staged.run(x.numpy(), ts)
        want = exit_indices(view, "max-softmax", ts)
        spread |= set(want.tolist())
        np.testing.assert_array_equal(where, want)
        np.testing.assert_array_equal(logits.argmax(1), cache.preds[want, np.arange(len(x))])
    assert len(spread) > 1  # the thresholds sent samples to different exits


def test_the_drop_certified_on_int8_outputs_is_not_the_fp32_one() -> None:
    """INT8 programs quantized on two images move the exits' scores across thresholds: the same
    fixed sequence certified on the INT8 cache counts other errors than on the FP32 one."""
    model = build("pool-mlp", False, False, exits=2, seed=4)
    x = make_images(300, seed=5)
    fp32 = cache_of(model, x)
    fp32.labels = (np.arange(300) % 10).astype(np.int64)
    with int8_exits(model, _data(make_images(40, seed=6)), 2, "test", 1) as (exits, _):
        int8 = exits.cache(_data(x, torch.from_numpy(fp32.labels)), 64, 0)
    assert np.array_equal(int8.backbone_preds, fp32.preds[-1])  # measured against the FP32 backbone
    grid = np.linspace(0, 1, 21)
    flips = [int((exit_indices(fp32, "confidence", t) != exit_indices(int8, "confidence", t)).sum()) for t in grid]
    assert max(flips) > 0  # quantization changed where samples leave
    # 5 points: a target at which the fixed sequence stops inside the grid (at 20 both certify every
    # threshold and end at the same point, whatever the counts)
    a = certify(fp32, ["confidence"], grid, 5.0, 0.9, split=True)
    b = certify(int8, ["confidence"], grid, 5.0, 0.9, split=True)
    assert [c for _, c in a.tested] != [c for _, c in b.tested]
    assert a.guarantee.to_dict() != b.guarantee.to_dict()


def test_sweep_cli_int8_json_then_export_reuses_its_quantization(tmp_path: Path) -> None:
    model, ckpt = saved_checkpoint(tmp_path, val_split=0.5, limit=200)
    tuned = tmp_path / "tuned.safetensors"
    code, stdout, stderr = run_cli("sweep-threshold", ckpt, "-o", tmp_path / "sw", "--thresholds", "0:1:0.1", "--max-drop", 100,
                                   "--policy", "confidence", "--deploy-runtime", "onnxruntime", "--quantize", "int8",
                                   "--quant-images", 12, "--write", tuned, "--json")
    assert code == 0, stderr
    doc = json.loads(stdout)
    cm = doc["cost_model"]
    assert cm["precision"] == "int8" and cm["quantization"]["images"] == 12 and cm["profile"]["machine"]["precision"] == "int8"
    assert "in ONNX Runtime, INT8" in cm["note"] and doc["guarantee"]["structure_samples"] > 0
    code, stdout, stderr = run_cli("export", tuned, "-o", tmp_path / "out", "--format", "staged-onnx", "--quantize", "int8", "--json")
    assert code == 0, stderr
    assert "does not cover" not in stderr
    manifest = json.loads((tmp_path / "out" / "staged_onnx_int8" / driver.MANIFEST).read_text())
    assert manifest["quantization"]["images"] == 12


@pytest.mark.parametrize("args, message", [
    (["--quantize", "int8"], "add --deploy-runtime onnxruntime"),
    (["--quantize", "int4", "--deploy-runtime", "onnxruntime"], "quantize"),
])
def test_sweep_cli_int8_bad_inputs(tmp_path: Path, args: list[str], message: str) -> None:
    path = tmp_path / "m.safetensors"
    pteenet.save_checkpoint(path, build("pool-mlp", False, False, exits=2))
    code, _, stderr = run_cli("sweep-threshold", path, "-o", tmp_path / "sw", "--max-drop", 1, *args)
    assert code == 1 and message in error_line(stderr)
