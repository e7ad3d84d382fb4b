"""Reading weight files without unpickling anything untrusted, and hashing tensors."""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import PteenetError, describe_error

TORCH_SUFFIXES = (".pt", ".pth", ".th", ".bin", ".ckpt")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """A hash of names, dtypes, shapes and bytes: equal iff the tensors are bit-identical."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def module_sha256(module: nn.Module) -> str:
    """Hash of a module's weights and buffers (BatchNorm running statistics included)."""
    return tensors_sha256(module.state_dict())


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from ``.safetensors`` or, for torch files, ``torch.load(weights_only=True)``.

    Accepts the common wrappers ``{'state_dict': ...}`` / ``{'model': ...}`` and strips a DataParallel
    ``module.`` prefix.
    """
    path = Path(path)
    if not path.is_file():
        raise PteenetError(f"weights file not found: {path}", "pass an existing .safetensors/.pt/.pth/.th file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(path))
        elif path.suffix in TORCH_SUFFIXES:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            raise PteenetError(
                f"unsupported weights file type '{path.suffix}': {path}",
                "use .safetensors, or .pt/.pth/.th (loaded with weights_only=True)",
            )
    except PteenetError:
        raise
    except Exception as e:  # corrupt, truncated or pickled-with-code files all land here
        raise PteenetError(
            f"cannot read weights file {path}: {describe_error(e)}",
            "is the file complete, and a plain state dict (no pickled code)?",
        ) from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PteenetError(f"{path} does not hold a state dict of tensors", "save model.state_dict() to the file")
    sd: dict[str, torch.Tensor] = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return with_metadata(sd, getattr(obj, "_metadata", None))


def with_metadata(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, dict] | None) -> dict[str, torch.Tensor]:
    """``sd`` carrying torch's per-module ``_metadata`` (state-dict format versions), which
    ``dict(...)`` and safetensors files lose. Some modules refuse a state dict without it: torchvision's
    MNASNet raises "version should be set to 1 or 2"."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict(sd)
    if metadata is not None:
        out._metadata = OrderedDict(metadata)  # type: ignore[attr-defined]
    return out


def load_state(module: nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    """``module.load_state_dict(sd, strict=True)``; a state dict without format versions (a safetensors
    file, our checkpoints) is read as written by this very code, whose versions ``module`` states."""
    metadata = getattr(sd, "_metadata", None)
    if metadata is None:
        metadata = getattr(module.state_dict(), "_metadata", None)
    module.load_state_dict(with_metadata(sd, metadata), strict=True)


def load_into(module: nn.Module, sd: Mapping[str, torch.Tensor], source: str) -> None:
    """Strict load with a one-line error that names the first few offending keys."""
    own = module.state_dict()
    metadata = getattr(sd, "_metadata", None)
    sd = dict(sd)
    for k in own:
        # Files saved by old torch lack BatchNorm's step counter, which eval mode never reads.
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = own[k]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches (e.g. {'; '.join(mismatched[:3])})")
    if problems:
        raise PteenetError(
            f"weights in {source} do not fit this architecture: " + "; ".join(problems),
            "check the backbone name, --num-classes, and that the file belongs to this model",
        )
    load_state(module, with_metadata(sd, metadata))
