"""The one-file checkpoint: backbone and branch tensors plus a JSON metadata string, in safetensors.

Tensors: ``backbone.*``, ``branches.*``, optional ``ensemble.*`` (the fitted exit ensemble) and
optional ``state.*`` (training state for --resume). Metadata: one JSON document under the header key
``pteenet`` (safetensors refuses non-string values). Loading rebuilds only known structures (a
backbone spec, the branch types of ``branches.py``): no pickle anywhere.

Schema 2 added the branch kinds (pool, pool-mlp, conv-lite, cascade), the ensemble and the active
exits. Schema 3 records the training run's configs whole (``training.config``, ``training.data``, from
``pteenet.configs``; a resume compares them field by field) and drops the always-empty
``backbone.extra``. Schema 1 and 2 files load unchanged, and their unfinished runs still resume.
A fitted EENet scheduler adds ``scheduler.*`` tensors and a ``scheduler`` entry (None without
one); loaders that do not know them skip both, and files without them load as before.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write
from ..backbones.specs import BackboneInfo, drop_absent_aux_heads, load_backbone
from ..backbones.weights import load_state, module_sha256, tensors_sha256
from ..errors import PteenetError, describe_error
from ..exits.branches import BranchConfig
from ..exits.chain import Ensemble
from ..exits.eenet import Scheduler
from ..tracing.cost import CostTable
from ..version import __version__
from .model import EarlyExitModel

SCHEMA_VERSION = 3
META_KEY = "pteenet"


@dataclass
class Checkpoint:
    model: EarlyExitModel
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # training state, without the prefix


def describe(model: EarlyExitModel) -> dict[str, Any]:
    """The checkpoint's metadata document for a model."""
    return {
        "schema_version": SCHEMA_VERSION,
        "pteenet_version": __version__,
        "backbone": model.info.to_dict(),
        "backbone_sha256": model.backbone_sha256,
        "exits": [{"name": p.name, "node": p.node, "layout": p.layout} for p in model.exit_points],
        # "hooks": no stages, every exit computed on a whole backbone pass (hooks.py); no real early exit
        "runtime": model.runtime,
        "branch": model.branch_config.to_dict(),
        "ensemble": model.ensemble is not None,
        "scheduler": None if model.scheduler is None else model.scheduler.to_meta(),
        "active_exits": model.active,
        "cost": model.cost.to_dict() if model.cost else None,
        "policy": model.policy,
        "thresholds": model.thresholds,
        "class_thresholds": model.class_thresholds,
        **model.meta,
    }


def save_checkpoint(path: str | Path, model: EarlyExitModel, state: dict[str, torch.Tensor] | None = None) -> None:
    from safetensors.torch import save_file

    if module_sha256(model.backbone) != model.backbone_sha256:
        raise PteenetError("the backbone's weights or buffers changed since they were attached; refusing to save",
                           "this is a bug in pteenet: please report it")
    tensors: dict[str, torch.Tensor] = {}
    ens = model.ensemble.state_dict() if model.ensemble is not None else {}
    sched = model.scheduler.state_dict() if model.scheduler is not None else {}
    for prefix, sd in (("backbone.", model.backbone.state_dict()), ("branches.", model.branches.state_dict()),
                       ("ensemble.", ens), ("scheduler.", sched), ("state.", state or {})):
        for k, v in sd.items():
            # clone(): safetensors refuses tensors that share storage (tied weights, views).
            tensors[prefix + k] = v.detach().to("cpu").contiguous().clone()
    meta = {META_KEY: json.dumps(describe(model))}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_metadata(path: str | Path) -> dict[str, Any]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise PteenetError(f"checkpoint not found: {path}", "pass a file written by `pteenet attach`")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except Exception as e:
        raise PteenetError(f"cannot read checkpoint {path}: {describe_error(e)}",
                           "the file is corrupt or truncated; write it again") from e
    if raw is None:
        raise PteenetError(f"{path} is a safetensors file but not a pteenet checkpoint", "create one with `pteenet attach`")
    meta = json.loads(raw)
    if int(meta.get("schema_version", 0)) > SCHEMA_VERSION:
        raise PteenetError(
            f"{path} was written by a newer pteenet (schema {meta['schema_version']} > {SCHEMA_VERSION})",
            "upgrade pteenet",
        )
    return meta


def backbone_hash(path: str | Path) -> str:
    """The hash of the backbone tensors stored in ``path`` (``describe``'s ``backbone_sha256`` when intact)."""
    from safetensors import safe_open

    read_metadata(path)  # the clean errors for a missing, foreign or newer file
    try:
        with safe_open(str(path), framework="pt") as f:
            bb = {k[len("backbone."):]: f.get_tensor(k) for k in f.keys() if k.startswith("backbone.")}
    except Exception as e:
        raise PteenetError(f"cannot read the tensors of {path}: {type(e).__name__}", "the file is corrupt or truncated") from e
    return tensors_sha256(bb)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    from safetensors.torch import load_file

    meta = read_metadata(path)
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise PteenetError(f"cannot read the tensors of {path}: {type(e).__name__}", "the file is corrupt or truncated") from e
    info = BackboneInfo.from_dict(meta["backbone"])
    pre = info.preprocess
    backbone, _ = load_backbone(info.spec, None, info.num_classes, pre.input_size, pre.mean, pre.std)
    bb_sd = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
    if tensors_sha256(bb_sd) != meta["backbone_sha256"]:
        raise PteenetError(f"the backbone tensors in {path} do not match their recorded hash", "the file is corrupt")
    drop_absent_aux_heads(backbone, bb_sd)
    load_state(backbone, bb_sd)
    try:
        branch = BranchConfig.from_dict(meta["branch"])
    except PteenetError as e:
        raise PteenetError(f"unknown branch type {meta['branch'].get('type')!r} in {path}", "upgrade pteenet") from e
    cost = CostTable.from_dict(meta["cost"]) if meta.get("cost") else None
    model = EarlyExitModel(backbone, info, [e["name"] for e in meta["exits"]], branch, cost,
                           runtime=meta.get("runtime") or "staged")
    model.branches.load_state_dict({k[len("branches."):]: v for k, v in tensors.items() if k.startswith("branches.")})
    if meta.get("ensemble"):
        ens = Ensemble(model.num_exits, info.num_classes)
        ens.load_state_dict({k[len("ensemble."):]: v for k, v in tensors.items() if k.startswith("ensemble.")})
        model.set_ensemble(ens)
    if meta.get("scheduler"):
        model.set_scheduler(Scheduler.from_meta(meta["scheduler"], {k[len("scheduler."):]: v for k, v in tensors.items()
                                                                     if k.startswith("scheduler.")}))
    model.set_active(meta.get("active_exits"))
    model.set_thresholds(meta["thresholds"], meta["policy"], meta.get("class_thresholds"))  # older files: none
    known = set(describe(model))
    model.meta = {k: v for k, v in meta.items() if k not in known}
    state = {k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}
    # Tensors load on the CPU; moving re-traces the stages, so skip the no-op move.
    return Checkpoint(model if torch.device(device).type == "cpu" else model.to(device), state)
