"""Sweep outputs: the JSON document, sweep.csv, curve.png / exits.png (the table is the CLI's).

matplotlib is optional (``pteenet[plots]``): it is imported only when plotting, through the Agg
canvas directly (no pyplot), so a user's interactive backend is never switched.
"""
from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write_bytes
from ..evaluation.cache import ExitCache
from ..evaluation.engine import Point, backbone_point, evaluate, oracle_point
from .per_class import evaluate as evaluate_per_class
from .pricing import unit

PLOTS_WARNING = "matplotlib is not installed: skipped curve.png and exits.png " \
                "(pip install 'pteenet[plots]')"


def _summary(p: Point, full: bool = False) -> dict[str, Any]:
    d = {"accuracy": p.accuracy, "agreement": p.agreement, "cost": p.cost}
    if full:
        d.update(cost_paper=p.cost_paper, exit_fractions=p.exit_fractions)
    return d


def build_document(cache: ExitCache, points: Sequence[Point], chosen: Point | None,
                   test_cache: ExitCache | None = None, *, budget: float | None = None,
                   max_drop: float | None = None) -> dict[str, Any]:
    """The sweep's JSON document: backbone and oracle on ``cache`` (the swept split), every swept point
    (global and per-exit, all policies), the chosen point, and - with ``test_cache`` - the chosen
    setting re-evaluated on test (under ``chosen["test"]``) so its numbers are not val-tuned."""
    backbone = backbone_point(cache)
    doc: dict[str, Any] = {
        "samples": cache.num_samples,
        "exits": cache.num_exits,
        "metric": "accuracy" if cache.labels is not None else "agreement",
        "costs": cache.costs.tolist(),
        "costs_paper": cache.costs_paper.tolist(),
        "criterion": {"budget": budget, "max_drop": max_drop},
        "backbone": _summary(backbone),
        "oracle": _summary(oracle_point(cache), full=True),
        "points": [p.to_dict() for p in points],
        "chosen": None if chosen is None else chosen.to_dict(),
    }
    if chosen is not None and test_cache is not None and chosen.policy and chosen.thresholds:
        ts = chosen.thresholds[0] if chosen.kind == "global" else chosen.thresholds
        test = (evaluate(test_cache, chosen.policy, ts) if chosen.class_thresholds is None
                else evaluate_per_class(test_cache, chosen.policy, np.asarray(chosen.class_thresholds))).to_dict()
        test["backbone"] = _summary(backbone_point(test_cache))
        doc["chosen"]["test"] = test
    return doc


def _threshold_text(t: Any, sep: str = ";") -> str:
    if t is None:
        return ""
    if isinstance(t, (list, tuple)):
        return sep.join(f"{x:g}" for x in t)
    return f"{t:g}"


def short_thresholds(t: Any) -> str:
    """A threshold or per-exit threshold list as a label of at most 30 characters."""
    text = _threshold_text(t, ",")
    return text if len(text) <= 30 else text[:27] + "..."


def _csv_bytes(points: Sequence[dict[str, Any]]) -> bytes:
    e = max((len(p["exit_fractions"]) for p in points), default=1) - 1
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["policy", "kind", "threshold", "accuracy", "agreement", "cost", "cost_paper"]
               + [f"exit_{k + 1}" for k in range(e)] + ["exit_end"])
    for p in points:
        w.writerow([p.get("policy") or "", p.get("kind", "global"), _threshold_text(p["threshold"]),
                    "" if p["accuracy"] is None else repr(p["accuracy"]), repr(p["agreement"]),
                    repr(p["cost"]), repr(p["cost_paper"])] + [repr(f) for f in p["exit_fractions"]])
    return buf.getvalue().encode()


