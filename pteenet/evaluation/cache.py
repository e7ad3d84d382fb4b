"""The exit cache: every exit's prediction and every policy's score for one split, from one pass.

Built batch by batch from ``EarlyExitModel.forward_all`` outputs (``ExitCacheBuilder``: training's
metrics, the sweep and the benchmarks all build it this one way); the sweep engine then tries any
number of thresholds on it without running the model again.
Saved as .npz without pickles.
"""
from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .. import distributed
from ..atomic import atomic_write_bytes
from ..distributed import Group
from ..errors import PteenetError
from ..exits import policies as pol
from ..runtime.model import AllExits, EarlyExitModel

_FORMAT = 1  # bump when the .npz layout changes


@dataclass
class ExitCache:
    """Per-exit predictions and scores of one split (no probability vectors: it stays small)."""

    preds: np.ndarray  # int32 [E+1, N]; row E is the backbone's prediction
    scores: dict[str, np.ndarray]  # policy -> float32 [E, N]
    labels: np.ndarray | None  # int64 [N], None when the split has no labels
    costs: np.ndarray  # float64 [E+1], cumulative
    costs_paper: np.ndarray  # float64 [E+1], the paper's convention
    # int32 [N]: the model drops and agreement are measured against, where it is not the program's
    # own end (row E): the FP32 backbone of an INT8 program. None: row E.
    reference: np.ndarray | None = None
    # float32 [E, N, K]: each exit's logits, kept only where a learned policy needs them (EENet's
    # scheduler reads the class probabilities); None otherwise, so a cache stays small.
    logits: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.preds = np.asarray(self.preds, dtype=np.int32)
        self.scores = {p: np.asarray(s, dtype=np.float32) for p, s in self.scores.items()}
        self.labels = None if self.labels is None else np.asarray(self.labels, dtype=np.int64)
        self.costs = np.asarray(self.costs, dtype=np.float64).reshape(-1)
        self.costs_paper = np.asarray(self.costs_paper, dtype=np.float64).reshape(-1)
        self.logits = None if self.logits is None else np.asarray(self.logits, dtype=np.float32)
        bad = self.preds.ndim != 2 or self.preds.shape[0] < 1
        e, n = (self.preds.shape[0] - 1, self.preds.shape[1]) if not bad else (0, 0)
        bad = bad or any(s.shape != (e, n) for s in self.scores.values())
        bad = bad or (self.labels is not None and self.labels.shape != (n,))
        self.reference = None if self.reference is None else np.asarray(self.reference, dtype=np.int32)
        bad = bad or (self.reference is not None and self.reference.shape != (n,))
        bad = bad or (self.logits is not None and (self.logits.ndim != 3 or self.logits.shape[:2] != (e, n)))
        if bad or self.costs.shape != (e + 1,) or self.costs_paper.shape != (e + 1,):
            raise PteenetError("the exit cache is inconsistent (array shapes do not match)",
                               "recompute it from the model")
        # Stateful policies' scores follow from the predictions (caches saved before them lack them).
        missing = [p for p in pol.STATEFUL if p not in self.scores]
        if missing:
            self.scores.update({p: s for p, s in pol.chain_scores(self.preds[:-1]).items() if p in missing})

    @property
    def num_exits(self) -> int:
        return self.preds.shape[0] - 1

    @property
    def num_samples(self) -> int:
        return self.preds.shape[1]

    @property
    def backbone_preds(self) -> np.ndarray:
        """[N] the backbone's predictions, what drops and agreement are measured against."""
        return self.preds[-1] if self.reference is None else self.reference

    def take(self, idx: np.ndarray) -> ExitCache:
        """The cache of some of its samples (``idx``: indices or a boolean mask)."""
        return ExitCache(self.preds[:, idx], {k: v[:, idx] for k, v in self.scores.items()},
                         None if self.labels is None else self.labels[idx], self.costs, self.costs_paper,
                         reference=None if self.reference is None else self.reference[idx],
                         logits=None if self.logits is None else self.logits[:, idx])

    def save(self, path: str | os.PathLike) -> None:
        """Save as .npz (no pickles), atomically."""
        arrays = {"format": np.array(_FORMAT), "preds": self.preds, "costs": self.costs,
                  "costs_paper": self.costs_paper}
        arrays.update({f"score_{p}": s for p, s in self.scores.items()})
        if self.labels is not None:
            arrays["labels"] = self.labels
        if self.reference is not None:
            arrays["reference"] = self.reference
        if self.logits is not None:  # an extra array: readers that do not know it skip it
            arrays["logits"] = self.logits
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> ExitCache:
        hint = "recompute the cache from the model"
        try:
            with np.load(path, allow_pickle=False) as z:
                if not isinstance(z, np.lib.npyio.NpzFile) or int(z["format"]) != _FORMAT:
                    raise PteenetError(f"{path} is not an exit cache of this version", hint)
                return cls(preds=z["preds"], labels=z["labels"] if "labels" in z.files else None,
                           scores={k[6:]: z[k] for k in z.files if k.startswith("score_")},
                           costs=z["costs"], costs_paper=z["costs_paper"],
                           reference=z["reference"] if "reference" in z.files else None,
                           logits=z["logits"] if "logits" in z.files else None)
        except FileNotFoundError:
            raise PteenetError(f"no exit cache at {path}", hint) from None
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as e:
            raise PteenetError(f"cannot read the exit cache {path}: {e}", hint) from None


