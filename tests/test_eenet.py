"""EENet's learned scheduler (``--policy eenet``): the runtime takes the exits the simulation on the
exit cache says, at any batch size and in the staged programs; fitting, certification and the edges."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import pteenet
from helpers import HAS_ORT, build, make_images, make_model, staged_driver
from pteenet.errors import PteenetError
from pteenet.exits.eenet import NEVER_EXIT, Scheduler
from pteenet.sweep import ExitCache, ExitCacheBuilder
from pteenet.sweep import eenet as ee

GAP = 1e-6  # thresholds stay this far from every score (float64 scores: far above their noise)


def logits_cache(model: pteenet.EarlyExitModel, x: torch.Tensor, labels: torch.Tensor | None = None) -> ExitCache:
    builder = ExitCacheBuilder(logits=True)
    with torch.no_grad():
        builder.add_outputs(model.forward_all(x), labels)
    return builder.build_for(model)


def random_setting(model: pteenet.EarlyExitModel, cache: ExitCache, seed: int, exits: list[int] | None = None) -> ee.Setting:
    """A scheduler with random weights and thresholds between its scores on ``cache``, each at
    least GAP from every score, so that samples leave at several exits."""
    exits = list(range(model.num_exits)) if exits is None else exits
    gen = torch.Generator().manual_seed(seed)
    sched = Scheduler(exits, model.info.num_classes)
    with torch.no_grad():
        for p in (sched.w1, sched.w2, sched.b):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    s = ee.scores(cache, sched)
    rng = np.random.default_rng(seed)
    ts = [NEVER_EXIT] * model.num_exits
    for j, k in enumerate(exits):
        v = np.sort(s[:, j])
        lo, hi = np.quantile(v, 0.4), np.quantile(v, 0.9)
        cand = [(a + b) / 2 for a, b in zip(v[:-1], v[1:]) if b - a > 2 * GAP and lo <= a <= hi]
        ts[k] = float(np.float32(rng.choice(cand)))
    sched.requires_grad_(False)
    return ee.Setting(sched, ts)


def run_exits(model: pteenet.EarlyExitModel, x: torch.Tensor, batch: int) -> np.ndarray:
    got = [model.predict(x[i:i + batch]) for i in range(0, len(x), batch)]
    return torch.cat([g.exit_index for g in got]).numpy()


def apply(model: pteenet.EarlyExitModel, setting: ee.Setting) -> None:
    model.set_scheduler(setting.scheduler)
    model.set_thresholds(setting.thresholds, "eenet")


@pytest.mark.parametrize("chained", [False, True])
def test_runtime_takes_the_simulated_exits_at_every_batch_size(chained: bool) -> None:
    model = build("pool-mlp", True, True, exits="all") if chained else make_model()
    x = make_images(40)
    cache = logits_cache(model, x)
    seen: set[int] = set()
    for seed in range(3):
        setting = random_setting(model, cache, seed)
        want = ee.exit_indices(cache, setting)
        seen.update(want.tolist())
        apply(model, setting)
        for batch in (1, 7, len(x)):
            np.testing.assert_array_equal(run_exits(model, x, batch), want, err_msg=f"seed {seed} batch {batch}")
    assert len(seen) >= 3, "the settings should send samples to several exits"


def test_checkpoint_keeps_the_scheduler_and_old_files_load(tmp_path: Path) -> None:
    model = make_model()
    x = make_images(40)
    cache = logits_cache(model, x)
    setting = random_setting(model, cache, 0, exits=[0, 2])
    apply(model, setting)
    model.set_active([True, False, True])
    before = run_exits(model, x, 7)
    pteenet.save_checkpoint(tmp_path / "e.safetensors", model)
    loaded = pteenet.load_checkpoint(tmp_path / "e.safetensors").model
    assert loaded.policy == "eenet" and loaded.scheduler is not None and loaded.scheduler.exits == [0, 2]
    np.testing.assert_array_equal(run_exits(loaded, x, 7), before)
    np.testing.assert_array_equal(before, ee.exit_indices(cache, setting))
    # A file without a scheduler (as every file written before it) loads with none.
    plain = make_model()
    pteenet.save_checkpoint(tmp_path / "p.safetensors", plain)
    again = pteenet.load_checkpoint(tmp_path / "p.safetensors").model
    assert again.scheduler is None and again.policy == plain.policy and "scheduler" not in again.meta


@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime and onnxscript are not installed")
def test_staged_onnx_takes_the_simulated_exits(tmp_path: Path) -> None:
    """An exit after every block, cascade and ensemble: the utilities ride with the other carried values."""
    from pteenet.export.run import ExportConfig, export_model

    model = build("pool-mlp", True, True, exits="all")
    x = make_images(40)
    cache = logits_cache(model, x)
    setting = random_setting(model, cache, 1)
    apply(model, setting)
    want = ee.exit_indices(cache, setting)
    assert len(set(want.tolist())) >= 3
    export_model(model, ExportConfig(output=tmp_path / "o", formats=("staged-onnx",)))
    staged = staged_driver(tmp_path / "o" / "staged_onnx").StagedModel(tmp_path / "o" / "staged_onnx")
    for batch in (1, len(x)):
        got = np.concatenate([staged.run(x[i:i + batch].numpy())[1] for i in range(0, len(x), batch)])
        np.testing.assert_array_equal(got, want, err_msg=f"batch {batch}")


def synthetic_cache(n: int, seed: int, exits: int = 3, classes: int = 5) -> ExitCache:
    """Exits that grow surer and more often right with depth, each sample with its own difficulty;
    the backbone is right on 95%."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    ease = rng.random(n)
    logits = np.zeros((exits, n, classes), np.float32)
    for k in range(exits):
        z = rng.normal(0, 1, (n, classes))
        z[np.arange(n), labels] += 6 * (k + 1) / exits * ease
        logits[k] = z
    final = np.where(rng.random(n) < 0.95, labels, (labels + 1) % classes)
    preds = np.concatenate([logits.argmax(2), final[None]]).astype(np.int32)
    costs = np.append(np.linspace(0.25, 0.75, exits), 1.05)
    return ExitCache(preds, {}, labels, costs, costs, logits=logits)


