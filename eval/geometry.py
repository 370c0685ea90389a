"""Geometry of an embedding space: alignment, uniformity (Wang & Isola, 2020) and the modality gap.

- alignment: E ||f(x) - g(y)||^alpha over positive pairs (alpha = 2); 0 when pairs coincide.
- uniformity: log E exp(-t ||u - v||^2) over distinct pairs of one modality (t = 2); from 0 (all equal)
  down to about -4 for well-spread unit vectors.
- modality gap (Liang et al., 2022): ||mean(image features) - mean(text features)||.
Inputs are expected L2-normalised (the features eval computes are).
"""
from __future__ import annotations

import math
from typing import Dict

import torch

_BLOCK_ELEMENTS = 1 << 22


def alignment(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0) -> float:
    """Mean ||x_i - y_i||^alpha over paired rows."""
    if x.shape != y.shape or len(x) == 0:
        raise ValueError(f"alignment needs paired, non-empty features, got {tuple(x.shape)} and {tuple(y.shape)}")
    return float((x.double() - y.double()).norm(dim=1).pow(alpha).mean())


def uniformity(x: torch.Tensor, t: float = 2.0, block_size: int = None) -> float:
    """log of the mean of exp(-t ||x_i - x_j||^2) over pairs i < j, block by block."""
    n = len(x)
    if n < 2:
        raise ValueError(f"uniformity needs at least 2 points, got {n}")
    x = x.double()
    squared = (x * x).sum(dim=1)
    block = block_size or max(1, _BLOCK_ELEMENTS // n)
    total = 0.0
    for start in range(0, n - 1, block):
        rows = torch.arange(start, min(start + block, n))
        distance = (squared[rows, None] + squared[None, :] - 2 * x[rows] @ x.T).clamp_min(0)
        later = torch.arange(n)[None, :] > rows[:, None]  # each unordered pair once
        total += float(torch.exp(-t * distance)[later].sum())
    return math.log(total / (n * (n - 1) / 2))


def modality_gap(image_features: torch.Tensor, text_features: torch.Tensor) -> float:
    """Distance between the centres of the two modalities."""
    if len(image_features) == 0 or len(text_features) == 0:
        raise ValueError("modality gap needs image and text features")
    return float((image_features.double().mean(dim=0) - text_features.double().mean(dim=0)).norm())


def geometry_metrics(image_features: torch.Tensor, text_features: torch.Tensor,
                     text_to_image: torch.Tensor) -> Dict[str, float]:
    """Alignment of (image, caption) pairs, uniformity of each modality, modality gap, mean pair cosine."""
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long)
    paired_images = image_features[text_to_image]
    return {
        "alignment": alignment(paired_images, text_features),
        "uniformity_image": uniformity(image_features),
        "uniformity_text": uniformity(text_features),
        "modality_gap": modality_gap(image_features, text_features),
        "mean_pair_cosine": float((paired_images.double() * text_features.double()).sum(dim=1).mean()),
    }


def dimension_std(x: torch.Tensor) -> float:
    """Mean per-dimension standard deviation of (L2-normalised) features: 0 when they collapse to one point,
    about 1 / sqrt(dim) when they spread over the sphere."""
    if len(x) < 2:
        raise ValueError(f"a standard deviation needs at least 2 points, got {len(x)}")
    return float(x.double().std(dim=0).mean())


def effective_rank(x: torch.Tensor) -> float:
    """exp(entropy) of the normalised singular values (Roy & Vetterli 2007): 1 (a line) to min(N, dim)."""
    singular = torch.linalg.svdvals(x.double())
    p = singular / singular.sum() + 1e-12
    return float(torch.exp(-(p * p.log()).sum()))


def collapse_metrics(features: torch.Tensor) -> Dict[str, float]:
    """What shows a collapsed image tower: per-dimension std, effective rank and uniformity of its features."""
    return {"feature_std": dimension_std(features), "effective_rank": effective_rank(features),
            "uniformity": uniformity(features)}