def write_sweep_outputs(outdir: str | os.PathLike, document: dict[str, Any],
                        plots: bool = True) -> str | None:
    """Write sweep.json, sweep.csv and (when matplotlib is importable) curve.png and exits.png,
    each atomically. Returns a warning when the PNGs had to be skipped, else None."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "sweep.json", (json.dumps(document, indent=2) + "\n").encode())
    atomic_write_bytes(out / "sweep.csv", _csv_bytes(document.get("points", [])))
    if not plots:
        return None
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return PLOTS_WARNING

    def save(fig: Any, name: str) -> None:
        FigureCanvasAgg(fig)  # attaches the Agg canvas; no global backend state is touched
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
        atomic_write_bytes(out / name, buf.getvalue())

    save(curve_figure(Figure(figsize=(7, 4.5)), document), "curve.png")
    chosen = document.get("chosen")
    if chosen:
        save(_exits_figure(Figure(figsize=(7, 3.5)), chosen), "exits.png")
    else:
        (out / "exits.png").unlink(missing_ok=True)  # a stale chart would contradict sweep.json
    return None


def cost_axis_label(doc: dict[str, Any]) -> str:
    """The curve's x-axis: what a point's cost is, from the document's ``cost_model`` (predicted time
    at the deploy batch size, or MACs); documents written before time pricing priced in MACs."""
    return f"mean cumulative cost: {unit(doc.get('cost_model') or {'kind': 'macs'})} (fraction of the backbone's)"


def curve_figure(fig: Any, doc: dict[str, Any]) -> Any:
    """Accuracy (or agreement) against cost for every policy and kind in a sweep document, with the
    backbone, the oracle and the chosen point marked; drawn on ``fig`` (a matplotlib Figure)."""
    metric = doc.get("metric") or ("accuracy" if doc["backbone"]["accuracy"] is not None
                                   else "agreement")
    ax = fig.add_subplot(1, 1, 1)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for p in doc.get("points", []):
        groups.setdefault((p.get("policy") or "?", p.get("kind", "global")), []).append(p)
    colours = {pol: f"C{i}" for i, pol in enumerate(sorted({pol for pol, _ in groups}))}
    for (policy, kind), pts in sorted(groups.items()):
        pts = sorted(pts, key=lambda p: p["cost"])
        xs, ys = [p["cost"] for p in pts], [100 * p[metric] for p in pts]
        style = "-" if kind == "global" else "D"  # per-exit points: markers in the policy's colour
        ax.plot(xs, ys, style, color=colours[policy], lw=1.5, ms=5, label=f"{policy} ({kind})")
    for key, style in (("backbone", "k*"), ("oracle", "r*")):
        ref = doc.get(key)
        if ref and ref.get(metric) is not None:
            ax.plot([ref["cost"]], [100 * ref[metric]], style, ms=12, label=key)
    chosen = doc.get("chosen")
    if chosen:
        x, y = chosen["cost"], 100 * chosen[metric]
        ax.plot([x], [y], "o", ms=12, mfc="none", mec="green", mew=2)
        ax.annotate(f"chosen: {chosen.get('policy')} T={short_thresholds(chosen['threshold'])}"
                    f"\n{metric} {y:.2f}%, cost {x:.3f}", (x, y), xytext=(15, -35),
                    textcoords="offset points", fontsize=8,
                    bbox={"boxstyle": "round", "fc": "white", "alpha": 0.9},
                    arrowprops={"arrowstyle": "->", "color": "green"})
    ax.set_xlabel(cost_axis_label(doc))
    ax.set_ylabel(f"{metric} (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # outside: no overlap
    return fig


def _exits_figure(fig: Any, chosen: dict[str, Any]) -> Any:
    fr = chosen["exit_fractions"]
    ax = fig.add_subplot(1, 1, 1)
    labels = [str(k + 1) for k in range(len(fr) - 1)] + ["end"]
    ax.bar(range(len(fr)), [100 * f for f in fr], color="tab:blue")
    ax.set_xticks(range(len(fr)), labels)
    ax.set_xlabel("exit")
    ax.set_ylabel("samples leaving (%)")
    ax.set_title(f"{chosen.get('policy')}, threshold {short_thresholds(chosen['threshold'])}",
                 fontsize=9)
    return fig
