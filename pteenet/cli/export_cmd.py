"""``pteenet export``: a deployable output folder with a report, from a checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from ..data import DataRequest
from ..export.run import FORMATS, ExportConfig, export
from ..progress import format_percent
from ..runtime.ort_quant import DEFAULT_QUANT_IMAGES
from .common import console, emit, handle_errors, progress_sink
from .options import DataDirOption, DataOption, JsonOption, LimitOption, PolicyOption


@handle_errors
def export_command(
    checkpoint: Path = typer.Argument(..., help="a pteenet checkpoint"),
    output: Path = typer.Option(..., "-o", "--output", help="output folder (created; must not exist or be empty)"),
    threshold: Optional[float] = typer.Option(None, help="global threshold in [0, 1]"),
    budget: Optional[float] = typer.Option(None, help="pick from the stored sweep: most accurate within this mean cost"),
    max_drop: Optional[float] = typer.Option(None, "--max-drop", help="pick from the stored sweep: cheapest within P accuracy points, certified again at P where the sweep was certified"),
    policy: PolicyOption = None,
    format_: Optional[list[str]] = typer.Option(None, "--format", help=f"repeat for several: {' | '.join(FORMATS)}"),
    force: bool = typer.Option(False, "--force", help="replace a non-empty output folder"),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="int8: also the staged-onnx program (and the backbone) as "
                                                                     "static INT8, with accuracy and agreement in the report"),
    quant_images: Optional[int] = typer.Option(None, "--quant-images", help=f"calibration images to quantize on (default: the "
                                                                             f"INT8 sweep's, else {DEFAULT_QUANT_IMAGES})"),
    data: DataOption = None,
    data_dir: DataDirOption = None,
    limit: LimitOption = None,
    json_: JsonOption = False,
) -> None:
    """Export the model (model.safetensors + optional torch.export/ONNX programs) with report.md."""
    cfg = ExportConfig(output=output, threshold=threshold, budget=budget, max_drop=max_drop, policy=policy,
                       formats=tuple(format_ or ("safetensors",)), force=force, quantize=quantize, quant_images=quant_images)
    request = DataRequest(spec=data, data_dir=data_dir, limit=limit) if data or data_dir or limit else None
    with progress_sink() as sink:
        doc = export(checkpoint, cfg, sink, data=request)
    emit(doc, json_, _show)


def _show(doc: dict[str, Any]) -> None:
    op = doc["operating_point"]
    val = op.get("val")
    table = Table(title=f"exported to {doc['output']}", show_header=False)
    table.add_column("key")
    table.add_column("value")
    table.add_row("operating point", f"{op['policy']} T={', '.join(f'{t:g}' for t in op['thresholds'])} ({op['how']})")
    if val:
        table.add_row("calibration", f"accuracy {format_percent(val.get('accuracy'))}, agreement {format_percent(val['agreement'])}, "
                      f"mean cost {val['cost']:.3f}")
    for name, what in doc["files"].items():
        table.add_row(name, what)
    ev = (doc.get("int8") or {}).get("evaluation")
    if ev:
        bb, ee = ev["int8_backbone"], ev["int8_early_exit"]
        table.add_row("INT8 (test)", f"early exit accuracy {format_percent(ee['accuracy'])}, agreement with the FP32 backbone "
                      f"{format_percent(ee['agreement_with_fp32_backbone'])}; INT8 backbone {format_percent(bb['accuracy'])}, "
                      f"{format_percent(bb['agreement_with_fp32_backbone'])} ({ev['images']} images)")
    console.print(table)
