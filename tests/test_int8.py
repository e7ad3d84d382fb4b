"""INT8 early exit (``export --quantize int8``, ``runtime/ort_quant.py``): the INT8 program against
the INT8 backbone beside it, the report's numbers, and each bad input's one error line.

One INT8 export runs once per module (each stage and head is quantized by ONNX Runtime: seconds)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pteenet
from helpers import error_line, make_images, run_cli, saved_checkpoint

pytest.importorskip("onnxruntime")
from pteenet.export import driver  # noqa: E402
from pteenet.export.quantize import INT8_BACKBONE, INT8_FOLDER, never_leave  # noqa: E402
from pteenet.runtime.onnx import ort_session  # noqa: E402
from pteenet.runtime.ort_quant import cpu_int8_instructions  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_checkpoint(tmp_path_factory.mktemp("int8"), exits=3, val_split=0.5, limit=120)[1]


@pytest.fixture(scope="module")
def out(ckpt: Path) -> tuple[Path, dict[str, Any]]:
    folder = ckpt.parent / "out"
    code, stdout, stderr = run_cli("export", ckpt, "-o", folder, "--format", "staged-onnx", "--quantize", "int8",
                                   "--quant-images", 16, "--threshold", 0.6, "--json")
    assert code == 0, stderr
    assert "does not cover it" in stderr  # thresholds not chosen on the INT8 program: said so
    return folder, json.loads(stdout)


def test_never_leaving_the_int8_program_gives_exactly_the_int8_backbone(out: tuple[Path, dict[str, Any]]) -> None:
    folder, _ = out
    model = pteenet.load(str(folder / "model.safetensors"))
    x = make_images(40, seed=9).numpy()
    staged = driver.StagedModel(folder / INT8_FOLDER, driver.onnx_runner(1))
    logits, exits = staged.run(x, never_leave(model))
    backbone = ort_session(str(folder / INT8_BACKBONE), 1).run(None, {"x": x})[0]
    assert (exits == model.num_exits).all()
    np.testing.assert_array_equal(logits, backbone)
    one, _ = staged.run(x[:1], never_leave(model))  # batch 1 too
    np.testing.assert_array_equal(one, backbone[:1])
    with pytest.raises(AssertionError):  # quantized: not the FP32 backbone's logits
        np.testing.assert_array_equal(backbone, model.backbone(__import__("torch").from_numpy(x)).detach().numpy())


def test_the_int8_program_is_quantized_keeps_a_bool_decision_and_says_how(out: tuple[Path, dict[str, Any]]) -> None:
    import onnx

    folder, doc = out
    manifest = json.loads((folder / INT8_FOLDER / driver.MANIFEST).read_text())
    assert manifest["precision"] == "int8" and manifest["quantization"]["images"] == 16
    for piece in manifest["pieces"]:
        g = onnx.load(str(folder / INT8_FOLDER / piece["file"])).graph
        ops = {n.op_type for n in g.node}
        assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
        types = {o.name: o.type.tensor_type.elem_type for o in g.output}
        assert types.get("leave", onnx.TensorProto.BOOL) == onnx.TensorProto.BOOL
    ev = doc["int8"]["evaluation"]
    assert ev["images"] > 0 and ev["int8_backbone"]["fraction"] == 1.0
    assert sum(d["samples"] for d in ev["per_exit"]) == ev["images"]
    assert 0 <= ev["int8_early_exit"]["agreement_with_fp32_backbone"] <= 1
    report = (folder / "report.md").read_text()
    assert "## INT8 program" in report and "agreement with FP32 backbone" in report


def test_cpu_int8_instructions_come_from_the_flags() -> None:
    assert cpu_int8_instructions("flags\t: fpu sse avx512_vnni amx_int8\n") == "AMX + AVX-512 VNNI"
    assert cpu_int8_instructions("flags\t: fpu avx_vnni\n") == "AVX-VNNI"
    assert cpu_int8_instructions("flags\t: fpu sse2\n") == "none"


# -- bad input ---------------------------------------------------------------------------------
def _fails(ckpt: Path, folder: Path, *args: object) -> str:
    code, stdout, stderr = run_cli("export", ckpt, "-o", folder, *args)
    assert code == 1 and stdout == "", stderr
    assert not folder.exists(), "nothing may be left half-written"
    return error_line(stderr)


def test_quantize_needs_the_staged_onnx_format(ckpt: Path, tmp_path: Path) -> None:
    assert "add --format staged-onnx" in _fails(ckpt, tmp_path / "o", "--quantize", "int8")


def test_a_calibration_set_smaller_than_asked_is_refused(ckpt: Path, tmp_path: Path) -> None:
    line = _fails(ckpt, tmp_path / "o", "--format", "staged-onnx", "--quantize", "int8", "--quant-images", 500)
    assert "asks for 500 calibration images" in line and "or fewer" in line


def test_missing_onnxruntime_names_the_extra(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert "pip install 'pteenet[onnx]'" in _fails(ckpt, tmp_path / "o", "--format", "staged-onnx", "--quantize", "int8")


def test_a_failing_quantization_names_the_part(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime.quantization as q

    def broken(*args: Any, **kwargs: Any) -> None:
        raise ValueError("Unsupported op Foo")

    monkeypatch.setattr(q, "quantize_static", broken)
    line = _fails(ckpt, tmp_path / "o", "--format", "staged-onnx", "--quantize", "int8", "--quant-images", 8)
    assert "cannot quantize backbone stage 0 to INT8: ValueError: Unsupported op Foo" in line


# -- bench ---------------------------------------------------------------------------------------
def test_bench_times_four_programs_in_turn_with_accuracy(ckpt: Path) -> None:
    from pteenet.bench.run import BenchConfig, bench

    model = pteenet.load(str(ckpt))
    x = make_images(6, seed=2)
    labels = __import__("torch").arange(6) % 10
    cfg = BenchConfig(batch_sizes=(1, 3), repeats=1, warmup=1, threads=1, runtime="onnxruntime", quantize="int8")
    doc = bench(model, x, cfg, labels=labels, int8=(make_images(8, seed=3), {"images": 8}))
    assert doc["cpu_int8"] in ("none", "unknown") or "VNNI" in doc["cpu_int8"] or "AMX" in doc["cpu_int8"]
    for r in doc["results"]:
        p = r["programs"]
        assert list(p) == ["backbone", "early_exit", "backbone_int8", "early_exit_int8"]
        assert p["backbone"]["time_ratio_vs_fp32_backbone"] == 1.0 and "time_ratio_vs_backbone_int8" in p["early_exit_int8"]
        assert all(0 <= v["accuracy"] <= 1 and v["latency_ms"]["p99"] >= v["latency_ms"]["p50"] for v in p.values())


def test_bench_cli_int8_needs_onnxruntime_runtime(ckpt: Path) -> None:
    code, _, stderr = run_cli("bench", ckpt, "--quantize", "int8", "--limit", 4)
    assert code == 1 and "add --runtime onnxruntime" in error_line(stderr)


def test_export_with_data_counts_the_staged_onnx_decisions_that_differ_from_eager(ckpt: Path, tmp_path: Path) -> None:
    from pteenet.data import DataRequest
    from pteenet.export.quantize import test_images, test_split

    code, _, stderr = run_cli("export", ckpt, "-o", tmp_path / "o", "--format", "staged-onnx", "--data", "synthetic",
                              "--threshold", 0.6, "--json")
    assert code == 0, stderr
    got = json.loads((tmp_path / "o" / "report.json").read_text())["onnx_decisions"]
    model = pteenet.load(str(ckpt))
    model.set_thresholds(0.6)
    images, _ = test_images(test_split(model, DataRequest(spec="synthetic")))
    _, where = driver.StagedModel(tmp_path / "o" / "staged_onnx", driver.onnx_runner(None)).run(images.numpy())
    want = int((where != model.predict(images).exit_index.numpy()).sum())
    assert got["images"] == len(images) > 0 and got["exits_differ"] == want and 0 < (where < model.num_exits).sum()
    assert f"{want} left the staged ONNX program" in (tmp_path / "o" / "report.md").read_text()
    code, _, stderr = run_cli("export", ckpt, "-o", tmp_path / "p", "--format", "staged-onnx")  # no data: no count
    assert code == 0 and json.loads((tmp_path / "p" / "report.json").read_text())["onnx_decisions"] is None
