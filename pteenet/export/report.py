"""The export's report: report.json (everything, machine-readable), report.md (the same for a person
who never saw the command line) and curve.png (the sweep's accuracy/cost curve, when there is one)."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_bytes, atomic_write_text
from ..exits import eenet, policies
from ..progress import format_macs, format_percent
from ..runtime.model import EarlyExitModel
from ..sweep import Point, curve_figure, pareto, threshold_list
from ..sweep.guarantee import describe
from ..sweep.pricing import unit as cost_unit
from ..tracing.hooks import NO_EARLY_EXIT
from ..version import __version__


def build_report(model: EarlyExitModel, point: dict[str, Any], files: dict[str, str],
                 source: str | None) -> dict[str, Any]:
    cost = model.cost
    history = model.meta.get("history") or []
    sweep = model.meta.get("sweep") or None
    val = point.get("val")
    return {
        "pteenet_version": __version__,
        "exported_at": model.meta.get("export", {}).get("exported_at"),
        "source_checkpoint": source,
        "backbone": {**model.info.to_dict(), "sha256": model.backbone_sha256,
                     "macs": cost.backbone_macs if cost else None},
        "branch": model.branch_config.name,
        "no_real_early_exit": NO_EARLY_EXIT if model.runtime == "hooks" else None,
        "branch_description": model.branch_config.description,
        "ensemble": model.ensemble is not None,
        "active_exits": list(model.active),
        "exits": [{"index": k, "name": p.name, "node": p.node, **({} if cost is None else {
            "prefix_macs": cost.exits[k].prefix_macs, "branch_macs": cost.exits[k].branch_macs,
            "cost": cost.exits[k].cost, "cost_paper": cost.exits[k].cost_paper})} for k, p in enumerate(model.exit_points)],
        "final_cost": cost.final_cost if cost else None,
        "training": {"config": model.meta.get("training"), "epochs": len(history),
                     "final_epoch": history[-1] if history else None} if model.meta.get("training") or history else None,
        "data": model.meta.get("data"),
        "sweep": None if not sweep else {k: sweep.get(k) for k in ("metric", "samples", "backbone", "oracle", "criterion", "points",
                                                                "no_accuracy", "nothing_pays")},
        "nothing_pays": nothing_pays(model),
        "operating_point": {**point, "rule": _rule(point["policy"]), "guarantee": _guarantee(sweep, point, model.num_exits),
                            "reduction": None if not val else 1.0 - val["cost"],
                            "reduction_paper": None if not val else 1.0 - val["cost_paper"]},
        "bench": model.meta.get("bench"),
        "files": files,
    }


def _guarantee(sweep: dict[str, Any] | None, point: dict[str, Any], n_exits: int) -> dict[str, Any] | None:
    """The sweep's certificate when the exported point is the setting it certified (or export
    certified it again at its own --max-drop), else None."""
    if point.get("guarantee"):
        return point["guarantee"]
    g, chosen = (sweep or {}).get("guarantee"), (sweep or {}).get("chosen") or {}
    ts = threshold_list(chosen.get("threshold"), n_exits)
    same = g and g.get("bound_points") is not None and chosen.get("policy") == point["policy"] and ts is not None \
        and len(ts) == len(point["thresholds"]) and all(abs(a - b) < 1e-9 for a, b in zip(ts, point["thresholds"]))
    return g if same else None


def nothing_pays(model: EarlyExitModel) -> str | None:
    """Where no exit takes decisions, the sentence that says the model is the backbone alone, and
    why (the sweep's reason, when it chose so); None otherwise."""
    if any(model.active):
        return None
    why = ((model.meta.get("sweep") or {}).get("nothing_pays") or {}).get("reason")
    return ("no exit takes decisions: the model runs the backbone alone (cost 1.000, no branch computed)"
            + (f", because early exit did not pay: {why}" if why else ""))


def _rule(policy: str | None) -> str | None:
    """The registry's sentence for the policy: when a sample leaves."""
    if policy == eenet.NAME:
        return eenet.RULE
    p = policies.POLICIES.get(policy)  # type: ignore[arg-type]
    return None if p is None else p.rule


def write_report(outdir: Path, report: dict[str, Any], sweep: dict[str, Any] | None) -> dict[str, str]:
    """Write the report files into ``outdir``; returns {file: what it is} for those written."""
    written = {"report.json": "this report, machine-readable", "report.md": "this report"}
    if sweep and sweep.get("points") and _write_curve(outdir / "curve.png", sweep, report["operating_point"]):
        written["curve.png"] = "the sweep's accuracy/cost curve with the chosen point"
    report = {**report, "files": {**report["files"], **written}}
    atomic_write_text(outdir / "report.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(outdir / "report.md", markdown(report))
    return written


def _write_curve(path: Path, sweep: dict[str, Any], point: dict[str, Any]) -> bool:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    val = point.get("val")
    chosen = None if not val else {**val, "policy": point["policy"], "threshold": _t(point["thresholds"])}
    # The sweep command's own chart, with our point marked.
    fig = curve_figure(Figure(figsize=(7, 4.5)), {**sweep, "chosen": chosen})
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return True


def _t(ts: list[float]) -> float | list[float]:
    return ts[0] if len(set(ts)) == 1 else ts


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def _scalars(d: dict[str, Any] | None, prefix: str = "") -> list[list[Any]]:
    """Rows of (dotted key, value) for a nested record such as one epoch of the training history."""
    rows: list[list[Any]] = []
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            rows += _scalars(v, f"{prefix}{k}.")
        elif v is None or isinstance(v, (int, float, str, bool)) or (
                isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) for x in v)):
            rows.append([f"{prefix}{k}", _fmt(v)])
    return rows