class ExitCacheBuilder:
    """Accumulates per-batch model outputs, then builds an ``ExitCache``."""

    def __init__(self, logits: bool = False) -> None:
        self._preds: list[np.ndarray] = []
        self._logits: list[np.ndarray] | None = [] if logits else None  # each exit's logits, when kept
        self._scores: dict[str, list[np.ndarray]] = {p: [] for p in pol.POLICIES if p not in pol.STATEFUL}
        self._labels: list[np.ndarray] = []
        self._reference: list[np.ndarray] = []
        self._num_exits: int | None = None

    @torch.no_grad()
    def add(self, exit_logits: list[torch.Tensor], exit_conf: list[torch.Tensor],
            final_logits: torch.Tensor, labels: torch.Tensor | None = None, reference: torch.Tensor | None = None) -> None:
        """One batch: each exit's logits [B,K] and confidence LOGITS [B], the backbone's logits.
        Labels that are all negative (``data.UNLABELLED``: images without labels) count as none.
        ``reference``: the predictions [B] to measure against, where not the backbone's (``ExitCache.reference``)."""
        e, b = len(exit_logits), final_logits.shape[0]
        if labels is not None and labels.numel() and bool((labels < 0).all()):
            labels = None
        if len(exit_conf) != e or self._num_exits not in (None, e):
            raise ValueError("every batch needs the same number of exit logits and confidences")
        if self._preds and (labels is None) != (not self._labels):
            raise ValueError("either every batch has labels or none has")
        self._num_exits = e
        rows = [lg.detach().argmax(1) for lg in exit_logits] + [final_logits.detach().argmax(1)]
        self._preds.append(torch.stack(rows).to(torch.int32).cpu().numpy())
        per_exit = [pol.scores(lg.detach(), c.detach()) for lg, c in zip(exit_logits, exit_conf)]
        for p in self._scores:
            s = torch.stack([d[p] for d in per_exit]).cpu().numpy() if e else np.zeros((0, b))
            self._scores[p].append(s.astype(np.float32))
        if labels is not None:
            self._labels.append(labels.detach().reshape(-1).to(torch.int64).cpu().numpy())
        if reference is not None:
            self._reference.append(reference.detach().reshape(-1).to(torch.int32).cpu().numpy())
        if self._logits is not None:
            k = final_logits.shape[1]
            z = torch.stack([lg.detach().float() for lg in exit_logits]).cpu().numpy() if e else np.zeros((0, b, k))
            self._logits.append(z.astype(np.float32))

    def add_outputs(self, out: AllExits, labels: torch.Tensor | None = None) -> None:
        """One batch of ``EarlyExitModel.forward_all`` (or ``branch_outputs``) outputs."""
        self.add(out.exit_logits, out.exit_conf, out.final_logits, labels)

    def build_for(self, model: EarlyExitModel) -> ExitCache:
        """The cache, with the costs of ``model``'s exits."""
        if model.cost is None:
            raise PteenetError("the checkpoint has no cost table", "attach the branches with `pteenet attach`")
        return self.build(model.cost.costs(), model.cost.costs_paper())

    def arrays(self) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray | None] | None:
        """(preds, scores, labels) so far, samples on the last axis; None before any batch."""
        if not self._preds:
            return None
        return (np.concatenate(self._preds, axis=1), {p: np.concatenate(v, axis=1) for p, v in self._scores.items()},
                np.concatenate(self._labels) if self._labels else None)

    def build(self, costs: Sequence[float], costs_paper: Sequence[float]) -> ExitCache:
        cache = _cache(self.arrays(), costs, costs_paper)
        if self._reference:
            cache.reference = np.concatenate(self._reference).astype(np.int32)
        if self._logits:  # one process only: gather_exit_cache does not carry them
            cache.logits = np.concatenate(self._logits, axis=1)
        return cache


def _cache(arrays: tuple[np.ndarray, dict[str, np.ndarray], np.ndarray | None] | None, costs: Sequence[float],
           costs_paper: Sequence[float]) -> ExitCache:
    if arrays is None:
        raise PteenetError("no samples were evaluated", "check that the data split is not empty")
    preds, scores, labels = arrays
    return ExitCache(preds=preds, scores=scores, labels=labels, costs=np.asarray(costs),
                     costs_paper=np.asarray(costs_paper))


def gather_exit_cache(builder: ExitCacheBuilder, rows: Sequence[int], model: EarlyExitModel, group: Group,
                      to_main_only: bool) -> ExitCache | None:
    """Under several processes: the exit cache of the whole split from each rank's shard (``rows``:
    the split's rows this rank added, in order), in the split's order; on rank 0 only with
    ``to_main_only`` (None elsewhere), None when the split is empty."""
    if model.cost is None:
        raise PteenetError("the checkpoint has no cost table", "attach the branches with `pteenet attach`")
    arrays = distributed.gather_rows(rows, builder.arrays(), True, group, to_main_only)
    return None if arrays is None else _cache(arrays, model.cost.costs(), model.cost.costs_paper())
