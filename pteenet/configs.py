"""One discipline for every config dataclass (``AttachConfig``, ``TrainConfig``, ``SweepConfig``, ...).

- Keyword-only (``@dataclass(kw_only=True)``), so a call site names what it sets and a new field
  cannot shift the meaning of the others.
- Checked in ``__post_init__`` with the validators below, so a config that exists is a valid one
  (``dataclasses.replace`` checks again). Each error is one ``PteenetError`` line that names the
  field; the hint says what is valid (the CLI option, the list of names).
- ``Config.to_dict`` / ``Config.from_dict``: a JSON round trip derived from the fields, with a
  ``schema_version``. ``from_dict`` fills defaults for missing keys (older records) and refuses
  unknown ones. Field metadata, set with ``setting``, marks what is not saved (``saved=False``),
  what a training resume may change (``resume="free"``), and how a nested value is read back
  (``decode``). A field renamed since records were written keeps its old key readable through
  ``RENAMED``.

Checks that need the file system or another config (an output folder, views against
augmentation) stay where the config is used, through the same validators.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .devices import DEVICES
from .errors import PteenetError

SCHEMA_VERSION = 1
VERSION_KEY = "schema_version"

C = TypeVar("C", bound="Config")


def setting(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, saved: bool = True,
            resume: str = "same", decode: Callable[[Any], Any] | None = None) -> Any:
    """A dataclass field with the metadata ``Config`` reads. ``resume``: ``same`` (a resumed run must
    repeat it, the default) or ``free`` (where or how fast it runs: it may change on resume)."""
    if resume not in ("same", "free"):
        raise ValueError(f"resume must be 'same' or 'free', got {resume!r}")
    meta = {"saved": saved, "resume": resume, "decode": decode}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def _encode(value: Any) -> Any:
    if isinstance(value, Config):
        return value.fields_dict()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    return value


class Config:
    """What every config dataclass shares: the JSON round trip and the field-wise comparison."""

    RENAMED: dict[str, str] = {}  # old key -> field, for records written before the field was renamed

    def fields_dict(self) -> dict[str, Any]:
        """The saved fields as JSON values (nested configs as dicts, tuples as lists, paths as str)."""
        return {f.name: _encode(getattr(self, f.name)) for f in dataclasses.fields(self)  # type: ignore[arg-type]
                if f.metadata.get("saved", True)}

    def to_dict(self) -> dict[str, Any]:
        return {VERSION_KEY: SCHEMA_VERSION, **self.fields_dict()}

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        """The config a ``to_dict`` (or an older one, missing keys) describes; unknown keys are refused."""
        d = {cls.RENAMED.get(k, k): v for k, v in d.items() if not (k in cls.RENAMED and cls.RENAMED[k] in d)}
        version = d.pop(VERSION_KEY, SCHEMA_VERSION)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise PteenetError(f"{cls.__name__} has schema version {version!r}; this pteenet reads up to {SCHEMA_VERSION}",
                               "upgrade pteenet")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("saved", True)}  # type: ignore[arg-type]
        unknown = [k for k in d if k not in fields]
        if unknown:
            raise PteenetError(f"unknown {cls.__name__} setting '{unknown[0]}'",
                               "known settings: " + ", ".join(fields))
        kwargs = {}
        for name, value in d.items():
            decode = fields[name].metadata.get("decode")
            kwargs[name] = decode(value) if decode is not None and value is not None else value
        return cls(**kwargs)

    def resume_diffs(self, recorded: "Config", prefix: str = "") -> list[str]:
        """``name value (was recorded)`` for every field a resumed run must repeat and does not."""
        diffs = []
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.metadata.get("resume", "same") == "free" or not f.metadata.get("saved", True):
                continue
            mine, theirs = getattr(self, f.name), getattr(recorded, f.name)
            if isinstance(mine, Config):
                diffs += mine.resume_diffs(theirs, f"{prefix}{f.name}.")
            elif _encode(mine) != _encode(theirs):
                diffs.append(f"{prefix}{f.name} {mine!r} (was {theirs!r})")
        return diffs


# -- validators: each raises one PteenetError that names the field ---------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # numpy ints too


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_int(name: str, value: Any, minimum: int | None = 1, hint: str | None = None, optional: bool = False) -> None:
    """A whole number >= ``minimum`` (any whole number with None; None itself allowed when ``optional``)."""
    if optional and value is None:
        return
    if not _is_int(value) or (minimum is not None and value < minimum):
        at_least = "" if minimum is None else f" >= {minimum}"
        raise PteenetError(f"{name} must be a whole number{at_least}, got {value!r}", hint)


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False, hint: str | None = None,
                 optional: bool = False) -> None:
    """A finite number in [low, high] (either end open, or absent)."""
    if optional and value is None:
        return
    ok = _is_real(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'(' if low_open else '['}{low:g}, "
        hi = "" if high is None else f"{high:g}{')' if high_open else ']'}"
        where = f"in {lo}{hi}" if low is not None and high is not None else \
            f"{'>' if low_open else '>='} {low:g}" if low is not None else f"{'<' if high_open else '<='} {high:g}"
        raise PteenetError(f"{name} must be a finite number {where}, got {value!r}", hint)


def check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    """One of ``choices``; the hint lists them all."""
    choices = list(choices)
    if value not in choices:
        raise PteenetError(f"unknown {name} '{value}'", f"{name} is one of: {', '.join(choices)}")


def check_device(value: Any) -> None:
    check_choice("device", value, DEVICES)


def check_thresholds(value: float | Sequence[float] | None) -> None:
    """Every policy's score (h, max-softmax, normalised entropy) lies in [0, 1]; so do thresholds."""
    if value is None:
        return
    values = [value] if isinstance(value, numbers.Real) else list(value)
    bad = [t for t in values if not (_is_real(t) and 0.0 <= t <= 1.0)]
    if bad:
        shown = f"{bad[0]:g}" if isinstance(bad[0], numbers.Real) else repr(bad[0])
        raise PteenetError(f"threshold {shown} is outside [0, 1]", "every policy's score lies in [0, 1]")
    if not values:
        raise PteenetError("threshold is an empty list", "give one threshold, or one per exit")


def check_criterion(budget: float | None, max_drop: float | None, **others: Any) -> None:
    """At most one way to choose an operating point: ``budget`` (a positive fraction of the backbone's
    cost), ``max_drop`` (percentage points >= 0) or one of ``others`` (e.g. a threshold)."""
    given = {"budget": budget, "max_drop": max_drop, **others}
    names = [f"--{k.replace('_', '-')}" for k in (*others, "budget", "max_drop")]
    if sum(v is not None for v in given.values()) > 1:
        both = "not both" if len(names) == 2 else "not several"
        raise PteenetError(f"give one of {', '.join(names[:-1])} and {names[-1]}, {both}",
                           "each picks the operating point its own way")
    check_number("budget", budget, 0, low_open=True, optional=True,
                 hint="a fraction of the backbone's cost, e.g. --budget 0.6")
    check_number("max_drop", max_drop, 0, optional=True, hint="percentage points below the backbone, e.g. --max-drop 1")


def check_parent_folder(name: str, path: str | Path) -> None:
    """The folder a file is to be written into exists (checked where the file is written, not in
    ``__post_init__``: a config may be built before its folder)."""
    parent = Path(path).expanduser().parent
    if not parent.is_dir():
        raise PteenetError(f"the folder of {name} {path} does not exist: {parent}", "create it first")