def markdown(r: dict[str, Any]) -> str:
    """report.md: the report's sections in order, each written by its own function below."""
    n_exits = len(r["exits"])
    out = _intro_md(r) + ["## Files", ""] + _table(["file", "what"], [[f"`{k}`", v] for k, v in r["files"].items()])
    out += ["", _inputs_md(r["backbone"]), ""] + _usage_md(r["files"], n_exits) + _classes_md(r["backbone"])
    out += ["## Backbone and exits", ""] + _exits_md(r)
    out += ["", "## Training", ""] + _training_md(r)
    out += ["", "## Threshold sweep", ""] + _sweep_md(r["sweep"])
    out += ["", "## Operating point", ""] + _point_md(r["operating_point"], n_exits)
    out += ["", "## Measured speed", ""] + _bench_md(r["bench"], r["operating_point"])
    if r.get("int8"):
        out += ["", "## INT8 program", ""] + _int8_md(r["int8"])
    if d := r.get("onnx_decisions"):  # eager and ONNX Runtime round differently: counted, not assumed
        out += ["", "## Staged ONNX decisions", "",
                f"On {d['images']} test images, {d['exits_differ']} left the staged ONNX program (in ONNX Runtime) at "
                "another exit than the eager model, whose values the threshold was chosen and certified on."]
    return "\n".join(out) + "\n"


def _int8_md(q: dict[str, Any]) -> list[str]:
    """What was quantized on what, what the thresholds were chosen for, and the INT8 programs' numbers."""
    rec = q["quantization"]
    out = [f"`staged_onnx_int8/` and `backbone_int8.onnx` are static INT8 ({rec['tool']}, {rec['format']}, per-channel "
           f"weights, {rec['ranges']} ranges) quantized on {rec['rows']} ({rec['data']}). {q['chosen_for'][0].upper() + q['chosen_for'][1:]}.", ""]
    ev = q.get("evaluation")
    if not ev:
        return out + ["No test images: accuracy and agreement not measured."]
    pct = format_percent
    out += [f"On the first {ev['images']} test images (FP32 backbone accuracy {pct(ev['fp32_backbone_accuracy'])}):", ""]
    rows = [[name, pct(d["fraction"]), pct(d["accuracy"]), pct(d["agreement_with_fp32_backbone"])]
            for name, d in (("INT8 backbone", ev["int8_backbone"]), ("INT8 early exit", ev["int8_early_exit"]))]
    rows += [[f"exit {d['exit']}", pct(d["fraction"]), pct(d["accuracy"]), pct(d["agreement_with_fp32_backbone"])]
             for d in ev["per_exit"]]
    return out + _table(["program / where samples left", "samples", "accuracy", "agreement with FP32 backbone"], rows)


