"""SwAV (Caron et al. 2020): swapped prediction of Sinkhorn-Knopp codes over learnable prototypes.

Scores are cosine similarities between L2-normalised features and L2-normalised prototypes, one row per
sample. The codes of a large crop are an equipartition of its samples over the prototypes found by a few
Sinkhorn-Knopp iterations on exp(scores / epsilon); every other crop of the same images (large and small)
predicts them with a softmax at `temperature`. The codes are computed over the global batch: the sums over
samples are all-reduced across processes (SwAV's distributed_sinkhorn), so two processes with b rows each
get the codes one process gets for all 2b rows. Same values as lightly's `SwaVLoss` and `sinkhorn`.
"""

from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mmcl.distributed import get_world_size, is_distributed


def _all_reduce_sum(tensor: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, iterations: int = 3, epsilon: float = 0.05,
             gather_distributed: bool = False) -> torch.Tensor:
    """Soft codes (N, K) for the score rows (N, K): columns (prototypes) get equal mass, rows sum to 1.

    With `gather_distributed` the rows of every process form one problem (N x world samples).
    """
    world = get_world_size() if gather_distributed and is_distributed() else 1
    q = torch.exp(scores.float() / epsilon).t()  # K x N
    q /= _all_reduce_sum(q.sum(), world)
    samples = q.shape[1] * world
    for _ in range(iterations):
        q /= _all_reduce_sum(q.sum(dim=1, keepdim=True), world)  # each prototype the same total mass
        q /= q.sum(dim=0, keepdim=True)  # each sample a distribution
        q /= samples
    return (q * samples).t()


class SwaVLoss(nn.Module):
    """Swapped prediction over multi-crop scores; lightly's signature and values.

    Args:
        temperature: softmax temperature of the predictions (default 0.1).
        sinkhorn_iterations: Sinkhorn-Knopp iterations (default 3).
        sinkhorn_epsilon: entropic regularisation of the codes (default 0.05).
        sinkhorn_gather_distributed: codes over the global batch (default False, as in lightly).

    Forward: ``loss(high_resolution_outputs, low_resolution_outputs, queue_outputs=None)``: lists of (N, K)
    scores of the large crops, of the small crops, and of past large-crop features per large crop (this
    process's share of the queue; its rows join the Sinkhorn problem and get no code of their own).
    """

    def __init__(self, temperature: float = 0.1, sinkhorn_iterations: int = 3, sinkhorn_epsilon: float = 0.05,
                 sinkhorn_gather_distributed: bool = False):
        super().__init__()
        self.temperature, self.sinkhorn_iterations = temperature, sinkhorn_iterations
        self.sinkhorn_epsilon, self.sinkhorn_gather_distributed = sinkhorn_epsilon, sinkhorn_gather_distributed

    def codes(self, scores: torch.Tensor, queue: Optional[torch.Tensor] = None) -> torch.Tensor:
        rows = scores.shape[0]
        scores = scores.detach() if queue is None else torch.cat([scores.detach(), queue.detach()])
        return sinkhorn(scores, self.sinkhorn_iterations, self.sinkhorn_epsilon,
                        self.sinkhorn_gather_distributed)[:rows]

    def subloss(self, scores: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the softmax prediction `scores / temperature` against the `codes`."""
        return -(codes * F.log_softmax(scores / self.temperature, dim=1)).sum(dim=1).mean()

    def forward(self, high_resolution_outputs: List[torch.Tensor], low_resolution_outputs: List[torch.Tensor],
                queue_outputs: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        crops = list(high_resolution_outputs) + list(low_resolution_outputs)
        total = crops[0].new_zeros(())
        for i, scores in enumerate(high_resolution_outputs):
            codes = self.codes(scores, queue_outputs[i] if queue_outputs is not None else None)
            others = [self.subloss(other, codes) for v, other in enumerate(crops) if v != i]
            total = total + sum(others) / len(others)
        return total / len(high_resolution_outputs)
