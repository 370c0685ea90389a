"""MoCHi (Kalantidis et al. 2020): synthetic hard negatives mixed from each query's hardest queue entries.

For every query, the queue entries are ranked by similarity and the ``top_k`` hardest kept (the paper's N).
``s`` synthetic negatives mix two of them, ``h = a * n_i + (1 - a) * n_j`` with ``a ~ U(0, 1)``, and
``s_prime`` mix the query itself in, ``h' = b * q + (1 - b) * n_j`` with ``b ~ U(0, 0.5)`` (harder still);
all are L2-normalised. They are constants (no gradient flows into them, as in the paper) and join that query's
negatives only: ``info_nce(..., row_negatives=mochi_negatives(...))``. The draws use torch's global RNG.
"""

from typing import Optional

import torch

from mmcl.losses.infonce import l2_normalize


@torch.no_grad()
def mochi_negatives(query: torch.Tensor, negatives: torch.Tensor, top_k: int, s: int, s_prime: int,
                    generator: Optional[torch.Generator] = None) -> Optional[torch.Tensor]:
    """(N, s + s_prime, D) synthetic negatives for the (normalised) queries, or None when both counts are 0.

    Args:
        query: (N, D) normalised queries.
        negatives: (K, D) normalised negatives to mix from (MoCo's queue).
        top_k: how many of the hardest negatives (highest similarity) each query mixes from (N in the paper).
        s: negatives mixed from pairs of those; s_prime: negatives mixed from the query and one of them.
    """
    if not (s or s_prime):
        return None
    query = query.detach()
    k = min(top_k, negatives.shape[0])
    hardest = negatives[(query @ negatives.T).topk(k, dim=1).indices]  # (N, k, D), hardest first
    rows, draw = query.shape[0], dict(device=query.device, generator=generator)
    out = []
    if s:
        first = _pick(hardest, torch.randint(k, (rows, s), **draw))
        second = _pick(hardest, torch.randint(k, (rows, s), **draw))
        alpha = torch.rand(rows, s, 1, dtype=query.dtype, **draw)
        out.append(alpha * first + (1 - alpha) * second)
    if s_prime:
        picked = _pick(hardest, torch.randint(k, (rows, s_prime), **draw))
        beta = 0.5 * torch.rand(rows, s_prime, 1, dtype=query.dtype, **draw)
        out.append(beta * query[:, None, :] + (1 - beta) * picked)
    return l2_normalize(torch.cat(out, dim=1))


def _pick(hardest: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """hardest[n, index[n, j]] for every row n: (N, j, D)."""
    return hardest.gather(1, index[:, :, None].expand(-1, -1, hardest.shape[2]))
