"""Choosing the device every command that runs the model takes (``--device auto|cpu|cuda|mps``)."""
from __future__ import annotations

import torch

from .errors import PteenetError

DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU; asking for a missing device is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PteenetError("--device cuda but no CUDA device is available", "use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise PteenetError("--device mps but MPS is not available", "use --device cpu or auto")
    if name not in DEVICES:
        raise PteenetError(f"unknown device '{name}'", "valid devices: " + ", ".join(DEVICES))
    return torch.device(name)