def _intro_md(r: dict[str, Any]) -> list[str]:
    """The title, where the file came from, and what the model does at run time."""
    bb, op = r["backbone"], r["operating_point"]
    n_exits = len(r["exits"])
    ts = ", ".join(f"{t:g}" for t in op["thresholds"])
    return [f"# Early-exit model: {bb['spec']} with {n_exits} exits", "",
            f"Exported by pteenet {r['pteenet_version']} on {r['exported_at']} from "
            + (f"`{r['source_checkpoint']}`." if r["source_checkpoint"] else "a model in memory."), "",
            f"A frozen pretrained backbone (`{bb['spec']}`, {bb['num_classes']} classes) with {n_exits} early-exit branches "
            f"({r.get('branch_description') or r['branch']}) attached at the points below"
            + ("; each exit answers with a fitted ensemble of every head up to it" if r.get("ensemble") else "")
            + (f"; {sum(r['active_exits'])} of the {n_exits} exits take decisions (exit selection)"
               if r.get("active_exits") and not all(r["active_exits"]) else "") + ". "
            f"At run time a sample leaves at the first exit where **{op['rule']}** (policy `{op['policy']}`, thresholds {ts}); "
            "otherwise it runs the whole backbone and gets the backbone's own answer. The backbone's weights are unchanged.", "",
            *([f"**Note: {r['no_real_early_exit']}.**", ""] if r.get("no_real_early_exit") else []),
            *([f"**Note: {r['nothing_pays']}.**", ""] if r.get("nothing_pays") else [])]


def _inputs_md(bb: dict[str, Any]) -> str:
    """What an input must be: size, framing, normalisation, and the backbone it was made for."""
    pre = bb["preprocess"]
    size = "x".join(map(str, pre["input_size"]))
    framing = ""
    if pre.get("resize"):
        rh, rw = pre["resize"]
        how = (f"its shorter side resized to {rh}" if pre["crop_mode"] == "center" and rh == rw else
               f"resized to {rh}x{rw}" + (" keeping its aspect ratio" if pre["crop_mode"] == "center" else ""))
        framing = f" (an image has {how} ({pre['interpolation']}), then its centre cropped)"
    return (f"Inputs: float32 images {size}{framing}, pixels in [0, 1] then (x - mean) / std with mean {pre['mean']} "
            f"and std {pre['std']}. Backbone sha256 `{bb['sha256'][:16]}...`"
            + (f", weights `{bb['weights']}`." if bb.get("weights") else "."))


def _classes_md(bb: dict[str, Any]) -> list[str]:
    """The class names (the first 20), where the data record had them."""
    if not bb.get("class_names"):
        return []
    names = bb["class_names"]
    return ["Classes: " + ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "") + ".", ""]


def _exits_md(r: dict[str, Any]) -> list[str]:
    """Where each exit sits and what a sample leaving there paid, in both cost conventions."""
    bb = r["backbone"]
    out = [f"The plain backbone costs {format_macs(bb['macs'])} MACs per image. Costs are fractions of that: **cumulative** counts "
           "the backbone up to the exit plus every branch evaluated on the way (what a sample leaving there really paid); "
           "**paper** counts the backbone up to the exit plus that exit's own branch (the PTEENet paper's convention).", ""]
    rows = [[k["index"] + 1, f"`{k['name']}`", format_macs(k.get("prefix_macs")), format_macs(k.get("branch_macs")),
             f"{k['cost']:.3f}" if "cost" in k else "-", f"{k['cost_paper']:.3f}" if "cost_paper" in k else "-"] for k in r["exits"]]
    rows.append(["end", "backbone output", format_macs(bb["macs"]), "", f"{r['final_cost']:.3f}" if r["final_cost"] else "-", "1.000"])
    return out + _table(["exit", "attached at", "backbone MACs so far", "branch MACs", "cost (cumulative)", "cost (paper)"], rows)


