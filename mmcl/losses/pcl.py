"""PCL's ProtoNCE (Li et al. 2021) on the mmcl InfoNCE core.

For one clustering of the training set (k normalised centroids c, a concentration phi per cluster, and each
sample's cluster), query i is scored against the centroids of the batch's clusters (its own is the positive)
followed by r other centroids drawn at random, each logit divided by that centroid's concentration:

    logit_ij = q_i . c_j / phi_j,   target of row i = column i (its own cluster's centroid)

as PCL's code does it (so samples of the same cluster share a column value). Dividing the keys by phi turns
this into plain InfoNCE with scale 1. The loss averages over the clusterings (several k).
"""

from typing import List, Optional, Sequence

import torch

from mmcl.losses.infonce import info_nce, l2_normalize


def proto_nce(query: torch.Tensor, centroids: torch.Tensor, concentration: torch.Tensor,
              assignments: torch.Tensor, negatives: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """ProtoNCE of `query` (N, D) against one clustering: `centroids` (K, D), `concentration` (K,),
    `assignments` (N,) each query's cluster; `negatives` (r) other centroids, drawn without replacement."""
    query, centroids = l2_normalize(query), l2_normalize(centroids)
    others = torch.ones(centroids.shape[0], dtype=torch.bool, device=centroids.device)
    others[assignments] = False
    candidates = others.nonzero().squeeze(1)
    if candidates.numel() > negatives:  # PCL samples r of them; with fewer, all are negatives
        order = torch.randperm(candidates.numel(), generator=generator, device="cpu")[:negatives]
        candidates = candidates[order.to(candidates.device)]
    columns = torch.cat([assignments, candidates])
    keys = centroids[columns] / concentration[columns, None]
    return info_nce(query, keys, 1.0)


def proto_nce_mean(query: torch.Tensor, clusterings: Sequence[dict], negatives: int,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Mean ProtoNCE over several clusterings, each {"centroids", "concentration", "assignments"}."""
    terms: List[torch.Tensor] = [proto_nce(query, c["centroids"], c["concentration"], c["assignments"], negatives,
                                           generator) for c in clusterings]
    return torch.stack(terms).mean()
