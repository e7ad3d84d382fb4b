"""Mutation check of the core modules: does the test suite notice when the code breaks?

Each mutant is one exact textual change (file, old snippet, new snippet) to a copy of the package.
For each, a scratch copy of ``pteenet/`` and ``tests/`` gets the change and the tests that cover that
code run on it (``pytest -x -q``, with a timeout); a failing (or hanging) run kills the mutant. The
script refuses to start unless every snippet occurs exactly once, and first runs every selected
test on the unchanged copy (a test that fails there would "kill" every mutant).

    python benchmarks/mutation.py                  # all mutants -> benchmarks/results/mutation.json
    python benchmarks/mutation.py --only M01 M07   # rerun a few; their entries in the file are replaced

A surviving mutant is listed with why it is equivalent (``EQUIVALENT``), or gets a test that kills it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "mutation.json"

P = "tests/test_promises.py"
H = "tests/test_branches.py"
R = "tests/test_runtime.py"
S = "tests/test_sweep.py"
G = "tests/test_guarantee.py"
SCORES = f"{P}::test_scores_equal_the_formulas_of_the_readme"
PUBLISHED = f"{P}::test_the_published_state_dict_module_format_loads"
INACTIVE = (f"{H}::test_inactive_exits_never_decide_and_their_branches_are_skipped", f"{H}::test_attach_exits_all_and_branch_costs")
SELECTION = (f"{H}::test_exit_selection_drops_exits_without_losing_the_point",
             f"{H}::test_exit_selection_by_budget_is_never_worse_than_every_exit",
             f"{H}::test_exit_selection_by_budget_keeps_accuracy_before_cost")
HEADS = f"{H}::test_runtime_equals_simulation_for_every_branch_type"
ROUND_TRIP = f"{H}::test_checkpoint_round_trip_keeps_branches_ensemble_and_active"


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str  # under pteenet/
    old: str
    new: str
    description: str
    tests: tuple[str, ...]  # pytest arguments: files or node ids


M = Mutant
MUTANTS: list[Mutant] = [
    # -- runtime (real early exit) --
    M("M01", "runtime/model.py", "if stages.shrinkable:", "if False:",
      "the batch never shrinks: every row runs every stage", (f"{P}::test_samples_that_leave_stop_computing",)),
    M("M02", "runtime/model.py", "            if not self.active[k]:\n                continue\n            t = thresholds[k]",
      "            t = thresholds[k]",
      "batch 1: inactive exits decide too",
      (*INACTIVE, f"{H}::test_cond_program_with_ensemble_and_inactive_exits_equals_eager")),
    M("M03", "runtime/model.py", "if not self.active[k] or (sched is not None and k not in sched.slot):",
      "if sched is not None and k not in sched.slot:", "batched: inactive exits decide too", (*INACTIVE, *SELECTION)),
    M("M04", "runtime/model.py", "out_logits[rows[leave]] = logits[leave]", "out_logits[:len(leave)][leave] = logits[leave]",
      "answers written at the running batch's positions, not the original rows", (R,)),
    M("M05", "runtime/model.py", "exit_index[rows[leave]] = k", "exit_index[rows[leave]] = min(k + 1, self.num_exits)",
      "the reported exit index is off by one", (R,)),
    M("M06", "runtime/model.py", "carry = carry.select(keep)", "carry = carry",
      "the carried cascade/ensemble values keep the rows that left", (HEADS,)),
    # -- policies --
    M("M07", "exits/policies.py", "return torch.log_softmax(logits.float(), dim=1).max(1).values.exp()",
      "return torch.log_softmax(logits.float(), dim=1).max(1).values.exp().sqrt()",
      "max-softmax: the square root of the top probability", ("tests/test_policies.py", SCORES)),
    M("M08", "exits/policies.py", "ent = -(logp.exp() * logp).sum(1) / math.log(max(logits.shape[1], 2))",
      "ent = -(logp.exp() * logp).sum(1)", "entropy left unnormalised", ("tests/test_policies.py", SCORES)),
    M("M09", "exits/policies.py", "return torch.sigmoid(conf_logit.float().reshape(-1))",
      "return torch.sigmoid(2 * conf_logit.float().reshape(-1))", "confidence: sigmoid of twice the logit",
      ("tests/test_policies.py", SCORES)),
    M("M10", "exits/policies.py", 'Policy("max-softmax", _max_softmax, ">=",', 'Policy("max-softmax", _max_softmax, ">",',
      "max-softmax: equality no longer leaves", ("tests/test_policies.py",)),
    M("M11", "exits/policies.py", "never_exit=-1.0", "never_exit=0.0", "entropy's never-exit threshold lets 0 leave",
      ("tests/test_policies.py",)),
    # -- cost --
    M("M12", "tracing/cost.py", "passed += e.branch_macs if c else 0", "passed += e.branch_macs",
      "re-pricing ignores which heads are computed", (*INACTIVE, *SELECTION, "tests/test_cost.py")),
    M("M13", "tracing/cost.py", "(prefix + passed) / total, (prefix + b) / total", "(prefix + b) / total, (prefix + b) / total",
      "cumulative cost counts only the own branch", ("tests/test_cost.py",)),
    M("M14", "tracing/cost.py", "return 1.0 + sum(e.branch_macs for e in self.exits) / self.backbone_macs", "return 1.0",
      "running to the end costs no branches", ("tests/test_cost.py",)),
    M("M15", "tracing/cost.py", "return batch * (lq * e * e + lk * (m.kdim + m.vdim) * e + 2 * lq * lk * e + lq * e * e)",
      "return batch * (lq * e * e + lk * (m.kdim + m.vdim) * e + lq * lk * e + lq * e * e)",
      "attention counts one of its two matmuls", ("tests/test_transformers.py",)),
    M("M16", "tracing/cost.py", "self.macs[n.name] = int(fc.get_total_flops()) // 2",
      "self.macs[n.name] = int(fc.get_total_flops())", "flop-counter nodes counted as FLOPs, not MACs",
      ("tests/test_cost.py", "tests/test_transformers.py")),
    M("M17", "tracing/cost.py", '"linear": lambda i, n: (i + 1) / (n + 1),', '"linear": lambda i, n: (i + 1) / n,',
      "linear placement spreads over n, not n + 1 gaps", ("tests/test_cost.py",)),
    M("M18", "tracing/cost.py", "self.macs[n.name] = ruled_macs(module, args, kwargs, out) or 0",
      "self.macs[n.name] = 0", "modules with a thop rule count nothing", ("tests/test_cost.py",)),
    # -- selection and the sweep engine --
    M("M19", "sweep/selection.py", "if score > _objective(current, by_budget):", "if score >= _objective(current, by_budget):",
      "removals that change nothing are no longer taken", SELECTION),
    M("M20", "sweep/selection.py", "return (-p.metric, p.cost) if by_budget else (p.cost, -p.metric)",
      "return (p.cost, -p.metric)", "budget mode minimises cost instead of maximising accuracy", SELECTION),
    M("M21", "sweep/selection.py", "scores = {p: np.where(mask[:, None], s, np.nan).astype(np.float32)",
      "scores = {p: s.astype(np.float32)", "switched-off exits still decide in the simulation", SELECTION),
    M("M22", "sweep/selection.py", "np.asarray(cost.costs(computed_branches(mask, chained)))", "np.asarray(cost.costs())",
      "selection prices every head, computed or not", (*INACTIVE, *SELECTION)),
    M("M23", "evaluation/engine.py", "target = backbone.metric - max_drop / 100.0", "target = backbone.metric - max_drop / 10.0",
      "max_drop read as tenths, not points", (S,)),
    M("M24", "evaluation/engine.py", "return max((p for p in points if p.cost <= budget + _EPS)",
      "return max((p for p in points if p.cost <= budget + 0.1)", "the budget allows 0.1 over", (S,)),
    M("M25", "evaluation/engine.py", "for k in range(mask.shape[0] - 1, -1, -1):", "for k in range(mask.shape[0]):",
      "a sample leaves at the last passing exit, not the first", (S, R)),
    M("M26", "evaluation/engine.py", "run = (np.fmax if high else np.fmin).accumulate(s, axis=0) if e else s", "run = s",
      "sweep_global forgets samples that left earlier", (S,)),
    M("M27", "evaluation/engine.py", "if not front or p.metric > front[-1].metric:", "if not front or p.metric >= front[-1].metric:",
      "the Pareto front keeps ties", (S,)),
    M("M28", "evaluation/engine.py", "ok = cost <= budget + _EPS", "ok = cost <= budget + 1.0",
      "per-exit search ignores the budget", (S,)),
    M("M29", "evaluation/engine.py", 'return p.high_leaves, "left" if p.inclusive == p.high_leaves else "right"',
      'return p.high_leaves, "right" if p.inclusive == p.high_leaves else "left"',
      "sweep_global treats a score equal to the threshold the wrong way", (S,)),
    # -- cascade and ensemble --
    M("M30", "exits/cascade.py", "p = prev.detach().float()", "p = prev.float()",
      "the cascade input is not detached: gradients reach the previous head", (f"{P}::test_no_gradient_reaches_the_previous_head_through_the_next",)),
    M("M31", "exits/chain.py", "prev=head if branch.cascade else None, acc=acc)",
      "prev=None, acc=acc)", "a cascade head never sees the previous head",
      (HEADS, f"{H}::test_feature_cache_rows_give_the_same_outputs", f"{P}::test_a_cascade_head_reads_the_previous_heads_logits")),
    M("M32", "exits/chain.py", "w = self._inference_weights()[k:, k].to(logp.dtype)",
      "w = self.weights()[k:, 0].to(logp.dtype)", "the ensemble weights head 0's column for every head",
      (f"{H}::test_ensemble_is_fitted_non_negative_and_helps", HEADS,
       f"{P}::test_each_exit_answers_with_its_row_of_the_ensemble_weights")),
    M("M33", "exits/chain.py", "return F.softplus(self.raw).tril()", "return F.softplus(self.raw)",
      "the ensemble fit lets an exit see later heads", (f"{H}::test_ensemble_is_fitted_non_negative_and_helps", HEADS)),
    M("M34", "training/run.py", "model.set_ensemble(fit_ensemble_on(model, val_src,",
      "model.set_ensemble(fit_ensemble_on(model, train_src,", "the ensemble is fitted on the training split", (f"{P}::test_the_ensemble_is_fitted_on_the_calibration_split",)),
    M("M35", "exits/chain.py", "return [k <= last and (bool(a) or chained) for k, a in enumerate(active)]",
      "return [k <= last for k, a in enumerate(active)]", "inactive heads computed without a cascade or ensemble", INACTIVE),
    M("M36", "exits/chain.py", "last = max((k for k, a in enumerate(active) if a), default=-1)",
      "last = len(active) - 1", "heads after the last active exit computed", INACTIVE),
    # -- checkpoint and weights --
    M("M37", "runtime/checkpoint.py", 'if tensors_sha256(bb_sd) != meta["backbone_sha256"]:', "if False:",
      "a tampered backbone loads", ("tests/test_checkpoint.py",)),
    M("M38", "runtime/checkpoint.py", 'model.set_active(meta.get("active_exits"))', "model.set_active(None)",
      "the exit selection is lost on load", (ROUND_TRIP,)),
    M("M39", "runtime/checkpoint.py", 'if meta.get("ensemble"):', "if False:", "the ensemble is lost on load", (ROUND_TRIP,)),
    M("M40", "backbones/weights.py", 'obj = torch.load(str(path), map_location="cpu", weights_only=True)',
      'obj = torch.load(str(path), map_location="cpu", weights_only=False)', "torch files are unpickled", (f"{P}::test_a_pickle_that_runs_code_is_refused",)),
    M("M41", "backbones/weights.py", 'if sd and all(k.startswith("module.") for k in sd):', "if False:",
      "the DataParallel prefix is kept", (PUBLISHED,)),
    M("M42", "backbones/weights.py", 'for key in ("state_dict", "model", "model_state_dict"):',
      'for key in ("model", "model_state_dict"):', "the {'state_dict': ...} wrapper is not unwrapped", (PUBLISHED,)),
    # -- resume --
    M("M43", "distributed.py", '    if not group.main:\n        torch.set_rng_state(state[f"rng.cpu.rank{group.rank}"])',
      '    if False:\n        torch.set_rng_state(state[f"rng.cpu.rank{group.rank}"])',
      "restore_rank_rng is a no-op", ("tests/test_distributed.py",)),
    M("M44", "training/step.py", '    order.set_state(st["rng.order"])\n', "", "the data order's RNG is not restored",
      ("tests/test_train.py",)),
    M("M45", "training/run.py", 'start_epoch = int(resume_state["epoch"]) if resume_state is not None else 0',
      "start_epoch = 0", "a resume starts over from epoch 0", ("tests/test_train.py",)),
    M("M46", "training/config.py", 'diffs = asked.resume_diffs(was_cfg) + data_cfg.resume_diffs(was_data, "data.")',
      "diffs = []", "a resume with other settings is accepted", ("tests/test_train.py",)),
    # -- export with an ensemble --
    M("M47", "export/programs.py", "for logits, conf in zip(a.exit_logits, a.exit_conf):",
      "for logits, conf in zip(a.heads, a.exit_conf):", "the static program answers with each head, not the ensemble", (f"{P}::test_the_static_program_with_an_ensemble_equals_eager",)),
    M("M56", "runtime/model.py", 'if all(computed) or self.runtime != "staged":', "if True:",
      "the backbone is cut at every exit, computed or not", (f"{P}::test_the_runtime_cuts_the_backbone_only_where_a_branch_is_computed",)),
    M("M57", "sweep/guarantee.py", "max_drop=max_drop, max_tail=max_tail)", "max_drop=max_drop)",
      "the certified exit selection ignores --max-tail", ("tests/test_time_cost.py::test_max_tail_bounds_what_a_sample_that_never_leaves_pays",)),
    M("M60", "sweep/guarantee.py", "                    active = [False] * part.num_exits", "                    pass",
      "where no set of exits keeps the tail bound, the certified choice keeps every exit",
      ("tests/test_time_cost.py::test_max_tail_bounds_what_a_sample_that_never_leaves_pays",)),
    # -- ONNX Runtime pricing: the profile of the staged program's parts --
    M("M61", "runtime/ort_timing.py", "max(med[(\"stage\", k)] - call, 0.0)", "med[(\"stage\", k)]",
      "the ONNX Runtime profile leaves every call's fixed cost in the stages (the reference grows by one call per stage)",
      ("tests/test_ort_profile.py",)),
    M("M62", "runtime/ort_timing.py", "                if computed[k]:\n                    head_s[k]", "                if True:\n                    head_s[k]",
      "the ONNX Runtime profile prices heads that the runtime never computes", ("tests/test_ort_profile.py",)),
    M("M63", "runtime/timing.py", "if unpriced := [k for k, h in enumerate(prof.branch_ms) if h <= 0]:",
      "if unpriced := [k for k, h in enumerate(prof.branch_ms) if h < 0]:",
      "--profile accepts a profile that leaves a branch unpriced (exit selection takes it as free)",
      ("tests/test_time_cost.py::test_sweep_cli_prices_with_a_profile_measured_before_and_chooses_the_same",)),
    # -- the measured tail, the lean batch-1 step, flat stages --
    M("M64", "sweep/choice.py", "if measured <= max_tail or predicted <= 1.0 or attempt == tries - 1:",
      "if True:", "the sweep measures the tail but never tightens the bound when it is over",
      ("tests/test_tail_check.py",)),
    M("M65", "sweep/choice.py", "bound = max(1.0, min(1.0 + (max_tail - 1.0) * (predicted - 1.0) / (measured - 1.0), predicted - 1e-6))",
      "bound = max(1.0, predicted - 1e-6)", "the bound shrinks by a hair, not by the measured overhead",
      ("tests/test_tail_check.py",)),
    M("M66", "sweep/choice.py", "whole = chosen if chosen is not None and not tail_breaks(", "whole = chosen if chosen is not None and tail_breaks(",
      "the point with every exit deciding escapes the tail bound", ("tests/test_tail_check.py", "tests/test_time_cost.py")),
    M("M67", "exits/lean.py", "return (id(folded), folded is not None and folded.current(), tap.shape, tap.dtype, tap.device)",
      "return (id(folded), tap.shape, tap.dtype, tap.device)", "the batch-1 step keeps answering with the weights it was built with",
      ("tests/test_lean.py",)),
    M("M68", "exits/lean.py", "ops.append(torch.relu_ if op.inplace else torch.relu)", "pass",
      "the batch-1 step skips the hidden layer's ReLU", ("tests/test_lean.py",)),
    M("M69", "exits/policies.py", "return 1e-6 * (k + 4 + size)", "return 1e-9 * (k + 4 + size)",
      "the batch-1 decision trusts its float64 score right up to the threshold", ("tests/test_policies.py",)),
    M("M70", "runtime/model.py", "leave = rule.leaves_one(logits, conf, t)",
      "leave = bool(rule.passes(rule.score(logits, conf), t))",
      "the batch-1 runtime decides through the tensor ops again (right, slower)", ("tests/test_policies.py",)),
    M("M71", "exits/policies.py", "return (1.0 / (1.0 + math.exp(-c)) if c >= 0 else math.exp(c) / (1.0 + math.exp(c))), abs(c)",
      "return (1.0 / (1.0 + math.exp(-c)) if c >= 0 else 1.0 / (1.0 + math.exp(c))), abs(c)",
      "the batch-1 confidence score is wrong for negative logits", ("tests/test_policies.py",)),
    # -- same inputs, same bits: pooling plans a clock chooses, what a resume checks --
    M("M72", "exits/branches.py", '"rows": _pool_rows, "nhwc": _pool_nhwc}',
      '"rows": _pool_rows, "nhwc": _pool_nhwc, "rows-first": lambda x, k: ('
      "x.reshape(*x.shape[:2], x.shape[2] // k[0], k[0], x.shape[3]).sum(3).reshape(*x.shape[:2], x.shape[2] // k[0], "
      'x.shape[3] // k[1], k[1]).sum(4) / (k[0] * k[1]), F.max_pool2d(x, k))}',
      "a pooling plan that sums whole rows first (faster, other rounding) may be timed fastest",
      (f"{H}::test_every_pooling_plan_gives_the_same_bits_whatever_the_batch",
       "tests/test_train.py::test_the_pooling_plan_a_clock_picks_cannot_change_what_training_learns")),
    M("M73", "training/step.py", "if was is not None and was != now[key]:", "if False:",
      "a resume on another CPU, torch or thread count says nothing",
      ("tests/test_resume_anywhere.py::test_resume_on_another_cpu_or_torch_says_it_may_differ",
       "tests/test_resume_anywhere.py::test_resume_on_another_thread_count_says_it_may_differ")),
    # -- the guarantee: p-values, the fixed sequence, the structure split, the choice --
    M("M48", "sweep/guarantee.py", "if bounds.pvalue(c, n, target, delta, labelled) > delta:\n            return i",
      "if bounds.pvalue(c, n, target, delta, labelled) > delta:\n            continue",
      "fixed-sequence testing goes on past a hypothesis it could not reject", (G,)),
    M("M49", "sweep/guarantee.py", "part, rest = cache.take(part_rows), cache.take(rest_rows)",
      "part, rest = cache, cache", "the structure is chosen on the samples that certify it", (G,)),
    M("M50", "sweep/bounds.py", "tail = max(_trinomial_tail(", "tail = min(_trinomial_tail(",
      "the drop's p-value takes the least conservative discordance rate", (G,)),
    M("M51", "sweep/bounds.py", "return float(special.bdtr(k, n, target)) if n else 1.0",
      "return float(special.bdtr(k, n, 1.5 * target)) if n else 1.0",
      "the disagreement p-value tests a target half again as large", (G,)),
    M("M52", "sweep/bounds.py", "special.betaincinv(k + 1, n - k, 1.0 - alpha)", "special.betaincinv(k + 1, n - k, alpha)",
      "the upper Clopper-Pearson bound is the lower one", (G,)),
    M("M53", "sweep/guarantee.py", "key=lambda i: (-priced[i][0], i))", "key=lambda i: (priced[i][0], i))",
      "the sequence tests the cheapest (most aggressive) settings first", (G,)),
    M("M54", "sweep/guarantee.py", "i = min(range(done), key=lambda i: (tested[i][0].cost, -tested[i][0].metric, i))",
      "i = 0", "the most conservative certified setting is chosen, not the cheapest", (G,)),
    M("M55", "sweep/bounds.py", "return min(1.0, gamma + tail)", "return min(1.0, tail)",
      "the drop's p-value forgets what the discordance bound spent", (G,)),
    M("M58", "sweep/guarantee.py", "target=max_drop / 100.0, bound=None,", 'target=float(rec["target_points"]) / 100.0, bound=None,',
      "export --max-drop re-tests the sweep's sequence at the sweep's target, not its own", (G,)),
    M("M59", "export/run.py", "    certified = _recertified(model, sweep, cfg)\n", "    certified = None\n",
      "export --max-drop picks without the guarantee although the sweep stored its sequence",
      (f"{G}::test_report_states_the_certificate_of_the_exported_point",)),
]

# Survivors that are equivalent: the same observable behaviour, so no test can kill them.
EQUIVALENT: dict[str, str] = {
}


def stale(mutants: list[Mutant]) -> list[str]:
    """What no longer applies: a snippet that does not occur exactly once in its file, a listed test
    file or test function that is gone (tests/test_mutation.py checks this on every test run)."""
    bad = []
    for m in mutants:
        n = (ROOT / "pteenet" / m.file).read_text().count(m.old)
        if n != 1:
            bad.append(f"{m.id}: {m.file}: the snippet occurs {n} times: {m.old!r}")
        for t in m.tests:
            file, _, name = t.partition("::")
            path = ROOT / file
            if not path.is_file() or (name and f"def {name.split('[')[0]}(" not in path.read_text()):
                bad.append(f"{m.id}: no test {t}")
    return bad


def check_snippets(mutants: list[Mutant]) -> None:
    if bad := stale(mutants):
        sys.exit("mutants that no longer apply (fix the snippet to the code as it is now):\n" + "\n".join(bad))


def scratch_copy() -> Path:
    d = Path(tempfile.mkdtemp(prefix="pteenet-mutation-"))
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    shutil.copytree(ROOT / "pteenet", d / "pteenet", ignore=ignore)
    shutil.copytree(ROOT / "tests", d / "tests", ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", d / "pyproject.toml")
    return d


def run_tests(tree: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, int | None, float, str]:
    """(outcome, return code, seconds, the failing test or the tail of the output)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "killed (timeout)", None, time.perf_counter() - t0, f"no result within {timeout:g} s"
    secs = time.perf_counter() - t0
    lines = (r.stdout + r.stderr).strip().splitlines()
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    detail = failed[0] if failed else (lines[-1] if lines else "")
    if r.returncode == 0:
        return "survived", 0, secs, detail
    if r.returncode in (1, 2):  # failures, or a collection error the mutant caused
        return "killed", r.returncode, secs, detail[:300]
    raise SystemExit(f"pytest could not run {tests} (exit {r.returncode}): {detail}")


