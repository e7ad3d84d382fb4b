"""Turning a backbone spec string into a frozen ``nn.Module`` plus how to preprocess its inputs.

Specs: ``torchvision:NAME``, ``timm:NAME`` (``timm_models.py``), ``cifar-resnet20|32|44|56|110``,
``path/to/file.py:factory`` or ``package.module:factory``. Weights: a local file, or for torchvision
``DEFAULT``/an enum name, for timm ``pretrained``.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import PteenetError, describe_error, unknown_name
from .cifar_resnet import DEPTHS, cifar_resnet
from .timm_models import CROP_MODES, build_timm, timm_names
from .weights import file_sha256, load_into, read_state_dict

# The auxiliary classifiers of torchvision's GoogLeNet and Inception v3: used only in training mode.
AUX_HEADS = ("aux1", "aux2", "AuxLogits")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Preprocess:
    """How inputs must look: ``input_size`` is (C, H, W); pixels in [0, 1], then (x - mean) / std.

    ``resize`` (H', W'), where the weights come with an eval transform (timm's data config with its
    crop_pct, torchvision's resize 256 / crop 224): an image is resized to it with ``interpolation``
    and centre-cropped to ``input_size``, as that transform does. ``crop_mode`` "center" keeps the
    aspect ratio (the shorter side becomes H' when H' == W'); "squash" resizes to exactly H' x W'.
    None: the whole image is resized to ``input_size`` (bilinear), as in checkpoints written before.
    """

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: tuple[int, int] | None = None
    crop_mode: str = "center"
    interpolation: str = "bilinear"

    def to_dict(self) -> dict[str, Any]:
        return {"input_size": list(self.input_size), "mean": list(self.mean), "std": list(self.std),
                "resize": None if self.resize is None else list(self.resize), "crop_mode": self.crop_mode,
                "interpolation": self.interpolation}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocess":
        resize, mode = d.get("resize"), d.get("crop_mode", "center")
        if mode not in CROP_MODES:
            raise PteenetError(f"unknown crop mode {mode!r} in the preprocessing record", "upgrade pteenet")
        return cls(tuple(d["input_size"]), tuple(d["mean"]), tuple(d["std"]),  # type: ignore[arg-type]
                   None if resize is None else (int(resize[0]), int(resize[1])),
                   mode, d.get("interpolation", "bilinear"))


def eval_resize(input_size: tuple[int, ...], crop_pct: float | None) -> tuple[int, int] | None:
    """What an image is resized to before its centre ``input_size`` crop: timm's ``floor(size / crop_pct)``
    (torchvision's weights give the same: crop_pct = crop / resize, e.g. 224 / 256)."""
    if not crop_pct:
        return None
    return math.floor(input_size[1] / crop_pct), math.floor(input_size[2] / crop_pct)


@dataclass
class BackboneInfo:
    """Everything the checkpoint records about the backbone (the module itself travels separately)."""

    spec: str
    num_classes: int
    preprocess: Preprocess
    weights: str | None = None
    weights_sha256: str | None = None
    class_names: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["preprocess"] = self.preprocess.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BackboneInfo":
        d = dict(d)
        d.pop("extra", None)  # schema 1 and 2 files carry an always-empty "extra"
        d["preprocess"] = Preprocess.from_dict(d["preprocess"])
        return cls(**d)


def torchvision_names() -> list[str]:
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def known_specs() -> list[str]:
    return list(DEPTHS) + [f"torchvision:{n}" for n in torchvision_names()] + [f"timm:{n}" for n in timm_names()]


def _load_factory(spec: str) -> Any:
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise PteenetError(f"model file not found: {path}", "use path/to/file.py:factory")
        mod_name = f"pteenet_user_{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        assert loader_spec and loader_spec.loader
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[mod_name] = module
        loader_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise PteenetError(f"cannot import '{target}': {e}", "is the package installed, or use path/to/file.py:factory") from e
    if not hasattr(module, attr):
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise unknown_name(f"factory in {target}", attr, names)
    return getattr(module, attr)


def _torchvision(name: str, weights: str | None, num_classes: int | None) -> tuple[nn.Module, dict[str, Any]]:
    import torchvision.models as tvm

    names = torchvision_names()
    if name not in names:
        raise unknown_name("torchvision model", name, names)
    info: dict[str, Any] = {}
    enum_weights = None
    if weights is not None and not Path(weights).exists() and not any(weights.endswith(s) for s in (".safetensors", ".pt", ".pth", ".th")):
        enum_cls = tvm.get_model_weights(name)
        members = [m.name for m in enum_cls]
        if weights == "DEFAULT":
            enum_weights = enum_cls.DEFAULT
        elif weights in members:
            enum_weights = enum_cls[weights]
        else:
            raise unknown_name(f"weights of {name}", weights, ["DEFAULT", *members])
    if enum_weights is not None:
        info["named_weights"] = True  # loaded here, not a file for load_backbone to read
        info.update(weights_preprocess(enum_weights))
        info["class_names"] = list(enum_weights.meta.get("categories") or []) or None
        if num_classes not in (None, len(enum_weights.meta.get("categories", []))):
            raise PteenetError("--num-classes does not match the pretrained weights", "drop --num-classes")
        try:
            model = tvm.get_model(name, weights=enum_weights)
        except Exception as e:
            raise PteenetError(
                f"cannot download the {weights} weights of {name}: {type(e).__name__}",
                "offline? download the file elsewhere and pass it with --weights PATH",
            ) from e
        return model, info
    kwargs = {"num_classes": num_classes} if num_classes else {}
    # Inception v3 and GoogLeNet build auxiliary heads here; drop_absent_aux_heads removes them for
    # a file without them.
    return tvm.get_model(name, weights=None, **kwargs), info


def weights_preprocess(enum_weights: Any) -> dict[str, Any]:
    """The eval transform of torchvision weights (``ImageClassification``: resize, centre crop, normalise)
    as ``load_backbone`` defaults."""
    tf = enum_weights.transforms()
    crop, resize = getattr(tf, "crop_size", [224])[0], getattr(tf, "resize_size", [None])[0]
    interpolation = getattr(tf, "interpolation", None)
    return {"input_size": (3, crop, crop), "mean": tuple(tf.mean), "std": tuple(tf.std),
            "crop_pct": crop / resize if resize else None, "crop_mode": "center",
            "interpolation": interpolation.value if interpolation is not None else "bilinear"}


def drop_absent_aux_heads(model: nn.Module, keys: Iterable[str]) -> None:
    """Remove auxiliary heads that the state dict about to be loaded lacks.

    Built without weights, GoogLeNet and Inception v3 have auxiliary heads; a state dict saved from a
    pretrained one has none (torchvision drops them), and eval mode never runs them. Removing them the
    way torchvision does lets such a file load strictly, with nothing unused left in the checkpoint.
    """
    names = {k.split(".", 1)[0] for k in keys}
    absent = [a for a in AUX_HEADS if isinstance(getattr(model, a, None), nn.Module) and a not in names]
    if absent and getattr(model, "aux_logits", False):
        for a in absent:
            setattr(model, a, None)
        model.aux_logits = False


def _build(spec: str, num_classes: int | None, input_size: tuple[int, int, int] | None,
           weights: str | None) -> tuple[nn.Module, dict[str, Any]]:
    in_channels = input_size[0] if input_size else 3
    if spec in DEPTHS:
        return cifar_resnet(spec, num_classes=num_classes or 10, in_channels=in_channels), {
            "input_size": (in_channels, 32, 32),
            "mean": IMAGENET_MEAN[:in_channels] if in_channels == 3 else (0.5,) * in_channels,
            "std": IMAGENET_STD[:in_channels] if in_channels == 3 else (0.5,) * in_channels,
        }
    if spec.startswith("torchvision:"):
        return _torchvision(spec.split(":", 1)[1], weights, num_classes)
    if spec.startswith("timm:"):
        return build_timm(spec.split(":", 1)[1], weights, num_classes, input_size)
    if ":" in spec:
        factory = _load_factory(spec)
        try:
            model = factory(num_classes=num_classes) if num_classes else factory()
        except TypeError:
            model = factory()
        if not isinstance(model, nn.Module):
            raise PteenetError(f"{spec} returned {type(model).__name__}, not an nn.Module", "the factory must return the model")
        return model, {}
    raise unknown_name("backbone", spec, known_specs())


def preprocess_of(defaults: dict[str, Any], input_size: tuple[int, int, int] | None = None,
                  mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None) -> Preprocess:
    """The backbone's preprocessing: options given explicitly, else the defaults of its weights or
    model (``_build``), else ImageNet's; the eval framing (``crop_pct``) scales with the input size."""
    size = input_size or defaults.get("input_size") or (3, 224, 224)
    pre = Preprocess(
        input_size=tuple(int(v) for v in size),  # type: ignore[arg-type]
        mean=tuple(mean or defaults.get("mean") or IMAGENET_MEAN),
        std=tuple(std or defaults.get("std") or IMAGENET_STD),
        resize=eval_resize(size, defaults.get("crop_pct")),
        crop_mode=defaults.get("crop_mode", "center"),
        interpolation=defaults.get("interpolation", "bilinear"),
    )
    if len(pre.mean) != pre.input_size[0] or len(pre.std) != pre.input_size[0]:
        raise PteenetError(
            f"--mean/--std have {len(pre.mean)}/{len(pre.std)} values for {pre.input_size[0]} input channels",
            "give one value per channel",
        )
    return pre


def load_backbone(
    spec: str,
    weights: str | None = None,
    num_classes: int | None = None,
    input_size: tuple[int, int, int] | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> tuple[nn.Module, BackboneInfo]:
    """Build the backbone, load its weights, freeze it (eval mode, no grad) and describe it.

    Options given explicitly win over the defaults of the weights or the built-in model.
    """
    model, defaults = _build(spec, num_classes, input_size, weights)
    sha = None
    if weights is not None and not defaults.get("named_weights"):
        sd = read_state_dict(weights)
        drop_absent_aux_heads(model, sd)
        load_into(model, sd, weights)
        sha = file_sha256(weights)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    pre = preprocess_of(defaults, input_size, mean, std)
    n_out = _num_outputs(model, pre)
    info = BackboneInfo(spec=spec, num_classes=n_out, preprocess=pre, weights=weights, weights_sha256=sha,
                        class_names=defaults.get("class_names"))
    return model, info


def _num_outputs(model: nn.Module, pre: Preprocess) -> int:
    """A dry run at batch 2 tells the number of classes and catches input sizes the model cannot take."""
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *pre.input_size))
    except Exception as e:
        raise PteenetError(
            f"the backbone cannot take inputs of size {','.join(map(str, pre.input_size))}: {describe_error(e)}",
            "pass --input-size C,H,W that the model accepts",
        ) from e
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise PteenetError("the backbone must return a (batch, classes) tensor of logits", "wrap the model so that it does")
    return int(out.shape[1])
