"""``pteenet export``: the output folder, the report, every format against eager, and bad inputs.

One export with every format runs once per module (torch.export and ONNX conversion take seconds)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open

import pteenet
from helpers import assert_logits_close, cache_of, error_line, make_images, make_model, random_thresholds, run_cli
from pteenet.bench.run import BenchConfig, bench
from pteenet.exits import policies as pol
from pteenet.export.run import FORMATS, ExportConfig, export
from pteenet.runtime.checkpoint import read_metadata
from pteenet.sweep import backbone_point, build_document, select, sweep_global, sweep_meta

ALL_FORMATS = ("torch-export", "static-torch-export", "onnx", "static-onnx")
HAS_ORT = importlib.util.find_spec("onnxruntime") is not None


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return make_images(24, seed=11)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, images: torch.Tensor) -> Path:
    """A checkpoint with everything the report shows: training record, a sweep (max-softmax, on
    synthetic labels), a recorded bench, and a training-state tensor that export must drop."""
    model = make_model(seed=2)
    cache = cache_of(model, images)
    cache.labels = (np.arange(cache.num_samples) % 10).astype(np.int64)
    points = sweep_global(cache, "max-softmax", np.linspace(0, 1, 21))
    chosen = select(points, backbone_point(cache), budget=1.0)
    doc = build_document(cache, points, chosen, cache, budget=1.0)
    assert chosen is not None and chosen.thresholds
    model.set_thresholds(chosen.thresholds, "max-softmax")
    model.meta.update(sweep=sweep_meta(doc), training={"epochs": 2, "lr": 1e-3, "complete": True},
                      history=[{"epoch": 1, "val": {"accuracy": [0.1, 0.2, 0.3]}},
                               {"epoch": 2, "val": {"accuracy": [0.4, 0.5, 0.6]}}],
                      data={"spec": "synthetic", "class_names": [f"c{i}" for i in range(10)]})
    model.meta["bench"] = bench(model, images[:8], BenchConfig(batch_sizes=(1, 8), repeats=1, warmup=1))
    path = tmp_path_factory.mktemp("ckpt") / "trained.safetensors"
    pteenet.save_checkpoint(path, model, state={"optimizer.step": torch.tensor([3.0])})
    return path


@pytest.fixture(scope="module")
def out(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    folder = tmp_path_factory.mktemp("export") / "out"
    return folder, export(ckpt, ExportConfig(output=folder, budget=0.9, formats=ALL_FORMATS))


def test_folder_holds_a_loadable_self_contained_checkpoint(ckpt: Path, out: tuple[Path, dict[str, Any]],
                                                           images: torch.Tensor) -> None:
    folder, doc = out
    names = {f.name for f in folder.iterdir()}
    assert {FORMATS[f].file for f in ("safetensors", *ALL_FORMATS)} | {"report.md", "report.json"} <= names
    assert not [n for n in folder.parent.iterdir() if n.name.startswith(".")], "temp folders left behind"
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if k.startswith("state.")]
    model = pteenet.load(str(folder / "model.safetensors"))
    op = doc["operating_point"]
    assert (model.policy, model.thresholds) == (op["policy"], op["thresholds"])
    assert model.info.class_names == [f"c{i}" for i in range(10)]
    meta = read_metadata(folder / "model.safetensors")
    assert {"training", "history", "data", "sweep", "bench", "export", "cost"} <= set(meta)
    source = pteenet.load(str(ckpt))
    a, b = source.predict(images, op["thresholds"], op["policy"]), model.predict(images)
    assert torch.equal(a.exit_index, b.exit_index) and torch.equal(a.logits, b.logits)
    model.set_thresholds(0.0)  # still tunable
    assert (model.predict(images).exit_index == 0).all()


def test_budget_picks_the_sweeps_point_and_the_report_says_so(ckpt: Path, out: tuple[Path, dict[str, Any]]) -> None:
    folder, doc = out
    sweep = read_metadata(ckpt)["sweep"]
    feasible = [p for p in sweep["points"] if p["cost"] <= 0.9 + 1e-9]
    best = max(feasible, key=lambda p: (p["accuracy"], -p["cost"]))
    op = doc["operating_point"]
    assert op["thresholds"] == [best["threshold"]] * 3 and op["val"]["cost"] == best["cost"]
    report = json.loads((folder / "report.json").read_text())
    assert report["operating_point"]["thresholds"] == op["thresholds"]
    assert report["operating_point"]["reduction"] == pytest.approx(1 - best["cost"])
    assert report["training"]["final_epoch"]["epoch"] == 2 and report["bench"]["results"]
    md = (folder / "report.md").read_text()
    for text in ("## Operating point", "max-softmax", f"thresholds {best['threshold']:g}", "mean cost of 0.9",
                 f"{100 * best['accuracy']:.2f}%", "## Measured speed", "## Threshold sweep", "val.accuracy"):
        assert text in md, text
    if importlib.util.find_spec("matplotlib") is not None:
        assert (folder / "curve.png").read_bytes()[:4] == b"\x89PNG"


def _two_settings(model: pteenet.EarlyExitModel, x: torch.Tensor) -> list[list[float]]:
    """Two per-exit threshold settings away from every score, sending samples to different exits."""
    cache = cache_of(model, x)
    return [random_thresholds(cache, model.policy, np.random.default_rng(s)) for s in (1, 2)]


def _ort(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # the exporter leaves unused initialisers that ORT warns about
    return ort.InferenceSession(str(path), opts)


def test_cond_programs_equal_eager(out: tuple[Path, dict[str, Any]], images: torch.Tensor) -> None:
    folder, _ = out
    model = pteenet.load(str(folder / "model.safetensors"))
    program = torch.export.load(str(folder / "model.pt2")).module()
    import onnx

    onnx.checker.check_model(str(folder / "model.onnx"))
    assert any(n.op_type == "If" for n in onnx.load(str(folder / "model.onnx")).graph.node)  # real control flow
    session = _ort(folder / "model.onnx") if HAS_ORT else None  # without onnxruntime: the checks above only
    x = images[:10]
    seen = set()
    with torch.no_grad():  # as report.md says: with autograd on, torch.cond re-traces every call
        for ts in _two_settings(model, x):
            t = torch.tensor(ts, dtype=torch.float32)
            for i in range(len(x)):
                want = model.predict(x[i:i + 1], ts)
                logits, exit_index = program(x[i:i + 1], t)
                assert int(exit_index) == int(want.exit_index)
                assert_logits_close(logits, want.logits)
                seen.add(int(exit_index))
                if session is not None:
                    o_logits, o_exit = session.run(None, {"x": x[i:i + 1].numpy(), "thresholds": t.numpy()})
                    assert int(o_exit[0]) == int(want.exit_index)
                    assert_logits_close(torch.from_numpy(o_logits), want.logits, rel=1e-3)  # another runtime's kernels
    assert len(seen) > 1


def test_static_programs_equal_eager(out: tuple[Path, dict[str, Any]], images: torch.Tensor) -> None:
    folder, _ = out
    model = pteenet.load(str(folder / "model.safetensors"))
    x = images[:9]  # not the batch size it was traced at: the batch dimension is dynamic
    a = model.forward_all(x)
    want = [t for lg, c in zip(a.exit_logits, a.exit_conf) for t in (lg, torch.sigmoid(c))] + [a.final_logits]
    got_pt2 = torch.export.load(str(folder / "model_static.pt2")).module()(x)
    runs = [[t.detach() for t in got_pt2]]
    if HAS_ORT:
        session = _ort(folder / "model_static.onnx")
        assert [o.name for o in session.get_outputs()] == ["exit0_logits", "exit0_confidence", "exit1_logits",
                                                           "exit1_confidence", "exit2_logits", "exit2_confidence",
                                                           "final_logits"]
        runs.append([torch.from_numpy(o) for o in session.run(None, {"x": x.numpy()})])
    else:
        import onnx

        onnx.checker.check_model(str(folder / "model_static.onnx"))
    for got in runs:
        for g, w in zip(got, want):
            assert_logits_close(g, w.detach(), rel=1e-3)  # onnxruntime's kernels sum in another order
        # The caller's rule on the static outputs gives the runtime's exits, at two settings.
        for ts in _two_settings(model, x):
            # h is output directly; the other policies read the logits only.
            scores = [got[2 * k + 1] if model.policy == "confidence" else pol.score(model.policy, got[2 * k], got[2 * k + 1])
                      for k in range(model.num_exits)]
            passed = torch.stack([pol.passes(model.policy, s, t) for s, t in zip(scores, ts)])
            exits = torch.where(passed.any(0), passed.int().argmax(0), model.num_exits)
            assert torch.equal(exits, model.predict(x, ts).exit_index)


def test_export_error_is_one_line(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("data-dependent control flow\nmore detail")

    monkeypatch.setattr(torch.export, "export", broken)
    with pytest.raises(pteenet.PteenetError, match="torch.export cannot export this model with torch.cond: RuntimeError"):
        export(ckpt, ExportConfig(output=tmp_path / "o", formats=("torch-export",)))
    assert not list(tmp_path.iterdir()), "nothing may be left half-written"


# -- the command line ------------------------------------------------------------------------------
def _run(*args: object) -> tuple[int, str, str]:
    return run_cli("export", *args)


def _error(code: int, stderr: str) -> str:
    assert code == 1, stderr
    return error_line(stderr)


def test_cli_happy_path_json_and_force(ckpt: Path, tmp_path: Path) -> None:
    folder = tmp_path / "o"
    code, stdout, stderr = _run(ckpt, "-o", folder, "--threshold", 0.5, "--policy", "entropy", "--json")
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert doc["operating_point"]["policy"] == "entropy" and doc["operating_point"]["thresholds"] == [0.5] * 3
    assert doc["operating_point"]["val"] is None  # the sweep did not measure entropy: the report says so
    assert "not known here" in (folder / "report.md").read_text()
    assert pteenet.load(str(folder / "model.safetensors")).thresholds == [0.5] * 3
    code, _, stderr = _run(ckpt, "-o", folder, "--threshold", 0.25)
    assert "not empty" in _error(code, stderr) and "--force" in stderr
    assert pteenet.load(str(folder / "model.safetensors")).thresholds == [0.5] * 3  # untouched
    code, _, stderr = _run(ckpt, "-o", folder, "--threshold", 0.25, "--force")
    assert code == 0, stderr
    assert pteenet.load(str(folder / "model.safetensors")).thresholds == [0.25] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


@pytest.mark.parametrize("args, message", [
    (["--threshold", "1.5"], "outside [0, 1]"),
    (["--format", "tflite"], "unknown format 'tflite'"),
    (["--budget", "0.5", "--threshold", "0.2"], "give one of"),
    (["--max-drop", "1", "--policy", "confidence"], "no points for policy 'confidence'"),
])
def test_cli_bad_inputs(ckpt: Path, tmp_path: Path, args: list[str], message: str) -> None:
    code, stdout, stderr = _run(ckpt, "-o", tmp_path / "o", *args)
    assert message in _error(code, stderr) and stdout == ""
    assert not list(tmp_path.iterdir())


def test_cli_budget_needs_a_sweep(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    pteenet.save_checkpoint(path, make_model())
    code, _, stderr = _run(path, "-o", tmp_path / "o", "--budget", "0.5")
    assert "run pteenet sweep-threshold --write first" in _error(code, stderr)


def test_cli_missing_extra_is_named(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # makes `import onnxscript` fail
    code, _, stderr = _run(ckpt, "-o", tmp_path / "o", "--format", "static-onnx")
    assert "pteenet[onnx]" in _error(code, stderr)
    assert not list(tmp_path.iterdir())


def test_cli_newer_schema_is_refused(ckpt: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    with safe_open(str(ckpt), framework="pt") as f:
        meta = json.loads(f.metadata()["pteenet"])
    meta["schema_version"] = 99
    newer = tmp_path / "newer.safetensors"
    save_file(load_file(str(ckpt)), str(newer), metadata={"pteenet": json.dumps(meta)})
    code, _, stderr = _run(newer, "-o", tmp_path / "o")
    assert "newer pteenet" in _error(code, stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["newer.safetensors"]
