"""A resumed run ends bit-identical to an uninterrupted one wherever it was stopped: at every progress
tick of a run (each training step, each calibration batch, the ensemble fit, after each save) by a
raised Ctrl-C, and by SIGKILL of a training subprocess (mid-epoch, inside the checkpoint write, and
from outside at whatever moment it lands).

The pooling plans of ``GridPool`` are chosen by timing, per process, so on a busy machine a second
process may choose another one. The tests make the resumed process choose differently from the one
that was stopped (``_time_plans`` patched), and kill and resume a run while busy loops load the
machine: every plan gives the same bits, so the result is the idle, uninterrupted run's.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from pteenet import AttachConfig, attach, save_checkpoint
from pteenet.data import DataConfig
from pteenet.exits import branches
from pteenet.progress import Sink, Task
from pteenet.training import step
from pteenet.training.run import Interrupted, TrainConfig, train_branches

ROOT = Path(__file__).resolve().parents[1]
ARGS = dict(epochs=3, batch_size=16, lr=1e-2, device="cpu", seed=1, ensemble=True)  # stopped in its fit too


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The default branch (pool-mlp, cascade): GridPool stems with 4x4 and 2x2 windows at 16x16.
    model = attach(AttachConfig(backbone="cifar-resnet20", input_size=(3, 16, 16), exits=2))
    path = tmp_path_factory.mktemp("resume") / "attached.safetensors"
    save_checkpoint(path, model)
    return path


def data() -> DataConfig:
    # 64 training images (4 steps an epoch), 20 calibration images (a batch of 16 and one of 4).
    return DataConfig(spec="synthetic", limit=64, calibration_split=0.04, seed=1)


def trained(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(path)).items() if k.startswith(("branches.", "ensemble."))}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """The tensors that differ (none when bit-identical)."""
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def choosing(monkeypatch: pytest.MonkeyPatch, plan: str) -> None:
    """A fresh process whose timing makes every pooling shape choose ``plan``."""
    monkeypatch.setattr(branches, "_chosen_plan", {})
    monkeypatch.setattr(branches, "_time_plans", lambda x, k, rounds=5: plan)


class Ticks(Sink):
    """Counts every progress tick of every task; raises Ctrl-C at tick ``stop`` (None: never)."""

    def __init__(self, stop: int | None = None) -> None:
        self.stop, self.ticks = stop, 0

    def task(self, description: str, total: int | None = None, completed: int = 0) -> Task:
        sink = self

        class Tick(Task):
            def advance(self, steps: int = 1, info: str | None = None) -> None:
                sink.ticks += 1
                if sink.ticks == sink.stop:
                    raise KeyboardInterrupt

        return Tick()


@pytest.fixture(scope="module")
def straight(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, dict[str, torch.Tensor]], dict[bool, int]]:
    """The uninterrupted runs (cached features or not) and how many progress ticks each makes."""
    out, ticks = {}, {}
    # Module-scoped, so before conftest's per-test torch.set_num_threads(1): the thread count
    # changes how reductions round, and the plan keys.
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        for cached in (False, True):
            mp.setattr(branches, "_chosen_plan", {})  # timed as this process times them
            path = tmp_path_factory.mktemp("straight") / f"cached{cached}.safetensors"
            sink = Ticks()
            train_branches(ckpt, path, data(), TrainConfig(**ARGS, cache_features=cached), sink)
            out[cached], ticks[cached] = trained(path), sink.ticks
    return out, ticks


@pytest.mark.parametrize("cached", [False, True])
def test_stopped_at_every_tick_resumes_bit_identical(ckpt: Path, tmp_path: Path, straight: Any,
                                                     monkeypatch: pytest.MonkeyPatch, cached: bool) -> None:
    reference, ticks = straight
    cfg = TrainConfig(**ARGS, cache_features=cached)
    resumed = 0
    # Every tick uncached; with cached features (6 more ticks, the caching) every third, for time.
    for stop in range(1, ticks[cached], 3 if cached else 1):
        out = tmp_path / f"stop{stop}.safetensors"
        choosing(monkeypatch, "nhwc")
        with pytest.raises((Interrupted, KeyboardInterrupt)):
            train_branches(ckpt, out, data(), cfg, Ticks(stop))
        if not out.exists():  # stopped before the first epoch was saved: nothing to resume
            continue
        choosing(monkeypatch, "pool2d")  # the resumed process times the plans otherwise
        train_branches(ckpt, out, data(), TrainConfig(**ARGS, cache_features=cached, resume=True))
        assert same(reference[cached], trained(out)) == [], f"stopped at tick {stop} of {ticks[cached]}"
        resumed += 1
    assert resumed >= (5 if cached else 15)  # stops in every epoch after the first, and in the ensemble fit


DRIVER = """
import os, signal, sys
import pteenet.exits.branches as branches
from pteenet.training import step
from pteenet.cli import app
kill, out = sys.argv[1], sys.argv[2]
if os.environ.get("PTEENET_TEST_PLAN"):  # as if this process timed another plan fastest
    branches._time_plans = lambda x, k, rounds=5: os.environ["PTEENET_TEST_PLAN"]
