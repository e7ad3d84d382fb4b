"""Exits evaluated from one pass: the exit cache and the engine that scores policies and thresholds on it.

- ``cache``: ``ExitCache`` and ``ExitCacheBuilder``, the one way model outputs become a cache
  (training's metrics, the sweep and the benchmarks all use it).
- ``engine``: pure numpy over a cache: ``evaluate``, ``sweep_global``, ``search_per_exit``,
  ``pareto``, ``select``.

It sits below training, which scores its calibration split with it, and below the sweep, which
runs the model into a cache (``sweep.build_cache``) and chooses, certifies and writes from it.
"""
from __future__ import annotations

from .cache import ExitCache, ExitCacheBuilder, gather_exit_cache
from .engine import (
           Point,
           backbone_point,
           below_cheapest,
           evaluate,
           exit_indices,
           oracle_point,
           pareto,
           parse_range,
           search_per_exit,
           select,
           sweep_global,
           threshold_list,
)

__all__ = ["ExitCache", "ExitCacheBuilder", "Point", "backbone_point", "below_cheapest", "evaluate", "exit_indices",
           "gather_exit_cache", "oracle_point", "pareto", "parse_range", "search_per_exit", "select", "sweep_global",
           "threshold_list"]
