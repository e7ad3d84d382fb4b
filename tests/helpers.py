"""What several test modules share: the tiny test model and its simulated exits, the CLI runner,
the one check of a one-line error, and a sink that presses Ctrl-C (no test module imports another;
fixtures are in conftest.py)."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
from typer.testing import CliRunner

import pteenet
from pteenet.cli import app
from pteenet.exits import policies as pol
from pteenet.exits.chain import fit_ensemble
from pteenet.progress import Sink, Task
from pteenet.runtime.timing import TimeProfile
from pteenet.sweep import ExitCache, ExitCacheBuilder
from pteenet.tracing.cost import CostTable, ExitCost


def run_cli(*args: object, columns: int | None = None) -> tuple[int, str, str]:
    """``pteenet ARGS...`` in-process: (exit code, stdout, stderr); ``columns``: the terminal's width."""
    result = CliRunner().invoke(app, [str(a) for a in args], env=None if columns is None else {"COLUMNS": str(columns)})
    return result.exit_code, result.stdout, result.stderr


GRID = "0:1:0.05"  # a coarse threshold grid keeps every sweep fast


def conv2_model(seed: int = 0) -> pteenet.EarlyExitModel:
    """cifar-resnet20 at 16x16 with 3 of the paper's conv2 branches: dear enough that the sweep's
    budget and cost checks have work to do."""
    torch.manual_seed(seed)
    return pteenet.attach(pteenet.AttachConfig(backbone="cifar-resnet20", input_size=(3, 16, 16), exits=3, branch="conv2",
                                               cascade=False))


def error_line(stderr: str) -> str:
    """The bad-input promise: one ``Error: ...`` line, last on stderr, and before it at most
    ``Warning: ...`` / ``Note: ...`` lines (no traceback, no second error, nothing else); returns it."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("Error: "), stderr
    assert all(line.startswith(("Warning: ", "Note: ")) for line in lines[:-1]), stderr
    return lines[-1]


TIE_GAP = 1e-4  # thresholds stay this far from every score: batch shape may move a score by an ulp


def assert_logits_close(got: torch.Tensor, want: torch.Tensor, rel: float = 3e-4) -> None:
    """Equal up to float32 noise: 3e-4 relative to the largest logit. The random backbone's logits
    reach ~30, and a different batch shape may sum them in a different order (oneDNN picks kernels
    by shape), which moves small logits by more than 1e-5 in absolute terms; the heads' BatchNorm
    over pooled features of a random backbone (some nearly constant) amplifies that noise further."""
    torch.testing.assert_close(got, want, atol=rel * max(1.0, float(want.abs().max())), rtol=0)


def make_model(seed: int = 0) -> pteenet.EarlyExitModel:
    """The tiny test model: cifar-resnet20 at 16x16 with 3 exits whose branches are randomised so
    that the exits really differ (fresh branches all output about the same near-uniform logits)."""
    # Seeded here: module-scoped fixtures run before conftest's per-test seed, so the global RNG
    # (which initialises the heads) would otherwise depend on which tests ran first.
    torch.manual_seed(seed)
    model = pteenet.attach(pteenet.AttachConfig(backbone="cifar-resnet20", input_size=(3, 16, 16), exits=3))
    perturb(model, seed)
    return model


def build(branch: str, cascade: bool, ensemble: bool, exits: int | str = 3, seed: int = 0) -> pteenet.EarlyExitModel:
    torch.manual_seed(seed)
    model = pteenet.attach(pteenet.AttachConfig(backbone="cifar-resnet20", input_size=(3, 16, 16), exits=exits, branch=branch,
                                                cascade=cascade))
    perturb(model, seed)
    if ensemble:
        x = make_images(64, seed=5)
        with torch.no_grad():
            out = model.forward_all(x)
        model.set_ensemble(fit_ensemble(out.heads, out.final_logits.argmax(1), steps=30))
    return model


def perturb(model: pteenet.EarlyExitModel, seed: int) -> None:
    """Calibrate the branches' BN statistics on random images, then give each head random weights
    scaled to its features, so every policy's scores spread over (0, 1) and differ per exit."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, *model.info.preprocess.input_size, generator=gen)
    bns = [m for m in model.branches.modules() if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d))]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: one pass gives the batch's statistics
    pooled: dict[int, torch.Tensor] = {}
    # What the heads read, whatever the branch type: the classifier's input.
    hooks = [b.classifier.register_forward_pre_hook(lambda mod, args, k=k: pooled.__setitem__(k, args[0]))
             for k, b in enumerate(model.branches)]
    model.train()
    with torch.no_grad():
        model.forward_all(x)
    model.eval()
    for h in hooks:
        h.remove()
    for m in bns:
        m.momentum = 0.1
        # A random backbone leaves some pooled features constant; BatchNorm would then divide by
        # sqrt(eps) and blow float noise up 300-fold. Floor the variance as training data would.
        m.running_var.clamp_(min=1e-2 * float(m.running_var.mean()))
    with torch.no_grad():
        for k, b in enumerate(model.branches):
            z = pooled[k]
            mu, sd = z.mean(0), z.std(0) + 1e-3
            for lin, spread in ((b.classifier, 1.0 + k), (b.confidence, 2.0)):
                w = torch.randn(lin.weight.shape, generator=gen) * spread / (sd * z.shape[1] ** 0.5)
                lin.weight.copy_(w)
                lin.bias.copy_(-(w @ mu))