if kill.startswith("step="):  # SIGKILL in the middle of an epoch
    n, real = int(kill[5:]), step.BranchTrainer.step
    def step_then_die(self, *a, **kw):
        if self.step_count == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, *a, **kw)
    step.BranchTrainer.step = step_then_die
if kill.startswith("save="):  # SIGKILL inside the checkpoint write, the new file whole but not renamed
    n, real, seen = int(kill[5:]), os.replace, []
    def replace_then_die(src, dst):
        if os.path.basename(dst) == os.path.basename(out):
            seen.append(dst)
            if len(seen) == n:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst)
    os.replace = replace_then_die
app(sys.argv[3:], standalone_mode=False)
"""


def test_sigkilled_subprocess_resumes_bit_identical(ckpt: Path, tmp_path: Path, straight: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    reference, _ = straight
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PTEENET_TEST_PLAN": "nhwc"}
    # 4 steps an epoch: step 6 is in the middle of the second; save 2 writes the second epoch.
    kills = {"step=6": None, "save=2": None, "outside": None}
    procs = {}
    for kill in kills:
        out = tmp_path / f"{kill}.safetensors"
        cmd = [sys.executable, str(driver), kill, str(out), *train_cmd(ckpt, out)]
        procs[kill] = (out, subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    out, proc = procs["outside"]
    deadline = time.monotonic() + 120
    while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # the first epoch is saved: kill it wherever it is in the second
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    for kill, (out, proc) in procs.items():
        proc.wait(timeout=180)
        assert proc.returncode == -signal.SIGKILL, (kill, proc.stderr.read().decode()[-2000:] if proc.stderr else "")
        assert out.exists(), kill
        choosing(monkeypatch, "nchw")
        train_branches(ckpt, out, data(), TrainConfig(**ARGS, resume=True))
        assert same(reference[False], trained(out)) == [], kill


def train_cmd(ckpt: Path, out: Path) -> list[str]:
    return ["train-branches", str(ckpt), "-o", str(out), "--data", "synthetic", "--limit", "64", "--val-split", "0.04",
            "--epochs", "3", "--batch-size", "16", "--lr", "1e-2", "--seed", "1", "--device", "cpu", "--ensemble"]


@contextlib.contextmanager
def loaded(loops: int = 2) -> Iterator[None]:
    """Busy loops on the machine's cores while inside (the load that made timed choices differ)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(loops)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_killed_while_loaded_resumes_to_the_idle_run(ckpt: Path, tmp_path: Path, straight: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILLed mid-epoch under load, resumed under load, every plan timed for real: the result is
    the uninterrupted run's made without the load (``straight``)."""
    reference, _ = straight
    driver, out = tmp_path / "driver.py", tmp_path / "loaded.safetensors"
    driver.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with loaded():
        proc = subprocess.run([sys.executable, str(driver), "step=6", str(out), *train_cmd(ckpt, out)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=180)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
        monkeypatch.setattr(branches, "_chosen_plan", {})  # a fresh process: it times the plans again
        train_branches(ckpt, out, data(), TrainConfig(**ARGS, resume=True))
    assert same(reference[False], trained(out)) == []


class Notes(Sink):
    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warn(self, message: str) -> None:
        self.warnings.append(message)


def test_resume_on_another_thread_count_says_it_may_differ(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    with pytest.raises(Interrupted, match="holds epoch 1"):
        train_branches(ckpt, out, data(), TrainConfig(**ARGS), Ticks(7))  # the epochs tick after epoch 1's save
    notes = Notes()
    torch.set_num_threads(2)
    train_branches(ckpt, out, data(), TrainConfig(**ARGS, resume=True), notes)
    assert any("used 1 CPU threads, this one 2" in w for w in notes.warnings), notes.warnings


def test_resume_on_another_cpu_or_torch_says_it_may_differ(ckpt: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out.safetensors"
    with pytest.raises(Interrupted, match="holds epoch 1"):
        train_branches(ckpt, out, data(), TrainConfig(**ARGS), Ticks(7))
    notes = Notes()
    monkeypatch.setattr(step, "cpu_name", lambda: "another CPU (AVX512)")
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    train_branches(ckpt, out, data(), TrainConfig(**ARGS, resume=True), notes)
    said = [w for w in notes.warnings if "may differ from an uninterrupted run's" in w]
    assert len(said) == 2 and "this one another CPU (AVX512)" in said[1] and "torch" in said[0], notes.warnings
    notes = Notes()  # an unchanged machine: no such warning
    with pytest.raises(Interrupted):
        train_branches(ckpt, tmp_path / "b.safetensors", data(), TrainConfig(**ARGS), Ticks(7))
    train_branches(ckpt, tmp_path / "b.safetensors", data(), TrainConfig(**ARGS, resume=True), notes)
    assert not [w for w in notes.warnings if "may differ" in w], notes.warnings
