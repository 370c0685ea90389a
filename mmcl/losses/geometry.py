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


# ---- collapse of the objectives without negatives (BYOL, SimSiam, VICReg, SwAV) --------------------------

def dimension_std(x: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the standard deviation over rows of the L2-normalised features.

    SimSiam's collapse monitor: 0 when every row is the same vector, about 1 / sqrt(dim) when the rows
    spread over the sphere (a Gaussian's direction has that per-dimension std).
    """
    return l2_normalize(x).std(dim=0).mean()


def effective_rank(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """exp(entropy) of the normalised singular values of the L2-normalised features (Roy & Vetterli 2007;
    RankMe). From 1 (all rows on one line) up to min(rows, dim)."""
    singular = torch.linalg.svdvals(l2_normalize(x).float())
    p = singular / singular.sum().clamp_min(eps) + eps
    return torch.exp(-(p * p.log()).sum())


@torch.no_grad()
def collapse_metrics(x: torch.Tensor) -> dict:
    """{"std", "effective_rank", "uniformity"} of a batch of outputs, as floats, for logging."""
    x = x.detach().float()
    return {"std": float(dimension_std(x)), "effective_rank": float(effective_rank(x)),
            "uniformity": float(uniformity(x)) if x.shape[0] > 1 else float("nan")}
