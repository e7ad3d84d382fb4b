"""Where the library reports progress, notes and warnings: one ``Sink``, passed as ``sink=``.

The library never prints. Every loop over a dataset (an epoch, a feature cache, a pass over a split,
a timing run, an export) opens a ``Task`` on the sink and advances it once per step; what the user
should know goes to ``note`` or ``warn``. ``Sink`` itself is silent, and it is the default of every
library function; the CLI passes one that draws Rich bars on stderr (``pteenet.cli.sink``), and a
notebook or a test can pass its own (subclass ``Sink`` and ``Task``, override what it wants).
"""
from __future__ import annotations

from typing import Any


class Task:
    """One bar of progress, open until ``close`` (``with sink.task(...) as task:`` closes it).
    This one shows nothing."""

    def advance(self, steps: int = 1, info: str | None = None) -> None:
        """``steps`` more steps done (0: only ``info`` changes); ``info``: a short running text, such
        as the loss so far, shown beside the bar until the next one."""

    def close(self) -> None:
        """The task is over (finished or abandoned); its bar goes away."""

    def __enter__(self) -> Task:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Sink:
    """Receives progress, notes and warnings. This one drops them all: the library's default."""

    def task(self, description: str, total: int | None = None, completed: int = 0) -> Task:
        """A new task of ``total`` steps (None: not known in advance), ``completed`` of them already
        done (on resume). Tasks may be open together, such as the epochs and the current epoch."""
        return Task()

    def note(self, message: str) -> None:
        """Something assumed or chosen that the user may want to know (e.g. which data was used)."""

    def warn(self, message: str) -> None:
        """Something that may be wrong but does not stop the work."""


SILENT = Sink()  # stateless: one instance serves every caller that passes no sink


def format_percent(v: float | None, digits: int = 2, unit: str = "%") -> str:
    """A fraction as a percentage, "-" for None: ``format_percent(0.1234)`` is "12.34%" (the report's
    and the CLI's one way to show a share)."""
    return "-" if v is None else f"{100 * v:.{digits}f}{unit}"


def format_macs(m: float | None) -> str:
    """A MAC count in millions or billions, "-" for None: "40.81 M", "4.11 G"."""
    return "-" if m is None else f"{m / 1e6:.2f} M" if m < 1e9 else f"{m / 1e9:.2f} G"
