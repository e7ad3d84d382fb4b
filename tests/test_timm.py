"""``timm:NAME`` backbones on timm's tiny test models (random weights, 32x32): offline and fast.
timm is in the dev extra, so CI runs these; without timm they are skipped (test_backbones.py checks
the error a user without timm gets)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pteenet import AttachConfig, attach
from pteenet.backbones.specs import load_backbone
from pteenet.errors import PteenetError
from pteenet.exits.policies import never_exit_threshold
from pteenet.runtime.checkpoint import load_checkpoint, save_checkpoint

timm = pytest.importorskip("timm")
SIZE = (3, 32, 32)


def test_preprocessing_comes_from_timm_data_config() -> None:
    _, info = load_backbone("timm:test_resnet", num_classes=10, input_size=SIZE)
    assert info.preprocess.mean == (0.5, 0.5, 0.5) and info.preprocess.std == (0.5, 0.5, 0.5)  # test_resnet's tag
    _, default = load_backbone("timm:test_resnet", num_classes=10)
    assert default.preprocess.input_size == (3, 160, 160)  # the tag's input size when none is given


def test_attach_reproduces_logits_and_round_trips(tmp_path: Path) -> None:
    model = attach(AttachConfig(backbone="timm:test_resnet", num_classes=10, input_size=SIZE, exits=2))
    x = torch.randn(3, *SIZE)
    with torch.no_grad():
        ref = model.backbone(x)
        model.set_thresholds(never_exit_threshold("confidence"), "confidence")
        assert torch.equal(model.predict(x).logits, ref)
    save_checkpoint(tmp_path / "m.safetensors", model)
    back = load_checkpoint(tmp_path / "m.safetensors").model
    with torch.no_grad():
        assert torch.equal(back.backbone(x), ref)


def test_weights_from_a_local_file(tmp_path: Path) -> None:
    src = timm.create_model("test_efficientnet", pretrained=False, num_classes=10).eval()
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    model, info = load_backbone("timm:test_efficientnet", str(tmp_path / "w.safetensors"), 10, SIZE)
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))
    assert info.weights_sha256 is not None
    other = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    save_file(other.state_dict(), str(tmp_path / "other.safetensors"))
    with pytest.raises(PteenetError, match="do not fit this architecture"):
        load_backbone("timm:test_efficientnet", str(tmp_path / "other.safetensors"), 10, SIZE)


def test_pretrained_weights_out_of_reach_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = timm.create_model

    def offline(name: str, pretrained: bool = False, **kwargs: object) -> torch.nn.Module:
        if pretrained:  # what timm raises when the hub cannot be reached (without waiting for its retries)
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(PteenetError, match="cannot get timm's pretrained weights.*--weights PATH"):
        load_backbone("timm:test_resnet", "pretrained", input_size=SIZE)


def test_unknown_timm_model_suggests_names() -> None:
    with pytest.raises(PteenetError, match="unknown timm model 'test_resnett'.*did you mean.*test_resnet"):
        load_backbone("timm:test_resnett")


def _random_images(n: int = 4) -> list:
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    sizes = [(300, 400), (97, 151), (500, 333), (64, 64)][:n]  # landscape, odd, portrait, smaller than the crop
    return [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy()) for h, w in sizes]


@pytest.mark.parametrize("name,size", [("test_vit", None), ("test_resnet", None), ("test_efficientnet", (3, 48, 64))])
def test_eval_transform_is_timms(name: str, size: tuple[int, int, int] | None) -> None:
    from timm.data import create_transform, resolve_data_config
    from torchvision.transforms.functional import pil_to_tensor

    from pteenet.data import ImageTransform

    model, info = load_backbone(f"timm:{name}", input_size=size)
    assert info.preprocess.resize is not None  # crop_pct < 1: a centre crop, not the whole image
    ref = create_transform(**resolve_data_config({} if size is None else {"input_size": size}, model=model))
    ours = ImageTransform(info.preprocess)
    for im in _random_images():
        assert torch.allclose(ours(pil_to_tensor(im)), ref(im), atol=1e-6)


def test_squash_crop_mode_is_timms() -> None:
    from timm.data.transforms_factory import transforms_imagenet_eval
    from torchvision.transforms.functional import pil_to_tensor

    from pteenet.backbones.specs import Preprocess, eval_resize
    from pteenet.data import ImageTransform

    mean, std = (0.5, 0.4, 0.3), (0.2, 0.3, 0.4)
    pre = Preprocess((3, 40, 56), mean, std, eval_resize((3, 40, 56), 0.9), "squash", "bicubic")
    ref = transforms_imagenet_eval((40, 56), crop_pct=0.9, crop_mode="squash", interpolation="bicubic", mean=mean, std=std)
    for im in _random_images():
        assert torch.allclose(ImageTransform(pre)(pil_to_tensor(im)), ref(im), atol=1e-6)


def test_checkpoint_keeps_timms_framing(tmp_path: Path) -> None:
    model = attach(AttachConfig(backbone="timm:test_resnet", exits=1))
    save_checkpoint(tmp_path / "m.safetensors", model)
    assert load_checkpoint(tmp_path / "m.safetensors").model.info.preprocess == model.info.preprocess
    from pteenet.export.report import build_report, markdown

    point = {"policy": "confidence", "thresholds": [2.0], "how": "given"}
    text = " ".join(markdown(build_report(model, point, {}, None)).split())
    assert "160x160 (an image has its shorter side resized to 168 (bilinear), then its centre cropped)" in text