def test_certified_violation_rate_stays_within_delta() -> None:
    """Monte Carlo: calibrate on draws of 700 samples, measure the certified setting's drop on a
    population of 40,000; at confidence 0.8 at most 20% of draws may break the 2-point target
    (20 draws: 8 or more would happen with probability < 1% if the promise held at 20%)."""
    population = synthetic_cache(40_000, seed=0)
    bb = population.preds[-1] == population.labels
    rng = np.random.default_rng(7)
    over, certified = 0, 0
    for _ in range(20):
        cal = population.take(rng.choice(population.num_samples, 700, replace=False))
        c = ee.certify_eenet(cal, 2.0, 0.8, count=12)
        if c.setting is None:
            continue
        certified += 1
        exits = ee.exit_indices(population, c.setting)
        right = population.preds[exits, np.arange(population.num_samples)] == population.labels
        over += 100 * (bb.mean() - right.mean()) > 2.0
    assert certified >= 15, "the certification should find a setting on most draws"
    assert over < 8


def test_budget_fit_meets_the_budget_or_says_which_it_can() -> None:
    cache = synthetic_cache(600, seed=1)
    setting = ee.fit(cache, 0.6)
    assert ee.evaluate(cache, setting).cost <= 0.6 + ee.BUDGET_SLACK
    with pytest.raises(PteenetError, match="below the cheapest reachable cost 0.2500") as e:
        ee.fit(cache, 0.1)
    assert "at least 0.25" in e.value.hint
    # Every sample alike: the scores cannot tell them apart, so no share of them can leave alone.
    same = ExitCache(cache.preds, {}, cache.labels, cache.costs, cache.costs_paper,
                     logits=np.repeat(cache.logits[:, :1], cache.num_samples, axis=1))
    with pytest.raises(PteenetError, match="cannot meet budget 0.6") as e:
        ee.fit(same, 0.6)
    assert "nearest budget it meets is 1.05" in e.value.hint


def test_too_little_calibration_data_is_refused_naming_the_minimum() -> None:
    small = synthetic_cache(500, seed=2)
    with pytest.raises(PteenetError, match=f"at least {ee.min_calibration()} calibration images"):
        ee.certify_eenet(small, 1.0, 0.9)
    with pytest.raises(PteenetError, match=f"at least {ee.MIN_FIT_SAMPLES} calibration images"):
        ee.sweep_eenet(small.take(np.arange(150)), budget=0.8)