def write(results: list[dict], load_before: tuple[float, ...], seconds: float, complete: bool) -> None:
    """The results file: ``results`` replace their ids' entries, the other mutants' entries stay
    (a rerun of a few with ``--only``); rewritten after every mutant, so a stopped run keeps its part."""
    order = {m.id: i for i, m in enumerate(MUTANTS)}
    mine = {r["id"] for r in results}
    kept = [r for r in json.loads(OUT.read_text())["results"] if r["id"] not in mine and r["id"] in order] if OUT.exists() else []
    merged = sorted(kept + results, key=lambda r: order[r["id"]])
    for r in merged:  # explanations may have been added since an entry was run
        r.pop("equivalent", None)
        if r["outcome"] == "survived":
            r["equivalent"] = EQUIVALENT.get(r["id"], "NOT EXPLAINED: needs a test")
    killed = sum(r["outcome"].startswith("killed") for r in merged)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    doc = {"script": "benchmarks/mutation.py", "commit": commit, "python": sys.version.split()[0],
           "torch": __import__("torch").__version__, "cpus": os.cpu_count(),
           "load_average_before": load_before, "load_average_after": os.getloadavg(), "seconds_this_run": round(seconds),
           "complete": complete and len(merged) == len(MUTANTS), "mutants": len(merged), "killed": killed,
           "kill_rate": round(killed / max(len(merged), 1), 4),
           "survivors": [{"id": r["id"], "description": r["description"], "equivalent": r["equivalent"]}
                         for r in merged if r["outcome"] == "survived"],
           "results": merged}
    OUT.write_text(json.dumps(doc, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="mutant ids, whose entries replace those in the results file")
    ap.add_argument("--timeout", type=float, default=420.0, help="seconds per mutant run")
    ap.add_argument("--no-baseline", action="store_true", help="skip the run on the unchanged copy")
    args = ap.parse_args()
    mutants = [m for m in MUTANTS if not args.only or m.id in args.only]
    assert len({m.id for m in MUTANTS}) == len(MUTANTS), "duplicate mutant ids"
    check_snippets(mutants)
    tree = scratch_copy()
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    results: list[dict] = []
    try:
        if not args.no_baseline:
            tests = tuple(sorted({t for m in mutants for t in m.tests}))
            outcome, rc, secs, detail = run_tests(tree, tests, 3 * args.timeout)
            print(f"baseline ({len(tests)} test selections): {outcome} in {secs:.0f} s", flush=True)
            if outcome != "survived":
                raise SystemExit(f"the unchanged code fails its tests: {detail}")
        for m in mutants:
            path = tree / "pteenet" / m.file
            original = path.read_text()
            path.write_text(original.replace(m.old, m.new, 1))
            try:
                outcome, rc, secs, detail = run_tests(tree, m.tests, args.timeout)
            finally:
                path.write_text(original)
            results.append({"id": m.id, "file": f"pteenet/{m.file}", "description": m.description, "old": m.old,
                            "new": m.new, "tests": list(m.tests), "outcome": outcome, "seconds": round(secs, 1),
                            "detail": detail})
            print(f"{m.id} {outcome:<17} {secs:6.1f} s  {m.file}: {m.description}  [{detail[:120]}]", flush=True)
            write(results, load_before, time.perf_counter() - t_start, m is mutants[-1])
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    killed = sum(r["outcome"].startswith("killed") for r in results)
    print(f"this run: killed {killed} of {len(results)}; wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
