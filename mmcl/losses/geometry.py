"""Alignment and uniformity of an embedding (Wang & Isola 2020), for logging.

Both take features and L2-normalise them first, so they are safe on raw and on normalised features.
Lower is better for both.
"""

import math

import torch

from mmcl.losses.infonce import l2_normalize


def alignment(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """E ||x_i - y_i||^alpha over positive pairs (rows of x and y); alpha defaults to 2."""
    x, y = l2_normalize(x), l2_normalize(y)
    return (x - y).norm(dim=1).pow(alpha).mean()


def uniformity(x: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """log E exp(-t ||x_i - x_j||^2) over distinct pairs i < j; t defaults to 2.

    Needs at least two rows. Memory grows like N^2 / 2, so log it on a sample of a large batch.
    """
    if x.shape[0] < 2:
        raise ValueError("uniformity needs at least two features")
    squared = torch.pdist(l2_normalize(x), p=2).pow(2)
    # log-mean-exp through logsumexp so that large t does not underflow to log(0).
    return torch.logsumexp(-t * squared, dim=0) - math.log(squared.numel())
