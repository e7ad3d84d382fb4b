"""Pricing in ONNX Runtime (``runtime/ort_timing.py``, ``sweep-threshold --deploy-runtime onnxruntime``):
the staged program's parts exported and timed where the user runs them. Only the presence, shape and
bookkeeping of the prices are checked here (no timed test)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import pteenet
from helpers import build, make_images, run_cli, saved_checkpoint
from pteenet.errors import PteenetError

pytest.importorskip("onnxruntime")
from pteenet.runtime.ort_timing import profile_onnx  # noqa: E402


def test_the_onnx_runtime_profile_times_each_stage_and_each_computed_head() -> None:
    model = build("pool-mlp", False, False, exits=2)
    model.set_active([False, True])  # exit 0 takes no decision: no head program, no price
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    prof = profile_onnx(model, make_images(3), repeats=1, threads=1)
    assert prof.batch_size == 3 and len(prof.stage_ms) == 3 and all(t >= 0 for t in prof.stage_ms)
    assert prof.branch_ms[0] == 0.0 and prof.branch_ms[1] > 0 and prof.backbone_ms and prof.backbone_ms > 0
    assert len(prof.compaction_ms) == 2 and prof.compaction_ms[0] == 0.0 < prof.compaction_ms[1]
    assert prof.machine["runtime"] == "onnxruntime" and prof.machine["onnxruntime"] and prof.machine["threads"] == 1
    # The head carries the call it adds; the costs price exactly the computed head.
    assert prof.costs()[0] == pytest.approx(prof.stage_ms[0] / sum(prof.stage_ms))
    assert prof.costs()[1] == pytest.approx((prof.stage_ms[0] + prof.stage_ms[1] + prof.branch_ms[1]) / sum(prof.stage_ms))
    assert profile_onnx(model, make_images(1), repeats=1).compaction_ms == []  # batch 1 never compacts
    assert all(v.equal(model.backbone.state_dict()[k]) for k, v in before.items())


def test_onnx_runtime_pricing_refuses_chained_exits_with_a_hint() -> None:
    with pytest.raises(PteenetError, match="cascade or an ensemble") as e:
        profile_onnx(build("pool-mlp", True, False, exits=2), make_images(1), repeats=1)
    assert "--deploy-runtime eager" in (e.value.hint or "")


def test_sweep_cli_prices_in_onnx_runtime_and_every_report_says_so(tmp_path: Path) -> None:
    model, ckpt = saved_checkpoint(tmp_path, limit=40)
    tuned = tmp_path / "tuned.safetensors"
    code, stdout, stderr = run_cli("sweep-threshold", ckpt, "-o", tmp_path / "sw", "--thresholds", "0:1:0.1",
                                 "--max-drop", "100", "--no-guarantee", "--policy", "max-softmax",
                                 "--deploy-runtime", "onnxruntime", "--write", tuned, "--json")
    assert code == 0, stderr
    cm = json.loads(stdout)["cost_model"]
    assert cm["kind"] == "time" and cm["runtime"] == "onnxruntime" and cm["profile"]["machine"]["runtime"] == "onnxruntime"
    assert "predicted time in ONNX Runtime at batch 1" in cm["note"]
    code, stdout, stderr = run_cli("info", tuned, columns=200)
    assert code == 0 and "predicted time in ONNX Runtime at batch 1" in stdout + stderr
    code, stdout, stderr = run_cli("sweep-threshold", ckpt, "-o", tmp_path / "sw2", "--deploy-runtime", "tvm")
    assert code == 1 and "deploy_runtime" in stderr and "onnxruntime" in stderr


def test_the_call_cost_leaves_the_stages_and_stays_with_the_heads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bookkeeping on given times (not measured): what each part of the profile is made of."""
    from pteenet.runtime import ort_timing as ort_profile

    model = build("pool-mlp", False, False, exits=2)
    given = {("stage", 0): [1.0e-3], ("stage", 1): [2.0e-3], ("stage", 2): [0.5e-3], ("head", 0): [0.3e-3],
             ("head", 1): [0.4e-3], ("compaction", 0): [0.1e-3], ("compaction", 1): [0.2e-3],
             ("backbone", 0): [3.2e-3], ("call", 0): [0.05e-3]}
    monkeypatch.setattr(ort_profile, "_passes", lambda *a: {k: list(v) * a[-1] for k, v in given.items()})
    prof = profile_onnx(model, make_images(2), repeats=1, warmup=0)
    assert prof.stage_ms == pytest.approx([0.95, 1.95, 0.45])  # one call's fixed cost out of every stage
    assert prof.branch_ms == pytest.approx([0.3, 0.4]) and prof.decision_ms == 0.0  # a head keeps the call it adds
    assert prof.compaction_ms == pytest.approx([0.1, 0.2]) and prof.backbone_ms == pytest.approx(3.2)


def test_bench_in_onnx_runtime_takes_the_eager_exits_and_prices_them_there(tmp_path: Path) -> None:
    from pteenet.bench.run import BenchConfig, bench

    model = build("pool-mlp", False, False, exits=2, seed=3)
    x = make_images(6)
    cfg = BenchConfig(batch_sizes=(1, 4), threshold=0.5, policy="max-softmax", threads=1, repeats=1, warmup=0,
                      runtime="onnxruntime")
    doc = bench(model, x, cfg)
    assert doc["deploy_runtime"] == "onnxruntime" and model.policy == "confidence"  # the model's own policy is back
    want = model.predict(x, 0.5, "max-softmax").exit_index
    for r in doc["results"]:  # the exported program's exits are the eager model's, at batch 1 and 4
        assert r["exit_fractions"] == pytest.approx((want.bincount(minlength=3).double() / 6).tolist())
        assert r["time_profile"]["machine"]["runtime"] == "onnxruntime" and r["predicted_time_ratio"] > 0
    code, stdout, stderr = run_cli("bench", _saved(tmp_path), "--runtime", "tvm")
    assert code == 1 and "onnxruntime" in stderr


def _saved(folder: Path) -> Path:
    model = build("pool-mlp", False, False, exits=2)
    model.meta.update(data={"spec": "synthetic", "val_split": 0.2, "seed": 1, "limit": 20})
    pteenet.save_checkpoint(folder / "b.safetensors", model)
    return folder / "b.safetensors"
