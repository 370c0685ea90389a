"""Projection heads shared by the objectives (SimCLR / MoCo / SLIP / BYOL / ...), predictors, SwAV's prototypes."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Sequential):
    """MLP: (Linear -> BatchNorm -> ReLU) per hidden size, then Linear (no bias, BN-free as in SimCLR v1).

    `dims` lists hidden sizes then the output size, e.g. (2048, 2048, 128) at scale, (512, 128) for tiny runs.
    `last_bn` adds an affine-free BatchNorm on the output, as MoCo v3 does.
    """

    def __init__(self, in_dim: int, dims: Sequence[int], last_bn: bool = False):
        layers = []
        for hidden in dims[:-1]:
            layers += [nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
            in_dim = hidden
        layers.append(nn.Linear(in_dim, dims[-1], bias=not last_bn))
        if last_bn:
            layers.append(nn.BatchNorm1d(dims[-1], affine=False))
        super().__init__(*layers)
        self.out_dim = dims[-1]


class Prototypes(nn.Module):
    """SwAV's prototypes: K unit vectors; scores are cosine similarities with normalised features.

    A bias-free Linear (as in SwAV's code; lightly's `SwaVPrototypes` has a bias) whose rows `normalize_`
    puts back on the unit sphere before each step.
    """

    def __init__(self, dim: int, count: int):
        super().__init__()
        self.layer = nn.Linear(dim, count, bias=False)
        self.normalize_()

    @torch.no_grad()
    def normalize_(self) -> None:
        self.layer.weight.copy_(F.normalize(self.layer.weight, dim=1))

    def forward(self, features: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """Scores (N, K); `frozen` keeps the prototypes out of the graph (SwAV's first iterations)."""
        weight = self.layer.weight.detach() if frozen else self.layer.weight
        return features @ weight.T
