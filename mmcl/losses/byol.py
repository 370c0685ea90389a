"""BYOL's and SimSiam's loss: the negative cosine similarity between a prediction and a target.

BYOL (Grill et al. 2020) writes it as ||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z); SimSiam (Chen & He 2021) as
-cos(p, z). Both have the same gradients up to the factor 2; mmcl uses SimSiam's form, which is lightly's
`NegativeCosineSimilarity`, so the values can be compared with it directly. The target is never
differentiated: callers pass the EMA target's projection (BYOL) or a detached projection (SimSiam).
"""

import torch
import torch.nn.functional as F
from torch import nn


def negative_cosine(x0: torch.Tensor, x1: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """Mean of -cos(x0_i, x1_i) over the rows (torch's cosine_similarity, eps guarding zero norms)."""
    return -F.cosine_similarity(x0, x1, dim=dim, eps=eps).mean()


class NegativeCosineSimilarity(nn.Module):
    """-mean cos(x0, x1); lightly's signature (`dim`, `eps`) and values."""

    def __init__(self, dim: int = 1, eps: float = 1e-8):
        super().__init__()
        self.dim, self.eps = dim, eps

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        return negative_cosine(x0, x1, self.dim, self.eps)


def symmetric_negative_cosine(p0: torch.Tensor, p1: torch.Tensor, z0: torch.Tensor, z1: torch.Tensor,
                              eps: float = 1e-8) -> torch.Tensor:
    """BYOL / SimSiam's symmetrised loss: each view's prediction regresses the other view's target.

    The targets `z0`, `z1` are detached here (stop-gradient), whatever the caller passes.
    """
    return 0.5 * (negative_cosine(p0, z1.detach(), eps=eps) + negative_cosine(p1, z0.detach(), eps=eps))
