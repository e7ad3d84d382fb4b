"""What every command shares: the stderr console and its progress sink, ``--json`` (``emit``),
option parsing and error handling. The options several commands take are in ``options.py``.

Data goes to stdout (with --json one JSON document and nothing else); tables, progress, notes,
warnings and errors go to stderr. A known error becomes one line ``Error: ... (hint: ...)`` and exit
code 1; ``PTEENET_DEBUG=1`` adds the traceback.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import warnings
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console

from ..data import SKIPPED, ImageSkipped
from ..distributed import is_main_process
from ..errors import PteenetError, describe_error
from .sink import RichSink

console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

def emit(doc: Any, as_json: bool, show: Callable[[Any], None]) -> None:
    """The one place ``--json`` is decided: with it, the document on stdout and nothing else; without
    it, ``show`` draws the document for people on stderr (tables, summaries). Under torchrun every
    rank runs the command; rank 0 alone emits."""
    if not is_main_process():
        return
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2, default=_jsonable) + "\n")
        sys.stdout.flush()
    else:
        show(doc)


def progress_sink() -> RichSink:
    """``with progress_sink() as sink:`` around a library call: its progress bars, notes and warnings
    on stderr (rank 0's alone under torchrun)."""
    return RichSink(console if is_main_process() else Console(stderr=True, quiet=True))


def fail(message: str) -> None:
    # Plain write, not Rich: Rich would wrap a long error over several lines.
    rank = os.environ.get("RANK", "0") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "0"
    sys.stderr.write(f"Error: {message}\n" if rank == "0" else f"Error (rank {rank}): {message}\n")
    sys.stderr.flush()


def handle_errors(fn: F) -> F:
    """Turn known errors into one line and exit code 1; never show a traceback unless debugging."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool(os.environ.get("PTEENET_DEBUG"))
        mark = SKIPPED.mark()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", ImageSkipped)  # SKIPPED already says each file once
                warnings.showwarning = _show_warning
                return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.BadParameter):
            raise
        except PteenetError as e:
            if debug:
                console.print_exception()
            if not getattr(e, "quiet", False):  # under torchrun, rank 0 reports what every rank hit
                fail(str(e))
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            fail("interrupted")
            raise typer.Exit(130) from None
        except Exception as e:  # an unexpected failure is still one line, with a way to see more
            if debug:
                raise
            fail(f"{describe_error(e)} (hint: rerun with PTEENET_DEBUG=1 for the traceback)")
            raise typer.Exit(1) from None
        finally:
            if skipped := SKIPPED.since(mark):  # the count at the end, however the command ended
                RichSink(console).warn(SKIPPED.summary(skipped))

    return wrapper  # type: ignore[return-value]


_default_showwarning = warnings.showwarning


def _show_warning(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """A skipped image as one ``Warning:`` line on stderr (not Python's file:line: form); others as usual."""
    if issubclass(category, ImageSkipped):
        RichSink(console).warn(str(message))
    else:
        _default_showwarning(message, category, *args, **kwargs)


def _jsonable(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def parse_floats(text: str | None, name: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=name) from None


def parse_size(text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise typer.BadParameter(f"expected C,H,W such as 3,224,224, got {text!r}", param_hint="--input-size")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def split_names(values: list[str] | None) -> list[str] | None:
    """``--at a --at b`` and ``--at a,b`` both work."""
    if not values:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]
