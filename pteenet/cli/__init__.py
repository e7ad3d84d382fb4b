"""The ``pteenet`` command: one module per command, each a thin layer over one library function."""
from __future__ import annotations

import typer

from .attach_cmd import attach_command, info_command
from .bench_cmd import bench_command
from .export_cmd import export_command
from .sweep_cmd import sweep_command
from .train_cmd import train_command

app = typer.Typer(help="Early exits for a frozen pretrained CNN (PTEENet).", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
app.command("attach")(attach_command)
app.command("info")(info_command)
app.command("bench")(bench_command)
app.command("export")(export_command)
app.command("sweep-threshold")(sweep_command)
app.command("train-branches")(train_command)


def main() -> None:
    app()
