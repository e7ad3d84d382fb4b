"""What the commands print, and where: with --json exactly one JSON document on stdout and nothing
else; without it nothing on stdout. The library reports through its sink (``pteenet.progress``);
options several commands share are one definition (same help everywhere)."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import typer.main
from rich.console import Console

import pteenet
from helpers import run_cli
from pteenet.bench.run import BenchConfig, bench, load_images
from pteenet.cli import app
from pteenet.cli.sink import RichSink
from pteenet.data import DataConfig, DataRequest
from pteenet.progress import SILENT, Sink, Task

SHARED = ("--device", "--data", "--data-dir", "--limit", "--policy", "--json")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """attach -> train -> sweep --write, by the commands themselves (without --json)."""
    root = tmp_path_factory.mktemp("cli_output")
    paths = {"attached": root / "a.safetensors", "trained": root / "t.safetensors", "tuned": root / "s.safetensors"}
    steps = [
        ("attach", "cifar-resnet20", "--input-size", "3,16,16", "--exits", 2, "--placement", "linear",
         "-o", paths["attached"]),
        ("train-branches", paths["attached"], "-o", paths["trained"], "--data", "synthetic", "--limit", 64,
         "--epochs", 1, "--batch-size", 32, "--device", "cpu"),
        ("sweep-threshold", paths["trained"], "-o", root / "sweep0", "--thresholds", "0:1:0.25", "--max-drop", 100,
         "--write", paths["tuned"], "--device", "cpu"),
    ]
    for args in steps:
        code, stdout, stderr = run_cli(*args)
        assert code == 0, stderr
        assert stdout == "", f"{args[0]} wrote to stdout without --json"
    return paths


def commands(paths: dict[str, Path], tmp: Path) -> dict[str, list[Any]]:
    """Every command once, on the files of ``files`` (``tmp``: a fresh folder for what they write)."""
    return {
        "attach --list": ["attach", "cifar-resnet20", "--input-size", "3,16,16", "--list"],
        "attach": ["attach", "cifar-resnet20", "--input-size", "3,16,16", "--exits", 2, "-o", tmp / "a.safetensors"],
        "info": ["info", paths["tuned"]],
        "train-branches": ["train-branches", paths["attached"], "-o", tmp / "t.safetensors", "--data", "synthetic",
                           "--limit", 64, "--epochs", 1, "--batch-size", 32, "--device", "cpu", "--no-ensemble"],
        "sweep-threshold": ["sweep-threshold", paths["trained"], "-o", tmp / "sweep", "--thresholds", "0:1:0.25",
                            "--max-drop", 100, "--device", "cpu"],
        "export": ["export", paths["tuned"], "-o", tmp / "export"],
        "bench": ["bench", paths["tuned"], "--limit", 4, "--repeats", 1, "--batch-size", 2],
    }


# Where the human output goes without --json (on stderr), and so must not go with it.
HUMAN = {"attach --list": "exit candidates", "attach": "exits on cifar-resnet20", "info": "policy / thresholds",
         "train-branches": "per exit and at T", "sweep-threshold": "Pareto front", "export": "exported to",
         "bench": "exits taken"}


@pytest.mark.parametrize("name", list(HUMAN))
def test_json_is_one_document_on_stdout_and_nothing_else(files: dict[str, Path], tmp_path: Path, name: str) -> None:
    args = commands(files, tmp_path)[name]
    code, stdout, stderr = run_cli(*args, "--json")
    assert code == 0, stderr
    doc = json.loads(stdout)  # json.loads refuses anything after the document but white space
    assert isinstance(doc, dict) and doc
    assert stdout.endswith("}\n") and stdout.startswith("{")
    assert HUMAN[name] not in stderr, f"{name} --json still draws its table"


@pytest.mark.parametrize("name", ["attach --list", "attach", "info", "sweep-threshold", "export"])
def test_without_json_stdout_is_empty_and_the_table_is_on_stderr(files: dict[str, Path], tmp_path: Path,
                                                                  name: str) -> None:
    code, stdout, stderr = run_cli(*commands(files, tmp_path)[name])
    assert code == 0, stderr
    assert stdout == "" and HUMAN[name] in stderr


def test_shared_options_are_one_definition() -> None:
    """Each shared option has the same help in every command that takes it, and every command that
    takes data, a device, a policy or prints a document takes the shared one."""
    group = typer.main.get_command(app)
    helps: dict[str, dict[str, str]] = {opt: {} for opt in SHARED}
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        for param in command.params:
            for opt in set(param.opts) & set(SHARED):
                helps[opt][name] = param.help
    for opt, by_command in helps.items():
        assert len(set(by_command.values())) == 1, f"{opt} has different help texts: {by_command}"
    assert set(helps["--json"]) == set(group.commands)  # type: ignore[attr-defined]
    assert set(helps["--data"]) == set(helps["--data-dir"]) == set(helps["--limit"]) \
        == {"train-branches", "sweep-threshold", "bench", "export"}  # export: the images --quantize int8 calibrates on
    assert set(helps["--policy"]) == {"sweep-threshold", "export", "bench"}
    assert set(helps["--device"]) == {"train-branches", "sweep-threshold", "bench"}


@pytest.mark.parametrize("option, value", [("--policy", "margin"), ("--device", "tpu")])
def test_a_shared_choice_outside_its_list_is_a_usage_error(files: dict[str, Path], tmp_path: Path, option: str,
                                                           value: str) -> None:
    for name in ("sweep-threshold", "export", "bench", "train-branches"):
        args = commands(files, tmp_path)[name]
        if name not in ("sweep-threshold", "train-branches") and option == "--device":
            continue
        if name == "train-branches" and option == "--policy":
            continue
        code, stdout, stderr = run_cli(*args, option, value)
        assert code == 2 and stdout == "" and f"unknown {option[2:]} '{value}'" in stderr, (name, stderr)


# -- the library's sink -------------------------------------------------------------------------------
class Recorder(Sink):
    """Keeps every task, note and warning."""

    def __init__(self) -> None:
        self.tasks: list[Recorded] = []
        self.notes: list[str] = []
        self.warnings: list[str] = []

    def task(self, description: str, total: int | None = None, completed: int = 0) -> Task:
        self.tasks.append(Recorded(description, total, completed))
        return self.tasks[-1]

    def note(self, message: str) -> None:
        self.notes.append(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def named(self, start: str) -> list[Recorded]:
        return [t for t in self.tasks if t.description.startswith(start)]

    def check_all_finished(self) -> None:
        for t in self.tasks:
            assert t.closed and t.done == t.total, (t.description, t.done, t.total, t.closed)


class Recorded(Task):
    def __init__(self, description: str, total: int | None, completed: int) -> None:
        self.description, self.total, self.done = description, total, completed
        self.infos: list[str] = []
        self.closed = False

    def advance(self, steps: int = 1, info: str | None = None) -> None:
        assert not self.closed, f"{self.description} advanced after it was closed"
        self.done += steps
        if info is not None:
            self.infos.append(info)

    def close(self) -> None:
        self.closed = True


def test_training_sweep_export_and_bench_report_every_pass_to_the_sink(tmp_path: Path) -> None:
    model = pteenet.attach(pteenet.AttachConfig(backbone="cifar-resnet20", input_size=(3, 16, 16), exits=2,
                                                placement="linear"))
    rec = Recorder()
    pteenet.train_exits(model, DataConfig(spec="synthetic", limit=64), pteenet.TrainConfig(
        epochs=2, batch_size=32, device="cpu", cache_features=True, ensemble=True), rec)
    rec.check_all_finished()
    assert [t.total for t in rec.named("epochs")] == [2]
    assert len(rec.named("caching train features")) == len(rec.named("caching val features")) == 1
    epochs = rec.named("epoch ")
    assert [t.description for t in epochs] == ["epoch 1/2", "epoch 2/2"]
    assert all(t.infos and t.infos[-1].startswith("loss ") for t in epochs)  # the running figures
    assert rec.named("epochs")[0].infos[-1].startswith("val acc@T")
    assert len(rec.named("calibration split")) == 2 and len(rec.named("fitting the exit ensemble")) == 1

    rec = Recorder()
    doc = pteenet.sweep_model(model, None, pteenet.SweepConfig(thresholds="0:1:0.25", max_drop=100, device="cpu"),
                              sink=rec)
    rec.check_all_finished()
    assert [t.description.split()[0] for t in rec.tasks] == ["calibration", "test"]  # one pass each
    assert [t.total for t in rec.tasks] == [-(-doc["samples"] // 256), 1]
    assert rec.warnings == doc["warnings"] == []

    rec = Recorder()
    pteenet.export_model(model, pteenet.ExportConfig(output=tmp_path / "export"), rec)
    rec.check_all_finished()
    assert len(rec.tasks) == 1 and rec.tasks[0].infos[-1] == "report"

    rec = Recorder()
    images, _ = load_images(model, split="test", limit=6, sink=rec)
    bench(model, images, BenchConfig(batch_sizes=(2, 4), repeats=2, warmup=1), rec)
    rec.check_all_finished()
    assert [t.description for t in rec.tasks] == ["loading 6 test images", "timing batch 2, 6 images",
                                                  "timing batch 4, 6 images"]
    assert [t.total for t in rec.tasks] == [1, 4, 4]


def test_sweep_warnings_and_notes_go_to_the_sink_and_the_document(tiny_model: pteenet.EarlyExitModel) -> None:
    rec = Recorder()
    doc = pteenet.sweep_model(tiny_model, DataRequest(spec="synthetic", limit=40),
                              pteenet.SweepConfig(thresholds="0:1:0.5", device="cpu"), sink=rec)
    assert rec.warnings == doc["warnings"] and any("never trained" in w for w in rec.warnings)
    assert rec.notes == doc["notes"] and rec.notes


def test_the_default_sink_is_silent(tiny_model: pteenet.EarlyExitModel, capsys: pytest.CaptureFixture[str]) -> None:
    pteenet.sweep_model(tiny_model, DataRequest(spec="synthetic", limit=40),
                        pteenet.SweepConfig(thresholds="0:1:0.5", device="cpu"))
    with SILENT.task("anything", 3) as task:
        task.advance(info="nothing shows")
    SILENT.warn("nor this")
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_rich_sink_prints_notes_and_warnings_and_leaves_no_bar() -> None:
    buf = io.StringIO()
    with RichSink(Console(file=buf, width=200)) as sink:
        with sink.task("a pass", 3) as task:
            task.advance()
            task.advance(2, info="loss 0.1")
        sink.note("which data")
        sink.warn("something odd")
        assert sink.progress.live.is_started
    assert not sink.progress.live.is_started
    lines = buf.getvalue().splitlines()
    assert "Note: which data" in lines and "Warning: something odd" in lines
    assert not any("a pass" in line for line in lines)  # the bar was transient
