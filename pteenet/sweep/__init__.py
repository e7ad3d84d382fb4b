"""The threshold sweep: one pass over a split into an exit cache, then every policy and threshold
evaluated from it, the choice, and the outputs.

- ``cache``: ``ExitCache`` and ``ExitCacheBuilder``, the one way model outputs become a cache
  (training's metrics, the sweep and the benchmarks all use it).
- ``engine``: pure numpy over a cache: ``evaluate``, ``sweep_global``, ``search_per_exit``,
  ``pareto``, ``select``.
- ``run``: the sweep of a model in memory (``sweep_model``), ``pteenet sweep-threshold`` on a
  checkpoint file (``sweep_threshold``), and ``build_cache``.
- ``preflight``: what a sweep checks and warns about before its pass over the data.
- ``selection``: exit selection (which exits decide at all), priced as the runtime runs it.
- ``guarantee`` (with ``bounds``): the ``--max-drop`` choice certified for new data (Learn-then-Test).
- ``outputs``: the JSON document, sweep.csv and the plots.

The policies themselves live in ``pteenet.exits.policies``.
"""
from __future__ import annotations

from .cache import ExitCache, ExitCacheBuilder, gather_exit_cache
from .engine import (
           Point,
           backbone_point,
           below_cheapest,
           evaluate,
           oracle_point,
           pareto,
           parse_range,
           search_per_exit,
           select,
           sweep_global,
           threshold_list,
)
from .guarantee import CONFIDENCE, Certified, Guarantee, certify, recertify
from .outputs import PLOTS_WARNING, build_document, cost_axis_label, curve_figure, short_thresholds, write_sweep_outputs
from .run import SweepConfig, build_cache, sweep_meta, sweep_model, sweep_points, sweep_threshold
from .selection import Selection, restrict, select_exits

__all__ = ["CONFIDENCE", "Certified", "Guarantee", "certify", "recertify", "PLOTS_WARNING", "ExitCache", "ExitCacheBuilder", "Point", "SweepConfig", "backbone_point",
           "below_cheapest", "build_cache", "build_document", "cost_axis_label", "curve_figure", "evaluate", "gather_exit_cache",
           "oracle_point", "pareto", "parse_range", "restrict", "search_per_exit", "select", "select_exits",
           "Selection", "short_thresholds", "sweep_global", "sweep_meta", "sweep_model", "sweep_points", "sweep_threshold",
           "threshold_list", "write_sweep_outputs"]
