"""``pteenet attach`` and ``pteenet info``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from ..errors import PteenetError
from ..progress import format_macs
from ..runtime.attach import AttachConfig, attach, list_candidates
from ..runtime.checkpoint import backbone_hash, read_metadata, save_checkpoint
from ..runtime.model import EarlyExitModel
from ..sweep.pricing import unit as cost_unit
from ..tracing.hooks import NO_EARLY_EXIT
from .common import console, emit, handle_errors, parse_floats, parse_size, split_names
from .options import JsonOption


@handle_errors
def attach_command(
    backbone: str = typer.Argument(..., help="torchvision:NAME, timm:NAME[.TAG], cifar-resnet20|32|44|56|110, file.py:factory or package.module:factory"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="checkpoint to write (.safetensors)"),
    weights: Optional[str] = typer.Option(None, help="weights file (.safetensors/.pt/.pth/.th); torchvision: DEFAULT or an enum name; timm: pretrained (from the hub)"),
    num_classes: Optional[int] = typer.Option(None, help="number of classes, if not the model's default"),
    input_size: Optional[str] = typer.Option(None, help="C,H,W (default: from the weights or the model)"),
    mean: Optional[str] = typer.Option(None, help="per-channel mean, comma-separated"),
    std: Optional[str] = typer.Option(None, help="per-channel std, comma-separated"),
    at: Optional[list[str]] = typer.Option(None, "--at", help="exit point (module path or node name); repeat or comma-separate"),
    exits: Optional[str] = typer.Option(None, help="number of exits placed by cost, or 'all' candidates (default all)"),
    placement: str = typer.Option(AttachConfig.placement, help="fine | pareto | linear | golden"),
    branch: str = typer.Option(AttachConfig.branch, help="branch type: pool-mlp | pool | conv-lite | conv0..conv3 (the paper's)"),
    cascade: bool = typer.Option(AttachConfig.cascade, "--cascade/--no-cascade", help="each branch also reads the previous exit's logits"),
    grid: int = typer.Option(AttachConfig.grid, help="G of the G x G average+max pooling (pool, pool-mlp, conv-lite)"),
    hidden: int = typer.Option(AttachConfig.hidden, help="hidden width of pool-mlp branches"),
    hooks: bool = typer.Option(False, "--hooks", help="for backbones torch.fx cannot trace: exits on forward hooks "
                               "(trained, swept and reported; NO real early exit: every sample runs the whole backbone)"),
    list_: bool = typer.Option(False, "--list", help="list candidate exit points and their cumulative MAC share"),
    json_: JsonOption = False,
) -> None:
    """Attach early-exit branches to a frozen backbone and write a checkpoint."""
    n_exits: int | str | None = int(exits) if exits is not None and exits.strip().isdigit() else exits
    cfg = AttachConfig(backbone=backbone, weights=weights, num_classes=num_classes, input_size=parse_size(input_size),
                       mean=parse_floats(mean, "--mean"), std=parse_floats(std, "--std"), at=split_names(at),
                       exits=n_exits, placement=placement, branch=branch, cascade=cascade, grid=grid, hidden=hidden,
                       hooks=hooks)
    if list_:
        emit(list_candidates(cfg), json_, _show_candidates)
        return
    if output is None:
        raise typer.BadParameter("an output file is required (or use --list)", param_hint="-o/--output")
    model = attach(cfg)
    save_checkpoint(output, model)
    assert model.cost is not None
    doc = {**model.cost.to_dict(), "output": str(output), "branch": model.branch_config.name,
           "layouts": [p.layout for p in model.exit_points], "runtime": model.runtime}
    emit(doc, json_,
           lambda doc: _show_cost(model, cfg.backbone, output))


def _show_candidates(doc: dict[str, Any]) -> None:
    table = Table(title=f"exit candidates of {doc['backbone']} ({format_macs(doc['backbone_macs'])} MACs)")
    for col in ("#", "name", "node", "shape", "layout", "cumulative MACs", "share"):
        table.add_column(col, justify="right" if col in ("#", "cumulative MACs", "share") else "left")
    for i, r in enumerate(doc["candidates"]):
        table.add_row(str(i), r["name"], r["node"], "x".join(map(str, r["shape"])), r["layout"],
                      format_macs(r["prefix_macs"]), f"{r['share']:.3f}")
    console.print(table)
    _note_hooks(doc["runtime"] == "hooks")


def _note_hooks(hooks: bool) -> None:
    if hooks:
        console.print(f"Note: {NO_EARLY_EXIT}", style="bold yellow", soft_wrap=True, markup=False)


def _show_cost(model: EarlyExitModel, backbone: str, path: Path) -> None:
    assert model.cost is not None
    _note_hooks(model.runtime == "hooks")
    table = Table(title=f"{len(model.cost.exits)} exits on {backbone} ({format_macs(model.cost.backbone_macs)} MACs) -> {path}")
    for col in ("exit", "point", "prefix MACs", "branch MACs", "cost (cumulative)", "cost (paper)"):
        table.add_column(col, justify="left" if col == "point" else "right")
    for i, e in enumerate(model.cost.exits):
        table.add_row(str(i), e.name, format_macs(e.prefix_macs), format_macs(e.branch_macs), f"{e.cost:.3f}", f"{e.cost_paper:.3f}")
    table.add_row("end", "backbone output", format_macs(model.cost.backbone_macs), "", f"{model.cost.final_cost:.3f}", "1.000")
    console.print(table)


@handle_errors
def info_command(
    checkpoint: Path = typer.Argument(..., help="a pteenet checkpoint"),
    json_: JsonOption = False,
) -> None:
    """Show a checkpoint's metadata, after checking its backbone tensors against their recorded hash
    (exit code 1 when they do not match)."""
    meta = read_metadata(checkpoint)
    actual = backbone_hash(checkpoint)
    meta["backbone_verified"] = actual == meta.get("backbone_sha256")
    emit(meta, json_, lambda meta: _show_metadata(meta, checkpoint, actual))
    if not meta["backbone_verified"]:
        raise PteenetError(f"the backbone tensors in {checkpoint} do not match their recorded hash (recorded "
                           f"{str(meta.get('backbone_sha256'))[:12]}, stored tensors {actual[:12]}): the file was "
                           "changed or is corrupt", "write it again from its source; do not use this file")


def _show_metadata(meta: dict[str, Any], checkpoint: Path, actual: str) -> None:
    table = Table(title=str(checkpoint), show_header=False)
    table.add_column("key")
    table.add_column("value")
    bb = meta["backbone"]
    table.add_row("backbone", f"{bb['spec']} ({bb['num_classes']} classes, input {'x'.join(map(str, bb['preprocess']['input_size']))})")
    table.add_row("weights", f"{bb.get('weights')} sha256 {str(bb.get('weights_sha256'))[:12]}")
    table.add_row("backbone tensors", f"sha256 {actual[:12]}, " + ("match the recorded hash" if meta["backbone_verified"]
                                                                   else "[bold red]DO NOT match the recorded hash[/]"))
    br = meta["branch"]
    table.add_row("branch", br["type"] + (", cascade" if br.get("cascade") else "") + (", ensemble" if meta.get("ensemble") else ""))
    if meta.get("runtime") == "hooks":
        table.add_row("runtime", f"forward hooks: {NO_EARLY_EXIT}")
    table.add_row("policy / thresholds", f"{meta['policy']} {', '.join(f'{t:.3f}' for t in meta['thresholds'])}")
    if cm := (meta.get("sweep") or {}).get("cost_model"):  # what the chosen setting was priced in
        table.add_row("chosen for", cost_unit(cm))
    active = meta.get("active_exits")
    for i, e in enumerate((meta.get("cost") or {}).get("exits", [])):
        idle = "" if not active or active[i] else "; takes no decision (exit selection)"
        table.add_row(f"exit {i}", f"{e['name']}: cost {e['cost']:.3f} (paper {e['cost_paper']:.3f}){idle}")
    for key in meta:
        if key not in ("backbone", "branch", "policy", "thresholds", "cost", "exits", "ensemble", "active_exits",
                       "backbone_verified", "runtime"):
            table.add_row(key, str(meta[key])[:100])
    console.print(table)
