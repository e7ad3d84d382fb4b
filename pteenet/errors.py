"""The one exception type the CLI turns into a one-line ``Error: ...`` with a hint and exit code 1."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class PteenetError(Exception):
    """A known, user-facing error: ``message`` says what is wrong, ``hint`` what to do about it."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


def unknown_name(kind: str, name: str, known: Iterable[str], limit: int = 12) -> PteenetError:
    """An error for an unknown name that lists close matches, or the first few names that exist."""
    known = list(known)
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    if close:
        hint = "did you mean " + ", ".join(close) + "?"
    else:
        shown = ", ".join(known[:limit]) + (f", ... ({len(known)} in all)" if len(known) > limit else "")
        hint = f"known {kind}s: {shown}" if known else f"there are no {kind}s to choose from"
    return PteenetError(f"unknown {kind} '{name}'", hint)


def first_line(e: BaseException, width: int = 160) -> str:
    """The first line of ``e``'s message, at most ``width`` characters ("" when it has none): an error
    from a library can run over many lines, and ours are one line."""
    lines = str(e).strip().splitlines()
    return lines[0][:width] if lines else ""


def describe_error(e: BaseException, width: int = 160) -> str:
    """``TypeName: first line of the message`` (only the type's name when the message is empty)."""
    first = first_line(e, width)
    return f"{type(e).__name__}: {first}" if first else type(e).__name__
