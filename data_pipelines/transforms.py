"""Image transforms: open_clip's train/eval preprocessing and the SimCLR / MoCo view augmentations.

Published defaults (SimCLR, Chen et al. 2020, appendix A; MoCo v2, Chen et al. 2020):
random resized crop scale (0.08, 1.0), horizontal flip p=0.5, colour jitter (0.4, 0.4, 0.4, 0.1) applied
with p=0.8, grayscale p=0.2, Gaussian blur with p=0.5 and kernel ~10% of the image side, sigma (0.1, 2.0).
At 32-64 px SimCLR drops the blur and keeps crop scale (0.08, 1); `small=True` does that (its CIFAR recipe).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import open_clip
import torch
from torchvision.transforms import v2

OPENAI_MEAN = open_clip.OPENAI_DATASET_MEAN
OPENAI_STD = open_clip.OPENAI_DATASET_STD


def clip_transform(image_size: int, train: bool, mean: Sequence[float] = OPENAI_MEAN,
                   std: Sequence[float] = OPENAI_STD, crop_scale: Tuple[float, float] = (0.9, 1.0)) -> Callable:
    """open_clip's preprocessing: eval resizes and centre-crops; train adds a random resized crop."""
    aug = {"scale": crop_scale} if train else None
    return open_clip.image_transform(image_size, is_train=train, mean=tuple(mean), std=tuple(std), aug_cfg=aug)


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
