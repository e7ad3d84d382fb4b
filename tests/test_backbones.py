"""Backbone weight files that torch's own loader accepts but a plain state dict loses or lacks:
mnasnet's format version, GoogLeNet and Inception v3 without their auxiliary heads."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm
from safetensors.torch import save_file

from pteenet import AttachConfig, attach
from pteenet.backbones.specs import load_backbone
from pteenet.errors import PteenetError
from pteenet.runtime.checkpoint import load_checkpoint, save_checkpoint


def _logits(model: torch.nn.Module, size: int) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_mnasnet_weights_without_format_version_load(tmp_path: Path, suffix: str) -> None:
    src = tvm.mnasnet0_5(weights=None, num_classes=10).eval()
    path = tmp_path / f"mnasnet{suffix}"
    save_file(src.state_dict(), str(path)) if suffix == ".safetensors" else torch.save(dict(src.state_dict()), path)
    model, _ = load_backbone("torchvision:mnasnet0_5", str(path), 10, input_size=(3, 32, 32))
    assert torch.equal(_logits(model, 32), _logits(src, 32))


def test_mnasnet_checkpoint_round_trip(tmp_path: Path) -> None:
    model = attach(AttachConfig(backbone="torchvision:mnasnet0_5", num_classes=10, input_size=(3, 32, 32), exits=2))
    save_checkpoint(tmp_path / "m.safetensors", model)
    back = load_checkpoint(tmp_path / "m.safetensors").model
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back.backbone(x), model.backbone(x))


@pytest.mark.parametrize("name,aux", [("googlenet", ("aux1", "aux2")), ("inception_v3", ("AuxLogits",))])
def test_weights_without_auxiliary_heads_load(tmp_path: Path, name: str, aux: tuple[str, ...]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # GoogLeNet's note on its init
        src = tvm.get_model(name, weights=None, num_classes=10, aux_logits=False, init_weights=True).eval()
    path = tmp_path / f"{name}.safetensors"
    save_file(src.state_dict(), str(path))
    size = 80 if name == "inception_v3" else 32
    model, _ = load_backbone(f"torchvision:{name}", str(path), 10, input_size=(3, size, size))
    assert all(getattr(model, a) is None for a in aux) and not model.aux_logits
    assert torch.equal(_logits(model, size), _logits(src, size))
    if name == "googlenet":  # and the checkpoint, which then holds no auxiliary heads, loads back
        ee = attach(AttachConfig(backbone=f"torchvision:{name}", weights=str(path), num_classes=10, input_size=(3, size, size), exits=1))
        save_checkpoint(tmp_path / "ee.safetensors", ee)
        back = load_checkpoint(tmp_path / "ee.safetensors").model
        assert back.backbone.aux1 is None and torch.equal(_logits(back.backbone, size), _logits(src, size))


def test_weights_with_auxiliary_heads_still_load(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        src = tvm.googlenet(weights=None, num_classes=10, aux_logits=True, init_weights=True)
    path = tmp_path / "g.safetensors"
    save_file(src.state_dict(), str(path))
    model, _ = load_backbone("torchvision:googlenet", str(path), 10, input_size=(3, 32, 32))
    assert model.aux1 is not None and torch.equal(_logits(model, 32), _logits(src, 32))


def test_without_timm_the_error_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(PteenetError, match=r"need timm.*pip install 'pteenet\[timm\]'"):
        load_backbone("timm:resnet18")


@pytest.mark.parametrize("weights", [tvm.ResNet50_Weights.IMAGENET1K_V2, tvm.EfficientNet_B1_Weights.IMAGENET1K_V1])
def test_named_torchvision_weights_frame_images_as_their_transforms(weights: tvm.WeightsEnum) -> None:
    """Resize (232 bilinear, 255 bicubic) then centre crop (224, 240), as ``weights.transforms()``
    does; nothing is downloaded: only the preprocessing of the weights is read."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    from pteenet.backbones.specs import preprocess_of, weights_preprocess
    from pteenet.data import ImageTransform

    pre = preprocess_of(weights_preprocess(weights))
    assert pre.resize == (weights.transforms().resize_size[0],) * 2
    gen = torch.Generator().manual_seed(0)
    for h, w in [(300, 400), (251, 180)]:
        im = Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy())
        assert torch.allclose(ImageTransform(pre)(pil_to_tensor(im)), weights.transforms()(im), atol=1e-6)
