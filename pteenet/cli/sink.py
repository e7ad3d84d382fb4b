"""The commands' ``Sink``: Rich progress bars, notes and warnings on stderr.

Bars are transient (they vanish when the work ends, leaving the table or the JSON document) and
the display starts on the first task, so an error found before any work stays a single line.
"""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ..progress import Sink, Task


class RichTask(Task):
    def __init__(self, progress: Progress, task_id: TaskID) -> None:
        self.progress, self.id = progress, task_id
        self.open = True

    def advance(self, steps: int = 1, info: str | None = None) -> None:
        if info is None:
            self.progress.advance(self.id, steps)
        else:
            self.progress.update(self.id, advance=steps, info=info)

    def close(self) -> None:
        if self.open:
            self.open = False
            self.progress.remove_task(self.id)


class RichSink(Sink):
    """``with RichSink(console) as sink:`` around the library call: the bars stop with the block."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                 console=console, transient=True)

    def __enter__(self) -> RichSink:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress.live.is_started:
            self.progress.stop()

    def task(self, description: str, total: int | None = None, completed: int = 0) -> Task:
        if not self.progress.live.is_started:
            self.progress.start()
        return RichTask(self.progress, self.progress.add_task(description, total=total, completed=completed, info=""))

    def note(self, message: str) -> None:
        self.console.print(f"Note: {message}", style="cyan", soft_wrap=True, markup=False, highlight=False)

    def warn(self, message: str) -> None:
        self.console.print(f"Warning: {message}", style="bold yellow", soft_wrap=True, markup=False, highlight=False)