def make_images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def cache_of(model: pteenet.EarlyExitModel, x: torch.Tensor) -> ExitCache:
    builder = ExitCacheBuilder()
    with torch.no_grad():
        a = model.forward_all(x)
    builder.add(a.exit_logits, a.exit_conf, a.final_logits)
    assert model.cost is not None
    return builder.build(model.cost.costs(), model.cost.costs_paper())


def simulated_exits(cache: ExitCache, policy: str, thresholds: list[float]) -> np.ndarray:
    """First exit whose score passes (policies.passes), else E: what the sweep assumes."""
    s = cache.scores[policy]
    passed = np.stack([pol.passes(policy, s[k], float(t)) for k, t in enumerate(thresholds)])
    return np.where(passed.any(0), passed.argmax(0), cache.num_exits)


def random_thresholds(cache: ExitCache, policy: str, rng: np.random.Generator) -> list[float]:
    """Per-exit thresholds inside each exit's score range, at least TIE_GAP from every score."""
    out = []
    for k in range(cache.num_exits):
        s = np.sort(cache.scores[policy][k].astype(np.float64))
        gaps = np.flatnonzero(np.diff(s) > 2 * TIE_GAP + 1e-6)
        assert gaps.size, "scores too crowded to place a threshold between them"
        i = rng.choice(gaps)
        out.append(float(rng.uniform(s[i] + TIE_GAP, s[i + 1] - TIE_GAP)))
    return out


class StopAfter(Sink):
    """Presses Ctrl-C right after epoch ``n`` was saved: the epochs task advances once an epoch's
    checkpoint is written."""

    def __init__(self, n: int) -> None:
        self.n = n

    def task(self, description: str, total: int | None = None, completed: int = 0) -> Task:
        return CtrlCAfter(self.n - completed) if description == "epochs" else Task()


class CtrlCAfter(Task):
    def __init__(self, steps: int) -> None:
        self.left = steps

    def advance(self, steps: int = 1, info: str | None = None) -> None:
        self.left -= steps
        if self.left == 0:
            raise KeyboardInterrupt


