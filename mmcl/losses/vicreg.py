"""VICReg (Bardes, Ponce, LeCun 2022): invariance + variance + covariance, no negatives.

    loss = lambda * mse(z_a, z_b)
         + mu * (mean_j relu(1 - std_j(z_a)) + mean_j relu(1 - std_j(z_b))) / 2
         + nu * (sum_{i != j} cov(z_a)_ij^2 / d + sum_{i != j} cov(z_b)_ij^2 / d)

with std_j = sqrt(var_j + eps). The invariance term is a mean over this process's rows (the mean over
processes of equal batches is the global mean); the variance and covariance are statistics of the global
batch, so with `gather_distributed` every process gathers the embeddings of all processes with autograd
(VICReg's FullGatherLayer, mmcl.distributed.all_gather_with_grad) before computing them. Same values as
lightly's `VICRegLoss` with the same weights.
"""

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.distributed import all_gather_with_grad


def invariance_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(x, y)


def variance_loss(x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Hinge on the per-dimension standard deviation: mean_j relu(1 - sqrt(var_j + eps))."""
    std = torch.sqrt(x.var(dim=0) + eps)
    return F.relu(1.0 - std).mean()


def covariance_loss(x: torch.Tensor) -> torch.Tensor:
    """Sum of the squared off-diagonal entries of the covariance matrix, divided by the dimension."""
    rows, dim = x.shape
    x = x - x.mean(dim=0)
    cov = (x.T @ x) / (rows - 1)
    off_diagonal = cov - torch.diag_embed(cov.diagonal())
    return off_diagonal.pow(2).sum() / dim


class VICRegLoss(nn.Module):
    """VICReg's loss on two batches of embeddings (N, D), N > 1 on the global batch.

    Args:
        lambda_param: invariance weight (default 25).
        mu_param: variance weight (default 25).
        nu_param: covariance weight (default 1).
        gather_distributed: variance and covariance over the global batch (default True).
        eps: added to the variance before the square root (default 1e-4).
    """

    def __init__(self, lambda_param: float = 25.0, mu_param: float = 25.0, nu_param: float = 1.0,
                 gather_distributed: bool = True, eps: float = 1e-4):
        super().__init__()
        self.lambda_param, self.mu_param, self.nu_param = lambda_param, mu_param, nu_param
        self.gather_distributed, self.eps = gather_distributed, eps

    def terms(self, z_a: torch.Tensor, z_b: torch.Tensor) -> dict:
        """The three unweighted terms (for logging) and the weighted total under "loss"."""
        if z_a.shape != z_b.shape:
            raise ValueError(f"VICReg needs two batches of the same shape, got {tuple(z_a.shape)} and "
                             f"{tuple(z_b.shape)}")
        invariance = invariance_loss(z_a, z_b)
        if self.gather_distributed:
            z_a, z_b = all_gather_with_grad(z_a), all_gather_with_grad(z_b)
        if z_a.shape[0] < 2:
            raise ValueError("VICReg's variance and covariance need at least 2 rows in the (global) batch")
        variance = 0.5 * (variance_loss(z_a, self.eps) + variance_loss(z_b, self.eps))
        covariance = covariance_loss(z_a) + covariance_loss(z_b)
        loss = self.lambda_param * invariance + self.mu_param * variance + self.nu_param * covariance
        return {"loss": loss, "invariance": invariance, "variance": variance, "covariance": covariance}

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        return self.terms(z_a, z_b)["loss"]
