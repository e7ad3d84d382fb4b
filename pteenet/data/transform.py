"""Images held as uint8 tensors, and the transform to what the backbone takes (framing, size,
normalisation, augmentation)."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..backbones.specs import Preprocess
from ..errors import PteenetError


class ImageTransform:
    """uint8 image tensor (c, h, w) -> normalised float tensor ``preprocess.input_size``.

    Working on tensors rather than PIL images keeps the in-memory datasets free of PIL round trips,
    except for the framing of ``preprocess.resize`` (resize, then centre crop): that goes through PIL
    with torchvision's functions, as timm's and torchvision's eval transforms do, because torch's
    tensor resize differs from PIL's (bicubic by up to 20 levels of 255). Augmentation (padded random
    crop, flip) applies after the framing, to training images only.
    """

    def __init__(self, pre: Preprocess, augment: bool = False, flip: bool = True, crop_padding: int | None = None) -> None:
        self.channels, self.height, self.width = pre.input_size
        self.mean = torch.tensor(pre.mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(pre.std, dtype=torch.float32).view(-1, 1, 1)
        self.augment, self.flip = augment, flip
        self.resize, self.crop_mode, self.interpolation = pre.resize, pre.crop_mode, pre.interpolation
        self.padding = crop_padding if crop_padding is not None else max(1, round(4 * self.height / 32))

    def frame(self, img: torch.Tensor) -> torch.Tensor:
        """uint8 (c, h, w) resized to ``resize`` and centre-cropped to the input size, as timm's
        ``transforms_imagenet_eval`` does (torchvision's weights: the square "center" case)."""
        import torchvision.transforms.functional as TF
        from PIL import Image
        from torchvision.transforms import InterpolationMode

        assert self.resize is not None
        mode = InterpolationMode(self.interpolation)
        arr = img.permute(1, 2, 0).numpy()
        im = Image.fromarray(arr[:, :, 0] if img.shape[0] == 1 else arr)
        rh, rw = self.resize
        if self.crop_mode == "squash":
            im = TF.resize(im, [rh, rw], mode)
        elif rh == rw:
            im = TF.resize(im, rh, mode)  # the shorter side
        else:  # timm's ResizeKeepRatio: scaled to cover (rh, rw), one side meeting it
            ratio = min(im.height / rh, im.width / rw)
            im = TF.resize(im, [round(im.height / ratio), round(im.width / ratio)], mode)
        return TF.pil_to_tensor(TF.center_crop(im, [self.height, self.width]))

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if self.resize is not None and img.shape[0] in (1, 3):
            img = self.frame(img)
        x = img.float().div_(255)
        if x.shape[0] != self.channels:
            if x.shape[0] == 1 and self.channels == 3:
                x = x.expand(3, -1, -1)
            elif x.shape[0] == 3 and self.channels == 1:
                # ITU-R 601 luma, the weights PIL uses for convert("L").
                x = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)
            else:
                raise PteenetError(f"cannot turn {x.shape[0]}-channel images into {self.channels} channels",
                                   "use --input-size with 1 or 3 channels")
        if tuple(x.shape[1:]) != (self.height, self.width):
            x = F.interpolate(x[None], size=(self.height, self.width), mode="bilinear", antialias=True,
                              align_corners=False)[0].clamp_(0, 1)
        if self.augment:
            p = self.padding
            top, left = torch.randint(0, 2 * p + 1, (2,)).tolist()
            x = F.pad(x, (p, p, p, p))[:, top:top + self.height, left:left + self.width]
            if self.flip and torch.rand(()) < 0.5:
                x = x.flip(-1)
        return (x - self.mean) / self.std


class TensorImages(Dataset):
    """Images held in memory as one uint8 tensor (N, c, h, w), transformed per item."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), int(self.labels[i])