def _training_md(r: dict[str, Any]) -> list[str]:
    """How the branches were trained: the data, the settings and the last epoch's metrics."""
    tr = r["training"]
    if not tr:
        return ["No training is recorded in this checkpoint: the branches may be untrained."]
    out = [f"The branches were trained for {tr['epochs']} epochs with the backbone frozen."]
    if r.get("data"):
        out += ["", "Data:", ""] + _table(["setting", "value"], _scalars(r["data"]))
    if tr.get("config"):
        out += ["", "Settings:", ""] + _table(["setting", "value"], _scalars(tr["config"]))
    if tr.get("final_epoch"):
        out += ["", "Final epoch:", ""] + _table(["metric", "value"], _scalars(tr["final_epoch"]))
    return out


def _usage_md(files: dict[str, str], n_exits: int) -> list[str]:
    out = ["How to run it:", "", "```python", "import pteenet, torch",
           "model = pteenet.load('model.safetensors')  # an nn.Module; model(x) exits early per sample",
           "pred = model.predict(x)  # .logits, .pred, .exit_index; model.set_thresholds(T) retunes it"]
    if "model.pt2" in files:
        out += ["ep = torch.export.load('model.pt2')  # batch size 1; the thresholds are an input",
                "with torch.inference_mode():  # with autograd on, every torch.cond call is re-traced (slow)",
                f"    logits, exit_index = ep.module()(x1, torch.tensor([T] * {n_exits}))"]
    if "model_static.pt2" in files:
        out += ["outs = torch.export.load('model_static.pt2').module()(x)  # every exit's logits and h, then the final logits"]
    out += ["```", ""]
    if "model.onnx" in files:
        out += [f"`model.onnx` (batch size 1): inputs `x` [1, C, H, W] and `thresholds` [{n_exits}] (float32); outputs "
                "`logits` [1, K] and `exit_index` [1] (int64; "
                f"{n_exits} means the backbone's end). Only the exits up to the one taken are computed.", ""]
    for folder in ("staged_onnx", "staged_pt2"):
        if folder in files:
            out += [f"`{folder}/` (any batch size, real early exit): one program per computed exit; "
                    f"`from run_staged import StagedModel; logits, exit_index = StagedModel('{folder}'"
                    + ("" if folder == "staged_onnx" else ", torch_runner") + ").run(x)` (numpy in and out; "
                    "`run_staged.py` is in the folder, `torch_runner` in `pteenet.export.staged`). Only the rows "
                    "still in flight run on.", ""]
    if "model_static.onnx" in files:
        out += ["`model_static.onnx` (any batch size): input `x`; outputs `exitK_logits`, `exitK_confidence` (h) for each "
                "exit K and `final_logits`. Every exit is computed: apply the rule above to the outputs to get the same "
                "answers; it saves no compute.", ""]
    return out


def _sweep_md(sw: dict[str, Any] | None) -> list[str]:
    if not sw:
        return ["No sweep is recorded: the operating point's accuracy and cost were not measured "
                "(`pteenet sweep-threshold --write` measures them)."]
    metric = sw.get("metric") or "accuracy"
    points = [p for p in sw.get("points") or [] if p.get("threshold") is not None]
    n_exits = len(points[0]["exit_fractions"]) - 1 if points else 0
    front = pareto([Point.from_dict(p, n_exits) for p in points])
    out = [f"Every policy and threshold was evaluated on {sw.get('samples')} held-out calibration images; "
           f"{metric} is against the {'labels' if metric == 'accuracy' else 'backbone'}. Backbone alone: "
           f"{metric} {format_percent((sw.get('backbone') or {}).get(metric))} at cost 1. Oracle (each image leaves at the first right exit): "
           f"{format_percent((sw.get('oracle') or {}).get(metric))} at cost {(sw.get('oracle') or {}).get('cost', float('nan')):.3f}. "
           f"{len(points)} points were swept; the best trade-offs (Pareto front) are:", ""]
    rows = [[p.policy, p.kind, ", ".join(f"{t:g}" for t in sorted(set(p.thresholds or [])))[:40], format_percent(p.metric),
             f"{p.cost:.3f}", f"{p.cost_paper:.3f}"] for p in front]
    out += _table(["policy", "kind", "threshold", metric, "cost", "cost (paper)"], rows)
    if sw.get("no_accuracy"):
        out += ["", f"No accuracy: {sw['no_accuracy']}."]
    return out + ["", "The whole curve is in `report.json` (`sweep.points`) and, when plotted, `curve.png`."]