# --- the command ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with the records `pteenet train` leaves: 100 synthetic calibration images."""
    model = make_model()
    model.meta.update(training={"complete": True, "epochs_done": 1}, data={"spec": "synthetic", "val_split": 0.2, "seed": 1, "limit": None})
    path = tmp_path_factory.mktemp("eenet") / "m.safetensors"
    pteenet.save_checkpoint(path, model)
    return path


def test_cli_fits_writes_and_reports(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from helpers import run_cli

    monkeypatch.setattr(ee, "MIN_FIT_SAMPLES", 50)  # the synthetic split holds 100 calibration images
    out, written = tmp_path / "out", tmp_path / "w.safetensors"
    code, stdout, stderr = run_cli("sweep-threshold", checkpoint, "-o", out, "--policy", "eenet", "--budget", 0.8,
                                   "--cost", "macs", "--write", written, "--json")
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert doc == json.loads((out / "sweep.json").read_text())
    chosen = doc["chosen"]
    assert chosen["policy"] == "eenet" and chosen["cost"] <= 0.8 + ee.BUDGET_SLACK
    assert chosen["test"]["policy"] == "eenet" and "backbone" in chosen["test"]
    assert {p["policy"] for p in doc["points"]} == {"eenet"} and len(doc["points"]) == ee.BUDGETS
    model = pteenet.load_checkpoint(written).model
    assert model.policy == "eenet" and model.scheduler is not None
    assert model.thresholds == chosen["threshold"]
    # Shown as a table without --json.
    code, stdout, stderr = run_cli("sweep-threshold", checkpoint, "-o", tmp_path / "o2", "--policy", "eenet",
                                   "--budget", 0.8, "--cost", "macs")
    assert code == 0 and stdout == "" and "eenet" in stderr


@pytest.mark.parametrize(("args", "needle"), [
    (["--max-drop", "1"], f"at least {ee.min_calibration()} calibration images"),
    (["--budget", "0.8", "--per-exit"], "drop --per-exit"),
    (["--max-drop", "0.1", "--per-class"], "--per-class thresholds a score, and eenet is not one"),
    (["--budget", "0.8", "--quantize", "int8"], "not the INT8 programs'"),
])
def test_cli_bad_inputs(checkpoint: Path, tmp_path: Path, args: list[str], needle: str) -> None:
    from helpers import error_line, run_cli

    code, stdout, stderr = run_cli("sweep-threshold", checkpoint, "-o", tmp_path / "o", "--policy", "eenet",
                                   "--cost", "macs", *args)
    assert code == 1 and stdout == "" and needle in error_line(stderr)


@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime and onnxscript are not installed")
def test_int8_export_of_a_model_that_exits_by_eenet_is_refused_as_the_sweep_refuses_it(checkpoint: Path, tmp_path: Path) -> None:
    """Its scheduler and thresholds were fitted on the FP32 exits' logits: refused before anything is
    read or written (no warning, no folder), with the sweep's own message; FP32 and another policy export."""
    from helpers import error_line, run_cli

    model = pteenet.load_checkpoint(checkpoint).model
    apply(model, random_setting(model, logits_cache(model, make_images(40)), 1))
    path = tmp_path / "eenet.safetensors"
    pteenet.save_checkpoint(path, model)
    code, stdout, stderr = run_cli("export", path, "-o", tmp_path / "o", "--format", "staged-onnx", "--quantize", "int8")
    assert code == 1 and stdout == "" and len(stderr.strip().splitlines()) == 1
    line = error_line(stderr)
    assert "not the INT8 programs'" in line and "drop --quantize" in line and not (tmp_path / "o").exists()
    code, _, swept = run_cli("sweep-threshold", checkpoint, "-o", tmp_path / "s", "--policy", "eenet", "--cost", "macs",
                             "--budget", "0.8", "--quantize", "int8")
    assert code == 1 and error_line(swept) == line  # one message for both commands
    code, _, stderr = run_cli("export", path, "-o", tmp_path / "fp32", "--format", "staged-onnx")
    assert code == 0, stderr


def test_survivor_training_refuses_a_model_that_exits_by_eenet() -> None:
    from pteenet.training.config import TrainConfig, check_survivors

    with pytest.raises(PteenetError, match="eenet's learned scheduler") as e:
        check_survivors(TrainConfig(survivors=True), {"sweep": {"chosen": {"policy": "eenet"}}}, "m.safetensors")
    assert "drop --survivors" in e.value.hint
    check_survivors(TrainConfig(survivors=True), {"sweep": {"chosen": {"policy": "max-softmax"}}}, "m.safetensors")
