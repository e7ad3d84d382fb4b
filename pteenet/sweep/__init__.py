"""The threshold sweep: one pass over a split into an exit cache, then every policy and threshold
evaluated from it, the choice, and the outputs.

- The exit cache and the engine over it (``evaluate``, ``sweep_global``, ``search_per_exit``,
  ``pareto``, ``select``) live in ``pteenet.evaluation``, below training, which uses them too;
  they are re-exported here, where the sweep's users have always found them.
- ``run``: the sweep of a model in memory (``sweep_model``), ``pteenet sweep-threshold`` on a
  checkpoint file (``sweep_threshold``), and ``build_cache``.
- ``preflight``: what a sweep checks and warns about before its pass over the data.
- ``selection``: exit selection (which exits decide at all), priced as the runtime runs it.
- ``guarantee`` (with ``bounds``): the ``--max-drop`` choice certified for new data (Learn-then-Test).
- ``outputs``: the JSON document, sweep.csv and the plots.
- ``eenet``: policy eenet, EENet's learned scheduler: ``fit`` (at a budget) or ``certify_eenet`` (at a
  drop) on a cache with logits, ``evaluate`` / ``exit_indices`` of the fitted ``Setting`` on another.

The policies themselves live in ``pteenet.exits.policies``.
"""
from __future__ import annotations

from ..evaluation import *  # noqa: F403  (the cache and the engine, re-exported: pteenet.evaluation.__all__)
from ..evaluation import __all__ as _evaluation
from .guarantee import CONFIDENCE, Certified, Guarantee, certify, recertify
from .outputs import PLOTS_WARNING, build_document, cost_axis_label, curve_figure, short_thresholds, write_sweep_outputs
from .passes import build_cache
from .run import SweepConfig, sweep_meta, sweep_model, sweep_points, sweep_threshold
from .selection import Selection, restrict, select_exits

__all__ = [*_evaluation, "CONFIDENCE", "Certified", "Guarantee", "certify", "recertify", "PLOTS_WARNING", "SweepConfig",
           "build_cache", "build_document", "cost_axis_label", "curve_figure", "restrict", "select_exits", "Selection",
           "short_thresholds", "sweep_meta", "sweep_model", "sweep_points", "sweep_threshold", "write_sweep_outputs"]
