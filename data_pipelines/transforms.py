"""Image transforms: open_clip's train/eval preprocessing and the SimCLR / MoCo view augmentations.

Published defaults (SimCLR, Chen et al. 2020, appendix A; MoCo v2, Chen et al. 2020):
random resized crop scale (0.08, 1.0), horizontal flip p=0.5, colour jitter (0.4, 0.4, 0.4, 0.1) applied
with p=0.8, grayscale p=0.2, Gaussian blur with p=0.5 and kernel ~10% of the image side, sigma (0.1, 2.0).
At 32-64 px SimCLR drops the blur and keeps crop scale (0.08, 1); `small=True` does that (its CIFAR recipe).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import open_clip
import torch
from PIL import Image
from torchvision.transforms import v2

OPENAI_MEAN = open_clip.OPENAI_DATASET_MEAN
OPENAI_STD = open_clip.OPENAI_DATASET_STD


def clip_transform(image_size: int, train: bool, mean: Sequence[float] = OPENAI_MEAN,
                   std: Sequence[float] = OPENAI_STD, crop_scale: Tuple[float, float] = (0.9, 1.0)) -> Callable:
    """open_clip's preprocessing: eval resizes and centre-crops; train adds a random resized crop
    (`ClipTrainTransform`: the same pixels as open_clip's train transform, for less CPU)."""
    if train:
        return ClipTrainTransform(image_size, crop_scale, mean, std)
    return open_clip.image_transform(image_size, is_train=False, mean=tuple(mean), std=tuple(std))


def pixels_to_input(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [B, H, W, 3] -> the float [B, 3, H, W] model input, exactly as ToTensor (x / 255) then
    Normalize ((x - mean) / std) compute it; `mean` and `std` are shaped [1, 3, 1, 1]."""
    # the layout change on the uint8 bytes first, then contiguous in-place float ops: the same values as
    # converting the permuted (strided) view, 12x less time per 64 px batch on one loader thread
    x = pixels.permute(0, 3, 1, 2).contiguous().to(mean.dtype)
    return x.div_(255).sub_(mean).div_(std)


class ClipTrainTransform:
    """open_clip's train transform, RandomResizedCrop(bicubic) -> RGB -> ToTensor -> Normalize, in two halves.

    Per sample (`__call__`): the crop box, drawn by torchvision's rule (10 tries, then a centre crop), and the
    PIL crop + bicubic resize, kept as uint8 H x W x 3 pixels (a quarter of the bytes to pass between
    processes). Per batch (`finish`): `pixels_to_input`, ToTensor + Normalize in one vectorised op.
    For a given box the pixels equal open_clip's bit for bit; the box costs one `torch.rand` per try where
    torchvision's get_params makes six small tensor calls (a third of the whole transform's time).
    """

    def __init__(self, size: int, scale: Tuple[float, float] = (0.9, 1.0), mean: Sequence[float] = OPENAI_MEAN,
                 std: Sequence[float] = OPENAI_STD, ratio: Tuple[float, float] = (3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)

    def box(self, width: int, height: int) -> Tuple[int, int, int, int]:
        """(left, top, width, height) of a random crop; torchvision's RandomResizedCrop.get_params rule."""
        area, (low, high) = width * height, (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            u = torch.rand(4).tolist()
            target = area * (self.scale[0] + u[0] * (self.scale[1] - self.scale[0]))
            aspect = math.exp(low + u[1] * (high - low))
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return min(int(u[3] * (width - w + 1)), width - w), min(int(u[2] * (height - h + 1)), height - h), w, h
        w, h = width, height  # fallback: the centre crop closest to the allowed aspect ratios
        if width / height < min(self.ratio):
            h = int(round(w / min(self.ratio)))
        elif width / height > max(self.ratio):
            w = int(round(h * max(self.ratio)))
        return (width - w) // 2, (height - h) // 2, w, h

    def crop(self, image: Image.Image, box: Tuple[int, int, int, int]) -> torch.Tensor:
        left, top, w, h = box
        out = image.crop((left, top, left + w, top + h)).resize((self.size, self.size), Image.BICUBIC)
        if out.mode != "RGB":
            out = out.convert("RGB")
        return torch.from_numpy(np.array(out, dtype=np.uint8))  # H x W x 3, the pixels ToTensor would read

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.crop(image, self.box(*image.size))

    def finish(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> normalised float [B, 3, H, W]."""
        return pixels_to_input(batch, self.mean, self.std)


@dataclass
class ViewAugment:
    """SimCLR / MoCo v2 augmentation for one view. Defaults are the published ones (module docstring)."""

    image_size: int = 224
    crop_scale: Tuple[float, float] = (0.08, 1.0)
    flip: float = 0.5
    jitter: Tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_prob: float = 0.8
    gray_prob: float = 0.2
    blur_prob: float = 0.5
    solarize_prob: float = 0.0  # MoCo v3 / BYOL use 0.2 on the second view
    mean: Sequence[float] = OPENAI_MEAN
    std: Sequence[float] = OPENAI_STD

    def build(self) -> Callable:
        steps = [
            v2.ToImage(),
            v2.RandomResizedCrop(self.image_size, scale=self.crop_scale, antialias=True),
            v2.RandomHorizontalFlip(self.flip),
            v2.RandomApply([v2.ColorJitter(*self.jitter)], p=self.jitter_prob),
            v2.RandomGrayscale(self.gray_prob),
        ]
        if self.blur_prob > 0:
            kernel = max(3, int(0.1 * self.image_size) // 2 * 2 + 1)  # odd, ~10% of the side
            steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=self.blur_prob))
        if self.solarize_prob > 0:
            steps.append(v2.RandomSolarize(128, p=self.solarize_prob))
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(self.mean), list(self.std))]
        return v2.Compose(steps)


def view_transform(image_size: int, small: Optional[bool] = None, **overrides) -> Callable:
    """The SimCLR/MoCo view augmentation; at <= 64 px the blur is off by default (SimCLR's CIFAR setting)."""
    small = image_size <= 64 if small is None else small
    if small:
        overrides.setdefault("blur_prob", 0.0)
    return ViewAugment(image_size=image_size, **overrides).build()