def _point_md(op: dict[str, Any], n_exits: int) -> list[str]:
    out = [f"Chosen as {op['how']}: policy `{op['policy']}`, thresholds {', '.join(f'{t:g}' for t in op['thresholds'])}."]
    g = op.get("guarantee")
    out += ["", f"**Guarantee.** {describe(g)}" if g else
            "**No guarantee** for new data: this point was not certified (`pteenet sweep-threshold --max-drop P "
            "--confidence C --write` certifies one)."]
    val = op.get("val")
    if not val:
        why = "The sweep did not evaluate this exact setting" if "val" in op else "No sweep was run"
        return out + ["", f"{why}, so its accuracy and cost are not known here."]
    change = 1 - val["cost"]
    cm = op.get("cost_model") or {}
    unit = cost_unit(cm)
    saving = f"{100 * change:.1f}% less {unit}" if change >= 0 else f"{-100 * change:.1f}% MORE {unit} than the backbone"
    out += ["", f"On the calibration split: accuracy {format_percent(val.get('accuracy'))}, agreement with the backbone "
            f"{format_percent(val.get('agreement'))}, mean cost {val['cost']:.3f} of the backbone ({saving}; "
            f"paper convention {val['cost_paper']:.3f})."]
    test = op.get("test")
    if test:
        tb = test.get("backbone") or {}
        out += ["", f"On the test split (not used to choose it): accuracy {format_percent(test.get('accuracy'))} "
                f"(backbone {format_percent(tb.get('accuracy'))}), agreement {format_percent(test.get('agreement'))}, mean cost {test['cost']:.3f}."]
    labels = [str(k + 1) for k in range(n_exits)] + ["end"]
    out += ["", "Where the calibration images left:", ""]
    out += _table(labels, [[format_percent(f) for f in val["exit_fractions"]]])
    return out


def _bench_md(b: dict[str, Any] | None, op: dict[str, Any]) -> list[str]:
    if not b:
        return ["Not measured: `pteenet bench CKPT --data SPEC --record` times the early-exit model against the backbone "
                "and stores the result in the checkpoint for this report."]
    out = [f"Measured {b.get('measured_at')} on {b.get('device')} ({b.get('cpu')}, torch {b.get('torch')}, "
           f"{b.get('threads')} thread{'s' if b.get('threads') != 1 else ''}), {b.get('images')} {b.get('split', '')} images of {b.get('data', '?')}, "
           f"median of {b.get('repeats')} interleaved repeats, policy `{b.get('policy')}` thresholds "
           f"{', '.join(f'{t:g}' for t in b.get('thresholds') or [])}."]
    if b.get("policy") != op["policy"] or any(abs(x - y) > 1e-9 for x, y in zip(b.get("thresholds") or [], op["thresholds"])):
        out += ["", "**Note:** these timings were taken at a different operating point than the one exported."]
    rows = [[batch_label(x), f"{x['backbone']['images_per_s']:.1f}", f"{x['early_exit']['images_per_s']:.1f}",
             f"{x['time_ratio']:.3f}", "-" if x.get("mac_ratio") is None else f"{x['mac_ratio']:.3f}",
             f"{x['backbone']['latency_ms']['p50']:.2f} / {x['backbone']['latency_ms']['p95']:.2f}",
             f"{x['early_exit']['latency_ms']['p50']:.2f} / {x['early_exit']['latency_ms']['p95']:.2f}"] for x in b["results"]]
    out += [""] + _table(["batch", "backbone img/s", "early-exit img/s", "time ratio", "MAC ratio",
                          "backbone ms p50 / p95", "early-exit ms p50 / p95"], rows)
    return out + [""] + [f"- {x['verdict']}" for x in b["results"]] + [f"- Warning: {w}" for w in b.get("warnings", [])]


def batch_label(x: dict[str, Any]) -> str:
    """The batch size asked for, and the one used when there were fewer images than that."""
    used = x.get("images_per_batch", x["batch_size"])
    return str(x["batch_size"]) if used == x["batch_size"] else f"{x['batch_size']} ({used} used)"
