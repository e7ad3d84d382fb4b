"""The options several commands take, one definition each, so that their names, choices and help
agree everywhere: ``data: DataOption = None`` in a command's signature. Choices come from the
library's own lists; a value outside them is a usage error (exit 2) that lists them.
"""
from __future__ import annotations

from typing import Annotated, Callable, Optional, Sequence

import typer

from ..data import DEFAULT_DATA_DIR, KNOWN_SPECS
from ..devices import DEVICES
from ..exits.policies import LEARNED, POLICIES

ALL_POLICIES = "all"  # --policy of sweep-threshold: every policy side by side


def _choice(what: str, known: Sequence[str]) -> Callable[[str], str]:
    """A parser that admits the library's own names: anything else is a usage error (exit 2)."""
    def parse(value: str) -> str:
        if value not in known:
            raise typer.BadParameter(f"unknown {what} '{value}'; choose from {', '.join(known)}")
        return value
    return parse


DeviceOption = Annotated[str, typer.Option(
    "--device", parser=_choice("device", DEVICES), metavar="DEVICE",
    help=f"where the model runs: {' | '.join(DEVICES)} (auto: CUDA when present, else the CPU)")]
DataOption = Annotated[Optional[str], typer.Option(
    "--data", help=f"dataset: {' | '.join(KNOWN_SPECS)} (on a trained checkpoint the default is "
                   "the data its branches were trained on)")]
DataDirOption = Annotated[Optional[str], typer.Option(
    "--data-dir", help=f"where datasets live (default {DEFAULT_DATA_DIR})")]
LimitOption = Annotated[Optional[int], typer.Option(
    "--limit", help="use at most N images per split")]
PolicyOption = Annotated[Optional[str], typer.Option(
    "--policy", parser=_choice("policy", [*POLICIES, *LEARNED, ALL_POLICIES]), metavar="POLICY",
    help=f"exit policy: {' | '.join((*POLICIES, *LEARNED, ALL_POLICIES))} ({ALL_POLICIES}: each side by side, sweep-threshold "
         "only, and its default; eenet: EENet's learned scheduler, fitted by sweep-threshold on the calibration split; "
         "elsewhere the default is the checkpoint's own)")]
JsonOption = Annotated[bool, typer.Option(
    "--json", help="print the result as one JSON document on stdout, and nothing else there")]
StrictImagesOption = Annotated[bool, typer.Option(
    "--strict-images", help="stop at an image file that cannot be decoded (default: skip it with a warning "
                            "naming it, and count them at the end)")]
