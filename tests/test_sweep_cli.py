"""``pteenet sweep-threshold`` end to end on a tiny model and synthetic data (CPU, a few seconds)."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import pteenet
from helpers import GRID, conv2_model, error_line, run_cli
from pteenet.data import DataConfig, DataRequest, load_splits, make_loader, resolve_data
from pteenet.runtime.checkpoint import read_metadata
from pteenet.sweep import ExitCacheBuilder, SweepConfig, build_cache, evaluate, sweep_threshold

POINT_KEYS = {"threshold", "accuracy", "agreement", "cost", "cost_paper", "exit_fractions", "policy", "kind"}


def _run(*args: object) -> tuple[int, str, str]:
    return run_cli("sweep-threshold", *args)


def test_happy_path_writes_outputs_on_the_recorded_split(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, stdout, stderr = _run(trained, "-o", out, "--thresholds", GRID, "--budget", 0.8, "--no-select-exits")
    assert code == 0, stderr
    files = {"sweep.json", "sweep.csv"}
    if importlib.util.find_spec("matplotlib") is not None:
        files |= {"curve.png", "exits.png"}
        assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert files <= {f.name for f in out.iterdir()}
    assert not list(out.glob("*.tmp"))
    doc = json.loads((out / "sweep.json").read_text())
    # The calibration split training held out, rebuilt from the checkpoint's record.
    assert doc["data"]["val_split"] == 0.2 and doc["data"]["seed"] == 1 and doc["samples"] == 100
    assert doc["split"] == doc["selection_split"] == "calibration" and doc["notes"] == [] and doc["warnings"] == []
    # Three scores on the 21 thresholds, patience on its run lengths 1..E+1 (3 exits).
    assert doc["policies"] == ["confidence", "max-softmax", "entropy", "patience"] and len(doc["points"]) == 3 * 21 + 4
    chosen = doc["chosen"]
    assert chosen["cost"] <= 0.8 + 1e-9
    best = max(p["accuracy"] for p in doc["points"] if p["cost"] <= 0.8 + 1e-9)
    assert chosen["accuracy"] == best
    assert chosen["test"]["policy"] == chosen["policy"] and "backbone" in chosen["test"]
    assert "Pareto front" in stderr and "chosen" in stderr and stdout == ""


def test_json_shape(trained: Path, tmp_path: Path) -> None:
    code, stdout, stderr = _run(trained, "-o", tmp_path, "--thresholds", GRID, "--max-drop", 100,
                                "--policy", "max-softmax", "--no-select-exits", "--json")
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert doc == json.loads((tmp_path / "sweep.json").read_text())
    assert isinstance(doc["backbone"]["accuracy"], float)
    assert {p["policy"] for p in doc["points"]} == {"max-softmax"}
    for p in doc["points"]:
        assert POINT_KEYS <= set(p) and len(p["exit_fractions"]) == doc["exits"] + 1
        assert sum(p["exit_fractions"]) == pytest.approx(1.0)
    # max-drop 100: anything qualifies, so the cheapest point is chosen.
    assert doc["chosen"]["cost"] == min(p["cost"] for p in doc["points"])


def test_write_sets_thresholds_and_keeps_the_curve(trained: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "model.safetensors"
    shutil.copy(trained, ckpt)
    code, stdout, stderr = _run(ckpt, "-o", tmp_path / "out", "--thresholds", GRID, "--budget", 0.75,
                                "--per-exit", "--write", ckpt, "--json")  # in place
    assert code == 0, stderr
    doc = json.loads(stdout)
    chosen = doc["chosen"]
    model = pteenet.load(str(ckpt))
    want = chosen["threshold"] if chosen["kind"] == "per-exit" else [chosen["threshold"]] * 3
    assert model.policy == chosen["policy"] and model.thresholds == pytest.approx(want)
    meta = read_metadata(ckpt)
    assert meta["training"] and meta["data"]["val_split"] == 0.2  # earlier sections survive
    sweep = meta["sweep"]
    assert sweep["chosen"] == chosen and sweep["backbone"] == doc["backbone"]
    assert sweep["points"] and {p["policy"] for p in sweep["points"]} == {chosen["policy"]}
    assert all(POINT_KEYS <= set(p) for p in sweep["points"])
    assert len(sweep["points"]) < len(doc["points"]) and "pareto" not in sweep


def test_per_exit_never_worse_than_global_at_the_budget(trained: Path, tmp_path: Path) -> None:
    code, stdout, stderr = _run(trained, "-o", tmp_path, "--thresholds", GRID, "--budget", 0.85,
                                "--per-exit", "--no-select-exits", "--json")
    assert code == 0, stderr
    doc = json.loads(stdout)
    for policy, budgets in doc["per_exit_budgets"].items():
        assert 0.85 in budgets
    glob = max(p["accuracy"] for p in doc["points"] if p["kind"] == "global" and p["cost"] <= 0.85 + 1e-9)
    assert doc["chosen"]["accuracy"] >= glob
    assert any(p["kind"] == "per-exit" for p in doc["points"])
    for p in doc["points"]:
        if p["kind"] == "per-exit":
            assert len(p["threshold"]) == doc["exits"] and len(set(p["threshold"])) > 1


def test_build_cache_equals_a_direct_forward_all_loop(trained: Path) -> None:
    model = pteenet.load(str(trained))
    splits = load_splits(DataConfig(spec="synthetic", calibration_split=0.2, seed=1), model.info.preprocess, 10)
    cache = build_cache(model, splits.calibration, batch_size=32)
    builder = ExitCacheBuilder()
    with torch.no_grad():
        for x, y in make_loader(splits.calibration, 32, shuffle=False):
            out = model.forward_all(x)
            builder.add(out.exit_logits, out.exit_conf, out.final_logits, y)
    want = builder.build(model.cost.costs(), model.cost.costs_paper())
    assert np.array_equal(cache.preds, want.preds) and np.array_equal(cache.labels, want.labels)
    assert all(np.array_equal(cache.scores[p], want.scores[p]) for p in want.scores)
    assert np.array_equal(cache.costs, want.costs) and cache.num_samples == 100
    # And the cache agrees with the model's own early-exit runtime at a threshold.
    xs = torch.stack([splits.calibration[i][0] for i in range(len(splits.calibration))])
    pred = model.predict(xs, 0.5, "max-softmax")
    counts = np.bincount(pred.exit_index.numpy(), minlength=4) / 100
    assert evaluate(cache, "max-softmax", 0.5).exit_fractions == pytest.approx(counts.tolist())


def test_split_val_is_the_calibration_split(trained: Path, tmp_path: Path) -> None:
    args = [trained, "--thresholds", GRID, "--policy", "entropy", "--cost", "macs", "--json"]
    code, new, stderr = _run(*args, "-o", tmp_path / "calibration", "--split", "calibration")
    assert code == 0, stderr
    code, old, stderr = _run(*args, "-o", tmp_path / "val", "--split", "val")  # the split's earlier name
    assert code == 0, stderr
    assert json.loads(old)["split"] == "calibration" and json.loads(old)["points"] == json.loads(new)["points"]
    assert SweepConfig(split="val").split == "calibration"


def test_library_call_returns_the_document(trained: Path, tmp_path: Path) -> None:
    doc = sweep_threshold(trained, DataRequest(), SweepConfig(thresholds=GRID, policy="entropy", split="test",
                                                              device="cpu"))
    assert doc["split"] == "test" and doc["chosen"] is None and doc["selection_split"] is None
    assert doc["samples"] == 100 and not list(tmp_path.iterdir())  # no outdir: nothing written


def test_budget_below_the_cheapest_reachable(trained: Path, tmp_path: Path) -> None:
    first = pteenet.load(str(trained)).cost.costs()[0]
    code, _, stderr = _run(trained, "-o", tmp_path / "o", "--budget", 0.01, "--cost", "macs")  # checked on the MACs
    assert code == 1
    line = error_line(stderr)
    assert "cheapest reachable cost" in line and f"{first:.4f}" in line
    assert not (tmp_path / "o").exists()  # refused before any data was read


@pytest.mark.parametrize("args, needle", [
    (["--thresholds", "1:0:0.1"], "empty"),
    (["--thresholds", "0:2:0.5"], "[0, 1]"),
    (["--thresholds", "abc"], "bad threshold range"),
    (["--budget", "0.8", "--max-drop", "1"], "not both"),
    (["--write", "x.safetensors"], "--budget"),
    (["--max-drop", "-1"], "max-drop"),
    (["--data", "cifar10"], "not the data the branches were trained on"),
    (["--patience", "0"], "patience"),
    (["--policy", "entropy", "--patience", "2"], "patience policy"),
])
def test_bad_inputs_are_one_line_errors(trained: Path, tmp_path: Path, args: list[str], needle: str) -> None:
    code, stdout, stderr = _run(trained, "-o", tmp_path / "o", *args)
    assert code == 1 and stdout == ""
    assert needle in error_line(stderr)
    assert "Traceback" not in stderr


def test_missing_checkpoint_and_bad_choice(tmp_path: Path, trained: Path) -> None:
    code, _, stderr = _run(tmp_path / "nope.safetensors", "-o", tmp_path / "o")
    assert code == 1 and "not found" in error_line(stderr)
    code, _, _ = _run(trained, "-o", tmp_path / "o", "--policy", "nonsense")
    assert code == 2  # a usage error
    code, _, _ = _run(trained, "--policy", "entropy")  # -o is required
    assert code == 2


def test_untrained_checkpoint_warns_but_continues(tmp_path: Path) -> None:
    ckpt = tmp_path / "untrained.safetensors"
    pteenet.save_checkpoint(ckpt, conv2_model())
    code, _, stderr = _run(ckpt, "-o", tmp_path / "out", "--thresholds", GRID)
    assert code == 1 and "pass --data" in error_line(stderr)  # no recorded data and no --data
    code, stdout, stderr = _run(ckpt, "-o", tmp_path / "out", "--thresholds", GRID, "--data", "synthetic",
                                "--limit", 40, "--json")
    assert code == 0, stderr
    warning = [line for line in stderr.splitlines() if "never trained" in line]
    assert len(warning) == 1 and warning[0].startswith("Warning:")
    doc = json.loads(stdout)
    assert any("never trained" in w for w in doc["warnings"])
    assert any("no data split" in n for n in doc["notes"]) and doc["data"]["val_split"] == 0.1
    assert doc["samples"] == 40 and doc["chosen"] is None


def test_choosing_on_test_is_labelled(trained: Path, tmp_path: Path) -> None:
    code, stdout, stderr = _run(trained, "-o", tmp_path, "--thresholds", GRID, "--split", "test",
                                "--max-drop", 5, "--no-guarantee", "--json")  # 100 images certify no 5-point drop
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert doc["split"] == doc["selection_split"] == "test" and "test" not in doc["chosen"]
    assert any("chosen on the test split" in w for w in doc["warnings"])
    assert "chosen on the test split" in stderr


def test_resolve_data_keeps_the_recorded_split() -> None:
    rec = {"spec": "synthetic", "val_split": 0.3, "seed": 7, "limit": 50}
    cfg, notes = resolve_data(DataRequest(data_dir="/d"), rec)
    assert (cfg.spec, cfg.calibration_split, cfg.seed, cfg.limit, cfg.data_dir) == ("synthetic", 0.3, 7, 50, "/d")
    assert notes == []
    cfg, notes = resolve_data(DataRequest(spec="synthetic", limit=20), rec)
    assert cfg.limit == 20 and cfg.calibration_split == 0.3 and "--limit 20" in notes[0]
    cfg, notes = resolve_data(DataRequest(spec="imagefolder:/new"), {**rec, "spec": "imagefolder:/old"})
    assert cfg.spec == "imagefolder:/new" and "imagefolder:/old" in notes[0]


def test_a_setting_dearer_than_the_backbone_is_flagged(tmp_path: Path) -> None:
    # Random branches that never agree well: within a 0-point drop only "almost never exit" qualifies,
    # and that costs the backbone plus every branch.
    ckpt = tmp_path / "untrained.safetensors"
    pteenet.save_checkpoint(ckpt, conv2_model())
    code, stdout, stderr = _run(ckpt, "-o", tmp_path / "out", "--thresholds", GRID, "--data", "synthetic",
                                "--limit", 40, "--max-drop", 0, "--no-guarantee", "--no-select-exits", "--json")  # 0 points: never certified
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert doc["nothing_pays"]["cheapest"]["cost"] >= 1.0 and doc["chosen"]["cost"] == 1.0  # the backbone alone
    assert any(w.startswith("nothing pays: ") for w in doc["warnings"])  # tests/test_nothing_pays.py: the rest


# -- --calibration: tune on other data than training's held-out split ---------------------------------
def test_calibration_on_a_test_half_reports_on_the_other_half(trained: Path, tmp_path: Path) -> None:
    code, stdout, stderr = _run(trained, "-o", tmp_path, "--thresholds", GRID, "--max-drop", 100,
                                "--policy", "max-softmax", "--calibration", "synthetic#half=0", "--no-select-exits", "--json")
    assert code == 0, stderr
    doc = json.loads(stdout)
    info = doc["data"]
    assert info["calibration"] == "synthetic#half=0" and info["test_half"] == 1 and info["seed"] == 1
    assert info["sizes"] == {"train": 500, "val": 50, "test": 50} and doc["samples"] == 50
    assert doc["warnings"] == [] and any("instead of the part of the training data" in n for n in doc["notes"])
    # The chosen setting's test numbers come from the other half of the test split.
    model = pteenet.load(str(trained))
    other = load_splits(DataConfig(spec="synthetic", seed=1, calibration="synthetic#half=1"), model.info.preprocess, 10)
    xs, ys = map(torch.cat, zip(*make_loader(other.calibration, 64, shuffle=False)))
    with torch.no_grad():
        backbone_acc = (model.forward_all(xs).final_logits.argmax(1) == ys).float().mean().item()
    assert doc["chosen"]["test"]["backbone"]["accuracy"] == pytest.approx(backbone_acc)


def test_calibration_on_the_whole_test_split_warns(trained: Path, tmp_path: Path) -> None:
    code, stdout, stderr = _run(trained, "-o", tmp_path, "--thresholds", GRID, "--max-drop", 100,
                                "--policy", "entropy", "--calibration", "synthetic", "--no-select-exits", "--json")
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert doc["data"]["calibration_overlap"] == "test"
    assert len(doc["warnings"]) == 1 and "is the test split" in doc["warnings"][0] and "#half=0" in doc["warnings"][0]
    assert "Warning: the calibration data synthetic is the test split" in stderr


@pytest.mark.parametrize("calibration, needle", [
    ("three-classes", "has 3 classes but the backbone outputs 10"),
    ("synthetic#half=3", "bad calibration spec"),
    ("cifar11", "unknown calibration dataset"),
])
def test_bad_calibration_is_one_line_error(trained: Path, tmp_path: Path, calibration: str, needle: str) -> None:
    if calibration == "three-classes":
        from PIL import Image

        for c in ("a", "b", "c"):
            (tmp_path / "val" / c).mkdir(parents=True)
            Image.new("RGB", (16, 16), (80, 0, 0)).save(tmp_path / "val" / c / "0.png")
        calibration = f"imagefolder:{tmp_path / 'val'}"
    code, stdout, stderr = _run(trained, "-o", tmp_path / "o", "--calibration", calibration)
    assert code == 1 and stdout == "" and "Traceback" not in stderr
    assert needle in error_line(stderr)


def test_resolve_data_calibration_overrides_the_record() -> None:
    rec = {"spec": "synthetic", "val_split": 0.3, "seed": 7, "limit": 50}
    cfg, notes = resolve_data(DataRequest(calibration="imagefolder:/val"), rec)
    assert cfg.calibration == "imagefolder:/val" and cfg.seed == 7
    assert len(notes) == 1 and "instead of the part of the training data held out" in notes[0]
    cfg, notes = resolve_data(DataRequest(calibration="synthetic"), {**rec, "calibration": "synthetic#half=0"})
    assert cfg.calibration == "synthetic" and "instead of the recorded synthetic#half=0" in notes[0]
    cfg, notes = resolve_data(DataRequest(calibration="synthetic#half=0"), {**rec, "calibration": "synthetic#half=0"})
    assert cfg.calibration == "synthetic#half=0" and notes == []  # the recorded one: nothing to note
    cfg, notes = resolve_data(DataRequest(), {**rec, "calibration": "synthetic#half=1"})
    assert cfg.calibration == "synthetic#half=1"  # the record's calibration is rebuilt by default
    cfg, notes = resolve_data(DataRequest(spec="synthetic", calibration="synthetic#half=0"), None)
    assert cfg.calibration == "synthetic#half=0" and notes == []  # no carve, so no overlap to warn about


def test_patience_sweeps_run_lengths_and_writes_one(trained: Path, tmp_path: Path) -> None:
    code, stdout, stderr = _run(trained, "-o", tmp_path / "a", "--policy", "patience", "--budget", 1.5, "--json")
    assert code == 0, stderr
    ts = sorted(p["threshold"] for p in json.loads(stdout)["points"])
    assert ts == [1.0, 2.0, 3.0, 4.0]  # run lengths 1..E, and E + 1: nobody leaves
    ckpt = tmp_path / "m.safetensors"
    code, stdout, stderr = _run(trained, "-o", tmp_path / "b", "--patience", 2, "--max-drop", 100, "--write", ckpt,
                                "--json")
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert [p["threshold"] for p in doc["points"]] == [2.0] and doc["chosen"]["policy"] == "patience"
    model = pteenet.load(str(ckpt))
    assert model.policy == "patience" and model.thresholds == [2.0] * 3


def test_exit_selection_is_on_by_default_where_the_cost_is_time() -> None:
    assert SweepConfig(max_drop=1.0).select_exits is True
    assert SweepConfig(max_drop=1.0, cost="macs").select_exits is False
    assert SweepConfig().select_exits is False  # no criterion: nothing to select for
    assert SweepConfig(max_drop=1.0, select_exits=False).select_exits is False
