"""``pteenet bench``: the results document's shape and its bookkeeping; never its timings."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import pteenet
from helpers import error_line, make_images, make_model, run_cli
from pteenet.bench.run import BenchConfig, bench, load_images, verdict
from pteenet.runtime.checkpoint import read_metadata
from pteenet.runtime.timing import TimeProfile, profile


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "m.safetensors"
    pteenet.save_checkpoint(path, make_model(seed=3))
    return path


def _check_document(doc: dict, model_exits: int, batch_sizes: list[int]) -> None:
    assert {"device", "threads", "images", "policy", "thresholds", "exit_fractions", "mean_macs", "mac_ratio",
            "results", "overhead_eats_savings", "measured_at", "allocator"} <= set(doc)
    assert [r["batch_size"] for r in doc["results"]] == batch_sizes
    for r in doc["results"]:
        assert {"backbone", "early_exit", "time_ratio", "mac_ratio", "mac_ratio_paper", "verdict",
                "ideal_time_ratio", "predicted_time_ratio", "time_profile"} <= set(r)
        assert 0 < r["ideal_time_ratio"] <= r["predicted_time_ratio"]
        assert len(r["time_profile"]["stage_ms"]) == model_exits + 1 and len(r["time_profile"]["branch_ms"]) == model_exits
        for side in ("backbone", "early_exit"):
            assert {"images_per_s", "time_s", "latency_ms"} <= set(r[side])
            assert set(r[side]["latency_ms"]) == {"p50", "p95"}
        assert len(r["exit_fractions"]) == model_exits + 1
        assert sum(r["exit_fractions"]) == pytest.approx(1.0)


def test_bench_document() -> None:
    model = make_model(seed=3)
    before = torch.get_num_threads()
    doc = bench(model, make_images(12), BenchConfig(batch_sizes=(1, 5), threshold=0.5, policy="max-softmax",
                                                    threads=1, repeats=1, warmup=1))
    _check_document(doc, model.num_exits, [1, 5])
    assert torch.get_num_threads() == before and doc["threads"] == 1
    assert doc["results"][1]["batches"] == 3  # 5 + 5 + 2
    # Mean MACs come from the exits really taken and the cumulative cost table.
    want = model.predict(make_images(12), 0.5, "max-softmax").exit_index
    fr = torch.bincount(want, minlength=model.num_exits + 1).double() / 12
    assert doc["exit_fractions"] == pytest.approx(fr.tolist())
    assert doc["mac_ratio"] == pytest.approx(float(fr @ torch.tensor(model.cost.costs(), dtype=torch.float64)))
    assert doc["mean_macs"] == pytest.approx(doc["mac_ratio"] * model.cost.backbone_macs)
    json.dumps(doc)  # JSON-able as is (it is stored in checkpoints)


def test_verdict_is_honest() -> None:
    assert "NO speed-up" in verdict(1, 1.2, 0.5)
    assert "overhead eats part" in verdict(256, 0.8, 0.5)
    assert "follows the MACs" in verdict(1, 0.52, 0.5)
    # Slower than the MACs, but as fast as the backbone's own layer times allow: not the exits' fault.
    split = {"ideal_time_ratio": 0.75, "predicted_time_ratio": 0.8}
    assert "the exits add little" in verdict(256, 0.8, 0.5, split) and "1.33x" in verdict(256, 0.8, 0.5, split)
    assert "overhead eats part" in verdict(256, 0.9, 0.5, split)


def test_time_profile_ratios() -> None:
    # Stages of 1, 2, 1 ms; heads of 0.5 ms. Half the samples leave at exit 0, the rest run to the end.
    prof = TimeProfile(batch_size=8, stage_ms=[1.0, 2.0, 1.0], branch_ms=[0.5, 0.5])
    r = prof.ratios([0.5, 0.0, 0.5])
    assert r["ideal_time_ratio"] == pytest.approx(0.5 * 1 / 4 + 0.5)
    assert r["predicted_time_ratio"] == pytest.approx(0.5 * 1.5 / 4 + 0.5 * 5 / 4)


def test_profile_times_every_stage_and_only_computed_branches() -> None:
    model = pteenet.attach(pteenet.AttachConfig(backbone="cifar-resnet20", input_size=(3, 16, 16), exits=3, cascade=False))
    model.set_active([False, True, False])  # not chained: only exit 1's head runs, nothing after it
    prof = profile(model, make_images(4), repeats=1)
    computed = model.computed_branches()
    assert computed == [False, True, False]
    assert len(prof.stage_ms) == model.num_exits + 1 and all(t > 0 for t in prof.stage_ms)
    assert [t > 0 for t in prof.branch_ms] == computed


def _run(*args: object) -> tuple[int, str, str]:
    return run_cli("bench", *args)


def test_cli_json_and_record(ckpt: Path) -> None:
    common = ["--data", "synthetic", "--limit", 6, "--repeats", 1, "--batch-size", 1, "--batch-size", 4, "--threads", 1]
    code, stdout, stderr = _run(ckpt, *common, "--json")
    assert code == 0, stderr
    _check_document(json.loads(stdout), 3, [1, 4])
    assert "bench" not in read_metadata(ckpt)
    code, stdout, stderr = _run(ckpt, *common, "--record")
    assert code == 0, stderr
    assert stdout == "" and "exits taken:" in stderr and "recorded in" in stderr
    recorded = read_metadata(ckpt)["bench"]
    _check_document(recorded, 3, [1, 4])
    assert recorded["data"] == "synthetic" and recorded["split"] == "test"


def test_split_val_is_the_calibration_split(ckpt: Path) -> None:
    model = pteenet.load(str(ckpt))
    cal, _ = load_images(model, "synthetic", split="calibration", limit=4)
    val, _ = load_images(model, "synthetic", split="val", limit=4)  # the split's earlier name, still accepted
    assert torch.equal(cal, val) and not torch.equal(cal, load_images(model, "synthetic", split="test", limit=4)[0])


@pytest.mark.parametrize("args, message", [
    (["--threshold", "2"], "outside [0, 1]"),
    (["--split", "holdout"], "unknown split 'holdout'"),
    (["--policy", "all"], "unknown policy 'all'"),  # a name --policy admits, for the sweep only
])
def test_cli_bad_input(ckpt: Path, args: list[str], message: str) -> None:
    code, stdout, stderr = _run(ckpt, "--data", "synthetic", "--limit", 4, "--repeats", 1, *args)
    assert code == 1 and message in error_line(stderr)
    assert stdout == ""


GLIBC = "glibc" in __import__("platform").libc_ver()[0]


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only")
def test_allocator_tuning_is_reported_where_glibc_exists() -> None:
    from pteenet.bench.run import tune_allocator

    note = tune_allocator()
    assert note is not None and "mmap threshold" in note


def test_allocator_tuning_is_none_without_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    import ctypes

    from pteenet.bench.run import tune_allocator

    def no_libc(name: str, *a: object, **kw: object) -> object:
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    assert tune_allocator() is None
