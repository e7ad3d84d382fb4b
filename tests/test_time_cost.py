"""The measured cost model (``runtime/timing.py``): time prices, exit selection priced in time, and
``sweep-threshold --cost time``. Prices here are given, not measured (no timed test), except where
only their presence and shape are checked."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import pteenet
from helpers import build, cache_of, four_exit_cache, make_images, run_cli, simulated_exits, swept_checkpoint
from pteenet.runtime.timing import TimeProfile, profile
from pteenet.sweep import certify, restrict, select_exits
from pteenet.sweep.preflight import NO_CRITERION


def test_time_costs_price_heads_decisions_and_compaction() -> None:
    prof = TimeProfile(batch_size=8, stage_ms=[1.0, 2.0, 2.0], branch_ms=[0.5, 0.25], backbone_ms=4.0,
                       decision_ms=0.1, compaction_ms=[0.2, 0.3])
    # exit 0: stage 0 + head 0 + decision; exit 1 adds the compaction after exit 0, stage 1, head 1, decision
    # (ratios to the stages' sum, 5 ms: backbone_ms, one long call, is only recorded)
    assert prof.costs() == pytest.approx([1.6 / 5, (1.6 + 0.2 + 2.0 + 0.35) / 5, (1.6 + 0.2 + 2.35 + 0.3 + 2.0) / 5])
    # head 0 not computed: neither its head, its decision nor a compaction after it
    assert prof.costs([False, True]) == pytest.approx([1.0 / 5, 3.35 / 5, 5.65 / 5])
    assert TimeProfile.from_dict(json.loads(json.dumps(prof.to_dict()))) == prof
    assert prof.ratios([0.5, 0.0, 0.5])["predicted_time_ratio"] == pytest.approx(0.5 * 1.6 / 5 + 0.5 * 6.45 / 5)


def test_profile_records_the_machine_and_every_part() -> None:
    model = build("pool-mlp", True, True)
    prof = profile(model, make_images(4), repeats=1)
    assert prof.backbone_ms and prof.backbone_ms > 0 and prof.decision_ms > 0
    assert len(prof.compaction_ms) == model.num_exits and all(t > 0 for t in prof.compaction_ms)
    assert {"cpu", "threads", "torch", "runtime"} <= set(prof.machine)
    assert profile(model, make_images(1), repeats=1).compaction_ms == []  # batch 1 never compacts


def test_time_priced_selection_drops_the_exits_that_cost_more_than_they_save() -> None:
    model = build("pool-mlp", False, False, exits="all")
    x = make_images(200, seed=13)
    cache = cache_of(model, x)
    cache.labels = cache.preds[-1].astype(np.int64)
    grid = np.linspace(0, 1, 51)
    e = model.num_exits
    # Stages of 1 ms; heads cheap except at exits 2, 5 and 6, which cost as much as 3 stages.
    slow = {2, 5, 6}
    prof = TimeProfile(batch_size=1, stage_ms=[1.0] * (e + 1), branch_ms=[3.0 if k in slow else 0.01 for k in range(e)],
                       backbone_ms=float(e + 1))
    sel = select_exits(cache, prof, model.chained, "max-softmax", grid, max_drop=5.0)
    assert not any(sel.active[k] for k in slow)
    by_macs = select_exits(cache, model.cost, model.chained, "max-softmax", grid, max_drop=5.0)
    assert by_macs.active != sel.active
    # The runtime with that selection takes the exits the time-priced simulation says.
    model.set_active(sel.active)
    for batch in (x, x[:1], x[1:2]):
        pred = model.predict(batch, sel.point.thresholds or [], "max-softmax")
        sim = restrict(cache_of(model, batch), sel.active, prof, model.chained)

        np.testing.assert_array_equal(pred.exit_index.numpy(), simulated_exits(sim, "max-softmax", sel.point.thresholds or []))
    frac = np.bincount(model.predict(x, sel.point.thresholds or [], "max-softmax").exit_index.numpy(), minlength=e + 1) / len(x)
    np.testing.assert_allclose(frac, sel.point.exit_fractions)
    assert sel.point.cost == pytest.approx(float(np.dot(frac, prof.costs(model.computed_branches()))))


def test_sweep_cli_cost_time_records_the_batch_size_and_both_costs(tmp_path: Path) -> None:
    model, ckpt = swept_checkpoint(tmp_path)
    tuned = tmp_path / "tuned.safetensors"
    code, stdout, stderr = run_cli("sweep-threshold", ckpt, "-o", tmp_path / "sw", "--thresholds", "0:1:0.05",
                                 "--max-drop", "100", "--select-exits", "--policy", "max-softmax", "--cost", "time",
                                 "--deploy-batch-size", "4", "--write", tuned, "--json",
                                 "--max-tail", "100")  # what is recorded, not the tail check (measured, load-dependent)
    assert code == 0, stderr
    doc = json.loads(stdout)
    cm = doc["cost_model"]
    assert cm["kind"] == "time" and cm["batch_size"] == 4 and cm["profile"]["batch_size"] == 4
    assert len(cm["profile"]["branch_ms"]) == model.num_exits and cm["profile"]["machine"]["torch"]
    chosen = doc["chosen"]
    assert chosen["time_cost"] == pytest.approx(chosen["cost"]) and 0 < chosen["mac_cost"] != chosen["cost"]
    saved = pteenet.load(str(tuned))
    assert saved.meta["sweep"]["cost_model"]["batch_size"] == 4 and saved.active == chosen["active_exits"]
    code, stdout, stderr = run_cli("info", tuned, columns=200)
    assert code == 0 and "predicted time at batch 4" in stdout + stderr  # info says which the file holds
    code, stdout, stderr = run_cli("export", tuned, "-o", tmp_path / "exp")
    assert code == 0, stderr
    assert "less predicted time at batch 4" in (tmp_path / "exp" / "report.md").read_text()  # the report says which
    code, stdout, stderr = run_cli("sweep-threshold", ckpt, "-o", tmp_path / "sw2", "--cost", "watts")
    assert code == 1 and "cost" in stderr


def test_the_default_prices_in_time_at_batch_1_and_says_so(tmp_path: Path) -> None:
    _, ckpt = swept_checkpoint(tmp_path)
    code, stdout, stderr = run_cli("sweep-threshold", ckpt, "-o", tmp_path / "sw", "--thresholds", "0:1:0.05",
                                 "--max-drop", "100", "--select-exits", "--policy", "max-softmax", "--json")
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert doc["cost_model"]["kind"] == "time" and doc["cost_model"]["batch_size"] == 1
    assert doc["chosen"]["time_cost"] == pytest.approx(doc["chosen"]["cost"])
    assert doc["cost_model"]["max_tail"] == 1.2  # the default bound on what a sample that never leaves pays
    code, stdout, stderr = run_cli("sweep-threshold", ckpt, "-o", tmp_path / "sw2", "--thresholds", "0:1:0.05",
                                 "--max-drop", "100", "--policy", "max-softmax")
    assert code == 0, stderr
    assert "predicted time at batch 1 on this machine" in " ".join(stderr.split())  # the table's reader is told
    assert "no --max-drop or --budget" not in stderr  # a criterion: exits are chosen, nothing to point at


def test_a_sweep_without_a_criterion_says_that_every_exit_decides_on_its_curve(tmp_path: Path) -> None:
    _, ckpt = swept_checkpoint(tmp_path)
    code, stdout, stderr = run_cli("sweep-threshold", ckpt, "-o", tmp_path / "sw", "--thresholds", "0:1:0.05",
                                   "--policy", "max-softmax", "--json")
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert doc["chosen"] is None
    assert NO_CRITERION in doc["notes"]  # in the document, and told to the user in one line
    assert "no --max-drop or --budget: nothing is chosen" in " ".join(stderr.split())
    code, stdout, stderr = run_cli("sweep-threshold", ckpt, "-o", tmp_path / "sw2", "--thresholds", "0:1:0.05",
                                   "--policy", "max-softmax", "--cost", "macs", "--json")
    assert code == 0, stderr
    assert NO_CRITERION not in json.loads(stdout)["notes"]  # in MACs exits are not selected with a criterion either


def test_max_tail_bounds_what_a_sample_that_never_leaves_pays() -> None:
    # Four exits, each the only one sure (and right) about its own fifth of the samples; the last
    # fifth runs to the end. Every exit pays for itself on the mean, so selection keeps all four,
    # and a sample that never leaves pays all four heads: 1.24x.
    cost, prof = four_exit_cache()
    e = cost.num_exits
    grid = np.linspace(0, 1, 51)
    free = select_exits(cost, prof, False, "max-softmax", grid, max_drop=0.5)
    assert free.active == [True] * e and prof.costs()[-1] == pytest.approx(1.24)
    sel = select_exits(cost, prof, False, "max-softmax", grid, max_drop=0.5, max_tail=1.15)
    assert sel.active.count(True) == 2 and prof.costs(sel.active)[-1] <= 1.15
    assert sel.point.accuracy == 1.0  # what leaves still leaves right
    with pytest.raises(pteenet.PteenetError, match="no setting meets"):  # only the backbone has no tail
        select_exits(cost, prof, False, "max-softmax", grid, max_drop=0.5, max_tail=1.0)
    # The certified choice (the default, --confidence 0.9) selects its exits on part of the data:
    # the same bound holds there, or the README's commands would ship a 1.24x tail.
    loose = certify(cost, ["max-softmax"], grid, 2.0, 0.9, cost=prof)
    assert loose.active == [True] * e
    cert = certify(cost, ["max-softmax"], grid, 2.0, 0.9, cost=prof, max_tail=1.15)
    assert cert.point is not None and cert.active is not None and cert.active.count(True) == 2
    assert prof.costs(cert.active)[-1] <= 1.15 and cert.point.accuracy == 1.0
    # Where no set of exits keeps the bound, the certified choice runs none (not all of them).
    none = certify(cost, ["max-softmax"], grid, 2.0, 0.9, cost=prof, max_tail=1.0)
    assert none.active == [False] * e and none.point is not None and none.point.cost == pytest.approx(1.0)


def test_the_default_model_computes_only_the_heads_that_decide() -> None:
    # Unchained by default (no cascade, no ensemble): exit selection priced in time can drop any head.
    model = pteenet.attach(pteenet.AttachConfig(backbone="cifar-resnet20", input_size=(3, 16, 16), exits="all"))
    active = [k % 3 == 0 for k in range(model.num_exits)]
    model.set_active(active)
    assert not model.chained and model.computed_branches() == active


def test_sweep_cli_prices_with_a_profile_measured_before_and_chooses_the_same(tmp_path: Path) -> None:
    _, ckpt = swept_checkpoint(tmp_path)
    args = ["sweep-threshold", str(ckpt), "--thresholds", "0:1:0.05", "--max-drop", "100", "--select-exits",
            "--policy", "max-softmax", "--json"]
    first_code, first_stdout, first_stderr = run_cli(*args, "-o", tmp_path / "a")
    assert first_code == 0, first_stderr
    saved = tmp_path / "a" / "sweep.json"
    again_code, again_stdout, again_stderr = run_cli(*args, "-o", tmp_path / "b", "--profile", saved)
    assert again_code == 0, again_stderr
    a, b = json.loads(first_stdout), json.loads(again_stdout)
    assert b["cost_model"]["profile_file"] == str(saved) and b["cost_model"]["profile"] == a["cost_model"]["profile"]
    assert b["chosen"] == a["chosen"]  # the same prices give the same choice: nothing was timed the second time
    assert str(saved) in b["cost_model"]["note"]  # the reader is told where the prices come from
    legacy = {k: v for k, v in a["cost_model"]["profile"].items() if k != "branch_ms"}
    legacy["head_ms"] = a["cost_model"]["profile"]["branch_ms"]  # profiles written before the key was branch_ms
    (tmp_path / "old_profile.json").write_text(json.dumps({**a, "split": "val", "cost_model": {"profile": legacy}}))  # an old sweep.json
    old_code, old_stdout, old_stderr = run_cli(*args, "-o", tmp_path / "old", "--profile", tmp_path / "old_profile.json")
    assert old_code == 0, old_stderr
    assert json.loads(old_stdout)["chosen"] == a["chosen"]
    wrong = tmp_path / "two_exits.json"
    wrong.write_text(json.dumps(TimeProfile(1, [1.0, 1.0, 1.0], [0.1, 0.1]).to_dict()))
    free = tmp_path / "free_head.json"  # a head left unpriced would look free to exit selection
    free.write_text(json.dumps({**a["cost_model"]["profile"], "branch_ms": [0.0] + a["cost_model"]["profile"]["branch_ms"][1:]}))
    for extra, words in ((["--profile", str(wrong)], "this model has"), (["--profile", str(free)], "does not price the branches of exits [0]"), (["--profile", str(saved), "--cost", "macs"], "prices in time"),
                         (["--profile", str(saved), "--deploy-batch-size", "4"], "measured at batch 1"),
                         (["--profile", str(tmp_path / "none.json")], "no profile file")):
        code, stdout, stderr = run_cli(*args, "-o", tmp_path / "c", *extra)
        assert code == 1 and "Error:" in stderr and words in " ".join(stderr.split()), (extra, stderr)
