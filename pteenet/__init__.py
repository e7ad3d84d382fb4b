"""pteenet: early exits for a frozen pretrained CNN (PTEENet).

The whole pipeline on a model in memory::

    model = pteenet.attach(pteenet.AttachConfig(backbone="cifar-resnet20", weights="w.th"))
    data = pteenet.DataConfig(spec="cifar10")
    pteenet.train_exits(model, data, pteenet.TrainConfig(epochs=10))    # trains the branches in place
    pteenet.sweep_model(model, None, pteenet.SweepConfig(max_drop=1.0))  # sets the chosen thresholds
    pteenet.export_model(model, pteenet.ExportConfig(output="export/"))  # writes the deployable folder

``pteenet.load(path)`` reads a checkpoint back as an ``nn.Module`` whose ``model(x)`` really stops
computing for samples that leave. The commands work on files (``train_branches``,
``sweep_threshold``, ``export`` in their modules): each loads, calls the function above, and writes.
"""
from __future__ import annotations

from .data import DataConfig, DataRequest
from .errors import PteenetError
from .export.run import ExportConfig, export_model

# ``pteenet.training.run``, ``pteenet.sweep`` and ``pteenet.export.run`` are a module, a package and a module: a
# function of the same name here would shadow them as attributes of the package (then
# ``import pteenet.training.run as m`` and ``mock.patch("pteenet.training.run.x")`` would find the function), so
# the functions say what they act on instead: train_exits, sweep_model, export_model.
from .runtime.attach import AttachConfig, attach, list_candidates
from .runtime.checkpoint import load_checkpoint, save_checkpoint
from .runtime.model import EarlyExitModel
from .sweep import SweepConfig, sweep_model
from .training.loss import LossConfig
from .training.run import TrainConfig, train_exits
from .version import __version__


def load(path: str, device: str = "cpu") -> EarlyExitModel:
    """Load a pteenet checkpoint as an ``nn.Module`` in eval mode; ``model(x)`` exits early."""
    return load_checkpoint(path, device).model.eval()


__all__ = ["AttachConfig", "DataConfig", "DataRequest", "EarlyExitModel", "ExportConfig", "LossConfig", "PteenetError",
           "SweepConfig", "TrainConfig", "__version__", "attach", "export_model", "list_candidates", "load",
           "load_checkpoint", "save_checkpoint", "sweep_model", "train_exits"]
