"""Projection heads shared by the objectives (SimCLR / MoCo / SLIP) and the MoCo v3 predictor."""
from __future__ import annotations

from typing import Sequence

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
