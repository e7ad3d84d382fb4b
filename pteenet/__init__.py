"""pteenet: early exits for a frozen pretrained CNN (PTEENet).

``pteenet.attach(AttachConfig(...))`` builds an early-exit model; ``pteenet.load(path)`` reads a
checkpoint back as an ``nn.Module`` whose ``model(x)`` really stops computing for samples that leave.
"""
from __future__ import annotations

from .version import __version__
from .attach import AttachConfig, attach, list_candidates  # noqa: E402
from .checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from .errors import PteenetError  # noqa: E402
from .model import EarlyExitModel  # noqa: E402


def load(path: str, device: str = "cpu") -> EarlyExitModel:
    """Load a pteenet checkpoint as an ``nn.Module`` in eval mode; ``model(x)`` exits early."""
    return load_checkpoint(path, device).model.eval()


__all__ = ["AttachConfig", "EarlyExitModel", "PteenetError", "attach", "list_candidates", "load", "load_checkpoint",
           "save_checkpoint"]
