"""Output that reads at 80 columns whatever the number of exits (issue 18): the train-branches
table and its progress line summarise per-exit figures (first/median/last exit) and fit; --json
keeps every exit."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

import pteenet
from helpers import run_cli
from pteenet.cli import common
from pteenet.cli.sink import RichSink
from pteenet.training.step import epoch_text, exit_summary, running_text, short_number

EXITS = 27
WIDTH = 80


def test_numbers_and_summaries_stay_short() -> None:
    assert [short_number(v) for v in (0.12345, 12.345, 123.45, 11006.2, 79349.0)] == \
        ["0.1235", "12.35", "123.5", "1.1e+04", "7.9e+04"]
    assert exit_summary([0.1, 0.2]) == "10 20" and exit_summary([0.0] * 26 + [0.5]) == "0/0/50"
    assert exit_summary(None) == "-"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = pteenet.attach(pteenet.AttachConfig(backbone="cifar-resnet56", input_size=(3, 8, 8), exits=EXITS))
    assert model.num_exits == EXITS
    path = tmp_path_factory.mktemp("wide") / "attached.safetensors"
    pteenet.save_checkpoint(path, model)
    return path


def test_train_table_fits_80_columns_with_27_exits(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common.console, "width", WIDTH)  # what COLUMNS=80 gives the stderr console
    args = ["train-branches", ckpt, "--data", "synthetic", "--limit", 64, "--epochs", 2, "--batch-size", 32,
            "--device", "cpu", "--no-ensemble"]
    code, _, stderr = run_cli(*args, "-o", tmp_path / "a.safetensors")
    assert code == 0, stderr
    lines = [line for line in stderr.splitlines() if not line.startswith(("Warning: ", "Note: "))]
    assert lines and max(len(line) for line in lines) <= WIDTH, "\n".join(lines)
    rows = [line.split() for line in lines if line.split()[:1] in (["1"], ["2"])]
    assert len(rows) == 2 and all(len(r) == 9 for r in rows), lines  # one line an epoch: no cell wrapped
    assert not any("\u2026" in line for line in lines), lines  # nor cut short
    assert "/" in rows[0][2]  # per-exit agreement as first/median/last
    code, stdout, stderr = run_cli(*args, "-o", tmp_path / "b.safetensors", "--json")
    doc = json.loads(stdout)
    assert all(len(r["train"]["agreement"]) == len(r["val"]["agreement"]) == EXITS for r in doc["epochs"])


def test_progress_line_fits_80_columns() -> None:
    out = io.StringIO()
    sink = RichSink(Console(file=out, width=WIDTH, force_terminal=False, color_system=None))
    means = {"loss": 11006.0, "agreement": [0.007] * EXITS, "ee_cost": 1.003}
    epochs = sink.task("epochs", 20)
    epochs.advance(info=epoch_text({"val": {"early_exit": {"accuracy": 0.001, "cost": 1.003}}}))
    sink.task("epoch 20/20", 351).advance(info=running_text(means))
    sink.progress.console.print(sink.progress.make_tasks_table(sink.progress.tasks))
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and max(len(line) for line in lines) <= WIDTH, lines
    assert running_text(means) in lines[1]  # whole, not cut or wrapped
