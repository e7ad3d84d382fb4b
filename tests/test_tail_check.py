"""The no-exit tail checked on the clock (``sweep/choice.py``, ``timing.measure_tail``): where the
measured tail is over ``max_tail`` the sweep tightens the predicted bound and chooses again. The
measurements and profiles here are given (a function of the computed heads; a fixed profile), not
timed, so no choice depends on the machine's load, except one call of the real ``measure_tail``
whose figures are only checked for shape."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import pteenet
from helpers import four_exit_cache, make_images, make_model, run_cli, swept_checkpoint
from pteenet.exits.chain import computed_branches
from pteenet.runtime import timing
from pteenet.runtime.timing import TimeProfile, measure_tail
from pteenet.sweep import ExitCache, SweepConfig
from pteenet.sweep.choice import choose, guard_tail
from pteenet.sweep.run import sweep_points


def _picker(cache: ExitCache, prof: TimeProfile, confidence: float = 0.0) -> Any:
    grid = np.linspace(0, 1, 51)
    points, _ = sweep_points(cache, ["max-softmax"], grid)
    model = SimpleNamespace(chained=False)

    def pick(bound: float) -> Any:
        cfg = SweepConfig(max_drop=0.5 if not confidence else 2.0, select_exits=True, max_tail=bound, confidence=confidence)
        return choose(cache, points, model, ["max-softmax"], grid, cfg, prof)  # type: ignore[arg-type]
    return pick


def test_a_tail_measured_over_the_bound_tightens_it_until_it_holds() -> None:
    cache, prof = four_exit_cache()
    measured: list[int] = []

    def measure(active: list[bool]) -> float:  # the overhead runs 1.5x what the profile predicts
        measured.append(sum(active))
        return 1.0 + 1.5 * (prof.costs(active)[-1] - 1.0)

    for confidence in (0.0, 0.9):  # today's rule and the certified one (the CLI's default) alike
        measured.clear()
        (point, active, _), rec = guard_tail(_picker(cache, prof, confidence), measure, prof, False, 4, 1.2)
        # Bound 1.2 allows 3 heads (1.18x predicted), measured 1.27x; the bound scaled to 1.133x keeps 2.
        assert measured == [3, 2] and active is not None and active.count(True) == 2
        assert [a["computed"] for a in rec["attempts"]] == [3, 2] and rec["held"] is True
        assert rec["attempts"][0]["bound"] == 1.2 and rec["attempts"][1]["bound"] == pytest.approx(1 + 0.2 * 0.18 / 0.27)
        assert rec["attempts"][-1]["measured"] == pytest.approx(1.18) and point is not None and point.accuracy == 1.0


def test_a_tail_measured_as_predicted_keeps_the_first_choice() -> None:
    cache, prof = four_exit_cache()
    pick = _picker(cache, prof)
    (point, active, _), rec = guard_tail(pick, lambda a: prof.costs(a)[-1], prof, False, 4, 1.2)
    assert len(rec["attempts"]) == 1 and rec["held"] and active == pick(1.2)[1]


def test_a_tail_that_never_fits_ends_with_the_backbone_or_says_it_does_not_hold() -> None:
    cache, prof = four_exit_cache()
    # Any computed head measures 1.5x: no exit fits, the bound falls until none is computed.
    (point, active, _), rec = guard_tail(_picker(cache, prof), lambda a: 1.5 if any(a) else 1.0, prof, False, 4, 1.2)
    assert rec["held"] and rec["attempts"][-1]["computed"] == 0 and not any(active or [True])
    assert point is not None and point.cost == pytest.approx(1.0)
    # A fixed 0.1 over every prediction: 3 heads measure 1.28x, then 2 heads 1.22x, and the tries
    # run out over the bound: the record says so.
    (_, active, _), rec = guard_tail(_picker(cache, prof), lambda a: prof.costs(a)[-1] + 0.1, prof, False, 4, 1.2, tries=2)
    assert [a["computed"] for a in rec["attempts"]] == [3, 2] and rec["held"] is False
    assert rec["attempts"][-1]["measured"] == pytest.approx(1.22)


def test_the_sweep_measures_the_tail_it_ships_and_tightens_the_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, ckpt = swept_checkpoint(tmp_path)
    calls: list[int] = []
    e = model.num_exits
    # The profile is given too: timed, a loaded machine can price the heads so dear that the first
    # choice computes none, and nothing is left to measure. Heads at 5% of a stage: all of them fit 1.2.
    given = TimeProfile(batch_size=1, stage_ms=[1.0] * (e + 1), branch_ms=[0.05] * e, backbone_ms=float(e + 1),
                        decision_ms=0.01, machine=timing.machine())
    profiled: list[int] = []

    def profile(model: Any, x: Any, **kw: Any) -> TimeProfile:
        profiled.append(x.shape[0])
        return given

    def fake(model: Any, x: Any, active: list[bool], **kw: Any) -> dict[str, float]:
        n = sum(computed_branches(active, model.chained))
        calls.append(n)
        return {"ratio": 1.0 + 0.25 * n}  # even one computed head measures over 1.2

    monkeypatch.setattr(timing, "measure_tail", fake)
    monkeypatch.setattr(timing, "profile", profile)
    tuned = tmp_path / "tuned.safetensors"
    args = ["sweep-threshold", str(ckpt), "--thresholds", "0:1:0.05", "--max-drop", "100", "--select-exits",
            "--policy", "max-softmax", "--confidence", "0", "--json"]
    code, stdout, stderr = run_cli(*args, "-o", tmp_path / "sw", "--write", tuned)
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert profiled == [1] and TimeProfile.from_dict(doc["cost_model"]["profile"]) == given  # priced with it
    check = doc["cost_model"]["tail_check"]
    # The first choice computes heads and measures over the bound; tightened, none is computed.
    assert calls and calls[0] >= 1 and [a["computed"] for a in check["attempts"] if a["measured"] is not None] == calls
    assert check["held"] and check["attempts"][-1]["computed"] == 0 and check["attempts"][-1]["bound"] < 1.2
    assert "measured 1.250x the backbone" in " ".join(stderr.split())  # the user is told what the tail measured
    saved = pteenet.load(str(tuned))
    assert sum(saved.computed_branches()) == 0 and doc["chosen"]["active_exits"] == saved.active  # what was measured ships
    # Priced in MACs or with a profile from elsewhere, nothing is measured here, and the record says why.
    for extra, words in ((["--cost", "macs"], "MACs"), (["--profile", str(tmp_path / "sw" / "sweep.json")], "profile")):
        calls.clear()
        code, stdout, stderr = run_cli(*args, "-o", tmp_path / "sw2", *extra)
        assert code == 0, stderr
        check = json.loads(stdout)["cost_model"]["tail_check"]
        assert not calls and check["attempts"] == [] and words in check["why"]


def test_measure_tail_times_the_no_exit_path_against_the_backbone() -> None:
    model = make_model()
    before = (list(model.active), list(model.thresholds), model.policy)
    out = measure_tail(model, make_images(1), [True, False, True], budget_s=0.05)
    assert out["ratio"] > 0 and out["rounds"] >= 5 and out["batch_size"] == 1
    assert out["tail_ms"] > 0 and out["backbone_ms"] > 0
    assert (model.active, model.thresholds, model.policy) == before  # the model is left as it was
