"""The ``--max-drop`` guarantee: on synthetic exit caches whose true risk is known (measured on a large
population drawn from the same generator), the certified choice breaks its promise in at most about
delta of the draws, for every search mode, where today's rule breaks it far more often; the bounds
are valid p-values and never below the observed risk; the CLI option reaches the JSON document."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from helpers import GRID, SYNTH_COST, SYNTH_EXITS, error_line, run_cli, synthetic_cache
from pteenet.errors import PteenetError
from pteenet.sweep import (
    ExitCache,
    SweepConfig,
    backbone_point,
    bounds,
    certify,
    evaluate,
    recertify,
    restrict,
    select,
    select_exits,
    sweep_global,
)

COST, E = SYNTH_COST, SYNTH_EXITS
GRID_TS = np.round(np.arange(0, 1.0001, 0.01), 4)
DELTA, TARGET = 0.2, 0.02  # a large delta: fewer draws tell a broken promise from a kept one
DRAWS, SAMPLES = 80, 1000


@pytest.fixture(scope="module")
def populations() -> dict[bool, ExitCache]:
    rng = np.random.default_rng(123)
    return {labelled: synthetic_cache(100_000, rng, labelled) for labelled in (True, False)}


def _true_risk(pop: ExitCache, policy: str, ts: list[float], active: list[bool] | None) -> float:
    view = pop if active is None else restrict(pop, active, COST, True)
    return backbone_point(pop).metric - evaluate(view, policy, ts).metric


def _old_rule(cal: ExitCache, policies: list[str], select_mode: bool,
              target: float) -> tuple[str, list[float], list[bool] | None]:
    if select_mode:
        sel = select_exits(cal, COST, True, policies[0], GRID_TS, max_drop=100 * target)
        return sel.point.policy or "", sel.point.thresholds or [], sel.active
    pts = [p for policy in policies for p in sweep_global(cal, policy, GRID_TS)]
    p = select(pts, backbone_point(cal), max_drop=100 * target)
    assert p is not None
    return p.policy or "", p.thresholds or [], None


MODES = {  # name: (policies, per_exit, exit selection, labelled, target)
    "global": (["max-softmax"], False, False, True, TARGET),
    "policies": (["max-softmax", "entropy"], False, False, True, TARGET),
    "select-exits": (["max-softmax"], False, True, True, TARGET),
    "per-exit": (["max-softmax"], True, False, True, TARGET),
    "agreement": (["max-softmax"], False, False, False, 0.1),  # disagreement: a larger risk
}


@pytest.mark.parametrize("mode", MODES)
def test_violation_rate_at_most_delta(mode: str, populations: dict[bool, ExitCache]) -> None:
    policies, per_exit, sel, labelled, target = MODES[mode]
    pop, rng = populations[labelled], np.random.default_rng(7)
    new = old = none = 0
    for _ in range(DRAWS):
        cal = synthetic_cache(SAMPLES, rng, labelled)
        c = certify(cal, policies, GRID_TS, 100 * target, 1 - DELTA, per_exit=per_exit,
                    cost=COST if sel else None, chained=True)
        g = c.guarantee
        assert g.structure_samples == (0 if mode in ("global", "agreement") else round(0.3 * SAMPLES))
        if c.point is None:  # nothing certified: the sweep stops with an error, no promise is made
            none += 1
            continue
        assert g.bound is not None and g.observed is not None and g.observed <= g.bound <= target + 1e-12
        new += _true_risk(pop, c.point.policy or "", c.point.thresholds or [], c.active) > target
        old += _true_risk(pop, *_old_rule(cal, policies, sel, target)) > target
    slack = 2 * math.sqrt(DELTA * (1 - DELTA) / DRAWS)  # two standard errors of the rate
    print(f"{mode}: {new}/{DRAWS} certified choices and {old}/{DRAWS} of today's over the target, {none} none")
    assert none <= DRAWS // 10
    assert new / DRAWS <= DELTA + slack, (new, old)
    # Today's rule on the same draws breaks the promise often: the check above can fail.
    assert old / DRAWS > DELTA + slack, (new, old)


@pytest.mark.parametrize("p_plus,p_minus", [(0.03, 0.02), (0.011, 0.001), (0.2, 0.19)])
def test_drop_pvalue_is_valid_at_the_boundary(p_plus: float, p_minus: float) -> None:
    """Where the true drop equals the target, the p-value falls below delta at most delta of the time."""
    rng, n, delta = np.random.default_rng(0), 1000, 0.1
    counts = rng.multinomial(n, [p_plus, p_minus, 1 - p_plus - p_minus], size=1500)
    p = np.array([bounds.drop_pvalue(int(a), int(b), n, p_plus - p_minus, delta) for a, b, _ in counts])
    assert (p <= delta).mean() <= delta + 2 * math.sqrt(delta * (1 - delta) / len(p))
    assert (p <= 0.5).mean() > 0.3  # and it is not trivially large


def test_drop_pvalue_pays_for_the_discordance_bound() -> None:
    """Berger-Boos: the p-value is what the bound on the discordance rate spent plus the tail, so
    it never falls below that share of delta, even where the data show no drop at all."""
    delta = 0.1
    gamma = bounds.NUISANCE_SHARE * delta
    assert bounds.drop_pvalue(0, 0, 1000, 0.05, delta) == pytest.approx(gamma)
    for a, b in ((3, 40), (10, 10), (25, 5)):
        assert bounds.drop_pvalue(a, b, 1000, 0.02, delta) >= gamma


def test_the_cheapest_certified_setting_is_chosen(populations: dict[bool, ExitCache]) -> None:
    cal = populations[True].take(np.arange(3000))
    c = certify(cal, ["max-softmax"], GRID_TS, 100 * TARGET, 1 - DELTA)
    assert c.point is not None and c.guarantee.certified > 1
    # every threshold the fixed sequence certified, conservative first: the chosen is the cheapest
    ts = np.sort(np.unique(GRID_TS))[::-1][:c.guarantee.certified]
    costs = [evaluate(cal, "max-softmax", [float(t)] * E).cost for t in ts]
    assert c.point.cost == pytest.approx(min(costs)) and c.point.cost < costs[0]


def test_recertify_from_the_record_equals_certifying_from_the_data(populations: dict[bool, ExitCache]) -> None:
    """``export --max-drop`` tests the sweep's stored sequence again at another target: from the
    counts alone it must reach what certify reaches on the data (same structure, same sequence)."""
    for labelled in (True, False):
        cal = populations[labelled].take(np.arange(3000))
        bb = backbone_point(cal)
        rec = _record(certify(cal, ["max-softmax"], GRID_TS, 100 * TARGET, 1 - DELTA), bb)
        rec = json.loads(json.dumps(rec))  # as the checkpoint stores it
        for target in (0.5, 1.0, 3.0, 100 * TARGET):
            direct = certify(cal, ["max-softmax"], GRID_TS, target, 1 - DELTA)
            again, again_rec = recertify(rec, target, E)
            assert again.guarantee.certified == direct.guarantee.certified
            assert again.guarantee.bound == pytest.approx(direct.guarantee.bound) if direct.point else again.point is None
            if direct.point is not None and again.point is not None:
                assert again.point.thresholds == direct.point.thresholds and again.point.cost == pytest.approx(direct.point.cost)
                assert again_rec["target_points"] == pytest.approx(target) and again_rec["bound_points"] <= target
    # With a structure (every policy, exit selection), the same target reproduces the sweep's choice.
    cal = populations[True].take(np.arange(3000))
    c = certify(cal, ["max-softmax", "entropy"], GRID_TS, 100 * TARGET, 1 - DELTA, cost=COST)
    again, _ = recertify(json.loads(json.dumps(_record(c, backbone_point(cal)))), 100 * TARGET, E)
    assert c.point is not None and again.point is not None and again.active == c.active
    assert again.point.thresholds == c.point.thresholds and again.point.policy == c.point.policy
    assert again.guarantee.structure_samples == c.guarantee.structure_samples > 0
    with pytest.raises(PteenetError, match="no certified sequence"):
        recertify({k: v for k, v in rec.items() if k != "sequence"}, 1.0, E)


def _record(c, backbone):  # noqa: ANN001, ANN202 - the sweep document's guarantee section
    from pteenet.sweep.guarantee import record
    return record(c, backbone, None, None)


def test_disagreement_pvalue_is_the_binomial_tail() -> None:
    assert bounds.disagreement_pvalue(7, 500, 0.02) == pytest.approx(stats.binom.cdf(7, 500, 0.02))
    assert bounds.binomial_upper(7, 500, 0.1) == pytest.approx(stats.beta.ppf(0.9, 8, 493))


def test_bound_never_below_the_observed_risk() -> None:
    rng = np.random.default_rng(1)
    for _ in range(60):
        n = int(rng.integers(20, 3000))
        a, b, _ = rng.multinomial(n, rng.dirichlet([1, 1, 8]))
        for labelled in (True, False):
            counts = (int(a), int(b))
            observed = (a - b) / n if labelled else a / n
            ub = bounds.upper_bound(counts, n, 0.1, labelled)
            assert ub >= observed - 1e-12
            # The bound is the smallest certified target: a bit more passes, a bit less does not.
            assert bounds.pvalue(counts, n, ub + 1e-6, 0.1, labelled) <= 0.1
            if ub > observed + 1e-6:
                assert bounds.pvalue(counts, n, ub - 1e-4, 0.1, labelled) > 0.1


def test_confidence_is_checked_and_on_by_default() -> None:
    assert SweepConfig().confidence == 0.9
    assert SweepConfig(confidence=0).confidence == 0
    for bad in (1.0, 0.3, -0.1, math.nan):
        with pytest.raises(PteenetError, match="confidence"):
            SweepConfig(confidence=bad)


def test_cli_confidence_reaches_the_document(trained: Path, tmp_path: Path) -> None:
    docs = {}
    for name, extra in (("default", []), ("c80", ["--confidence", 0.8]), ("off", ["--no-guarantee"])):
        code, stdout, stderr = run_cli("sweep-threshold", trained, "-o", tmp_path / name, "--thresholds", GRID, "--max-drop", 100,
                                    "--policy", "max-softmax", "--cost", "macs", *extra, "--json")  # same costs each run
        assert code == 0, stderr
        docs[name] = json.loads(stdout)
        assert docs[name] == json.loads((tmp_path / name / "sweep.json").read_text())
    assert docs["off"]["guarantee"] is None
    for name, conf in (("default", 0.9), ("c80", 0.8)):
        g = docs[name]["guarantee"]
        assert g["confidence"] == conf and g["target_points"] == 100 and "exchangeable" in g["promise"]
        assert g["bound_points"] >= g["observed_points"] and g["without_guarantee"]["cost"] == docs["off"]["chosen"]["cost"]
    code, _, stderr = run_cli("sweep-threshold", trained, "-o", tmp_path / "txt", "--thresholds", GRID, "--max-drop", 100)
    assert code == 0 and "Certified:" in stderr and "exchangeable" in stderr


def test_cli_says_when_nothing_is_certified(trained: Path, tmp_path: Path) -> None:
    """100 calibration images cannot certify a 1-point drop; without the guarantee a setting is found."""
    code, _, stderr = run_cli("sweep-threshold", trained, "-o", tmp_path / "a", "--thresholds", GRID, "--max-drop", 1)
    assert code == 1 and "certified" in error_line(stderr) and "--no-guarantee" in stderr
    code, _, stderr = run_cli("sweep-threshold", trained, "-o", tmp_path / "b", "--thresholds", GRID, "--max-drop", 1, "--no-guarantee")
    assert code == 0, stderr


def test_report_states_the_certificate_of_the_exported_point(trained: Path, tmp_path: Path) -> None:
    tuned = tmp_path / "tuned.safetensors"
    code, _, stderr = run_cli("sweep-threshold", trained, "-o", tmp_path / "sw", "--thresholds", GRID, "--max-drop", 100,
                           "--policy", "max-softmax", "--write", tuned)
    assert code == 0, stderr
    for args, certified in (([], True), (["--threshold", 0.55, "--policy", "entropy"], False)):
        out = tmp_path / f"export{len(args)}"
        code, _, stderr = run_cli("export", tuned, "-o", out, *args)
        assert code == 0, stderr
        report = json.loads((out / "report.json").read_text())
        md = (out / "report.md").read_text()
        g = report["operating_point"]["guarantee"]
        if certified:
            assert g["confidence"] == 0.9 and "**Guarantee.** Certified:" in md and "exchangeable" in md
        else:  # another point than the certified one carries no promise
            assert g is None and "**No guarantee**" in md
    # export --max-drop tests the sweep's stored sequence again at its own target: still certified
    for drop, ok in ((60, True), (0.001, False)):
        out = tmp_path / f"drop{drop}"
        code, _, stderr = run_cli("export", tuned, "-o", out, "--max-drop", drop)
        if not ok:  # 100 images cannot certify a 0.001-point drop: one error line, nothing written
            assert code == 1 and "certified" in error_line(stderr) and not out.exists()
            continue
        assert code == 0, stderr
        op = json.loads((out / "report.json").read_text())["operating_point"]
        assert op["guarantee"]["target_points"] == 60 and op["guarantee"]["bound_points"] <= 60
        assert "certified" in op["how"] and "**Guarantee.** Certified:" in (out / "report.md").read_text()
    # a sweep without the guarantee stores no sequence: export --max-drop picks, and says it is not certified
    free = tmp_path / "free.safetensors"
    code, _, stderr = run_cli("sweep-threshold", trained, "-o", tmp_path / "sw2", "--thresholds", GRID, "--max-drop", 100,
                           "--policy", "max-softmax", "--no-guarantee", "--write", free)
    assert code == 0, stderr
    code, _, stderr = run_cli("export", free, "-o", tmp_path / "free", "--max-drop", 60)
    assert code == 0 and "**No guarantee**" in (tmp_path / "free" / "report.md").read_text(), stderr
