"""``timm:NAME`` backbones: any model of timm (an optional dependency: ``pip install 'pteenet[timm]'``).

NAME is a timm architecture (``resnet50``) or architecture.tag (``resnet50.a1_in1k``: which
pretrained weights, and so which preprocessing). Weights: a local file (safetensors, or a torch file
read with ``weights_only=True``; loaded by ``backbones.load_backbone`` like any other), or
``pretrained`` to let timm fetch the tag's weights from the Hugging Face hub where the machine can
reach it, or none (random weights). Preprocessing comes from timm's data config for the tag
(``resolve_model_data_config``): input size, mean, std, and timm's eval framing (resize to
size / crop_pct with its interpolation, then the centre crop: ``backbones.Preprocess``). timm's
"border" crop mode (a handful of models: pad rather than crop) is not reproduced; such models get
the whole image resized to the input size.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import PteenetError, describe_error, unknown_name

CROP_MODES = ("center", "squash")  # timm's; its third, "border" (pad instead of crop), is not reproduced
PRETRAINED = ("pretrained", "DEFAULT")  # --weights values that ask timm for the tag's published weights
INSTALL_HINT = "pip install 'pteenet[timm]' (or pip install timm)"


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise PteenetError("timm:NAME backbones need timm, which is not installed", INSTALL_HINT) from None
    return timm


def timm_names() -> list[str]:
    """timm's architectures, or none where timm is not installed (for listing known specs)."""
    try:
        return list(_timm().list_models())
    except PteenetError:
        return []


def build_timm(name: str, weights: str | None, num_classes: int | None,
               input_size: tuple[int, int, int] | None) -> tuple[nn.Module, dict[str, Any]]:
    """The model (random or timm's pretrained weights) and its defaults for ``load_backbone``;
    ``named_weights`` tells it that ``weights`` was a name handled here, not a file to load."""
    timm = _timm()
    if not timm.is_model(name):
        raise unknown_name("timm model", name, timm.list_models())
    pretrained = weights in PRETRAINED
    kwargs: dict[str, Any] = {}
    if num_classes:
        kwargs["num_classes"] = num_classes
    cfg = timm.models.get_pretrained_cfg(name)  # the tag's, or the architecture's default tag's
    if input_size is not None and getattr(cfg, "fixed_input_size", False):
        kwargs["img_size"] = tuple(input_size[1:])  # ViTs, Swin: position tables are built for one size
    if input_size is not None and input_size[0] != 3:
        kwargs["in_chans"] = input_size[0]
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as e:
        if pretrained:
            raise PteenetError(f"cannot get timm's pretrained weights for {name}: {describe_error(e)}",
                               "offline? download the weights file (model.safetensors of the timm/NAME repository "
                               "on the Hugging Face hub) elsewhere and pass it with --weights PATH") from e
        raise PteenetError(f"timm cannot build {name} with these settings: {describe_error(e)}",
                           "check --num-classes and --input-size") from e
    data = timm.data.resolve_model_data_config(model)
    c, h, w = input_size or data["input_size"]
    defaults: dict[str, Any] = {
        "input_size": (c, h, w), "mean": tuple(data["mean"])[:c], "std": tuple(data["std"])[:c],
        "named_weights": pretrained,
    }
    if data.get("crop_mode", "center") in CROP_MODES:
        defaults.update(crop_pct=data["crop_pct"], crop_mode=data.get("crop_mode", "center"),
                        interpolation=data["interpolation"])
    return model, defaults