def saved_checkpoint(folder: Path, exits: int | str = 2, chained: bool = False, val_split: float = 0.2,
                     limit: int = 60) -> tuple[pteenet.EarlyExitModel, Path]:
    """A pool-mlp model (cascaded and ensembled with ``chained``) saved as ``folder/m.safetensors``
    with a training and a synthetic-data record, ready for the commands: (the model, the path)."""
    model = build("pool-mlp", chained, chained, exits=exits)
    model.meta.update(training={"complete": True, "epochs_done": 1},
                      data={"spec": "synthetic", "val_split": val_split, "seed": 1, "limit": limit})
    pteenet.save_checkpoint(folder / "m.safetensors", model)
    return model, folder / "m.safetensors"


def swept_checkpoint(folder: Path) -> tuple[pteenet.EarlyExitModel, Path]:
    """An exit after every block (pool-mlp, cascade, ensemble), ready for ``sweep-threshold``."""
    return saved_checkpoint(folder, exits="all", chained=True)


def four_exit_cache() -> tuple[ExitCache, TimeProfile]:
    """Four exits, each the only one sure (and right) about its own fifth of 500 samples; the last
    fifth runs to the end. Every exit pays for itself on the mean, and heads of 0.3 ms on 1 ms
    stages make a sample that never leaves pay all four: 1.24x predicted."""
    e, n = 4, 500
    group = np.arange(n) % (e + 1)
    preds = np.ones((e + 1, n), dtype=np.int64)
    preds[-1] = 0
    scores = np.full((e, n), 0.1, dtype=np.float32)
    for k in range(e):
        preds[k, group == k] = 0
        scores[k, group == k] = 0.99
    prof = TimeProfile(batch_size=1, stage_ms=[1.0] * (e + 1), branch_ms=[0.3] * e, backbone_ms=float(e + 1))
    return ExitCache(preds, {"max-softmax": scores}, np.zeros(n), prof.costs(), prof.costs_paper()), prof


# -- synthetic exit caches of a known distribution (the guarantee's and per-class tests) ------------
SYNTH_EXITS = 3
SYNTH_COST = CostTable(100, [ExitCost(f"e{k}", f"n{k}", p, 5, (p + 5 * (k + 1)) / 100, (p + 5) / 100)
                             for k, p in enumerate((30, 55, 80))])


def synthetic_cache(n: int, rng: np.random.Generator, labelled: bool = True) -> ExitCache:
    """Samples of a fixed distribution: a difficulty per sample drives the backbone's errors, each
    exit's confidence and whether that exit is right."""
    e = SYNTH_EXITS
    y = rng.integers(0, 10, n)
    u = rng.random(n)
    preds = np.empty((e + 1, n), np.int64)
    preds[-1] = np.where(rng.random(n) < 0.95 - 0.15 * u, y, (y + 1) % 10)
    conf = np.empty((e, n), np.float32)
    for k in range(e):
        conf[k] = np.clip(1 - u + 0.15 * rng.standard_normal(n) + 0.1 * k, 0, 1)
        preds[k] = np.where(rng.random(n) < 0.35 + 0.6 * conf[k], y, (y + 2 + k) % 10)
    return ExitCache(preds, {"max-softmax": conf, "entropy": 1 - conf}, y if labelled else None,
                     SYNTH_COST.costs(), SYNTH_COST.costs_paper())


# -- staged programs, run through the driver copied into the export folder ---------------------------
HAS_ORT = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnxscript") is not None


def staged_driver(folder: Path) -> Any:
    """run_staged.py as copied into the folder: it must work on its own."""
    spec = importlib.util.spec_from_file_location("run_staged_copy", folder / "run_staged.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def staged_runs(folder: Path) -> list[tuple[str, Any]]:
    """The staged programs under ``folder`` (``staged_pt2``, and ``staged_onnx`` with onnxruntime)."""
    from pteenet.export.staged import torch_runner

    runs = [("torch.export", staged_driver(folder / "staged_pt2").StagedModel(folder / "staged_pt2", torch_runner))]
    if HAS_ORT:
        runs.append(("onnxruntime", staged_driver(folder / "staged_onnx").StagedModel(folder / "staged_onnx")))
    return runs
