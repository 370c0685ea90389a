"""SimSiam (Chen & He 2021): a predictor and a stop-gradient, no momentum copy and no negatives.

Both views go through the same tower and projector (which ends in an affine-free BatchNorm, as SimSiam's
does); each view's prediction regresses the other view's projection, which is detached. Without the
stop-gradient the run collapses (SimSiam's Figure 2); the collapse watch logs the std of the projections.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from mmcl.config import Recipe
from mmcl.losses.byol import symmetric_negative_cosine
from mmcl.objectives.base import Features
from mmcl.objectives.byol import predictor_head
from mmcl.objectives.collapse import WatchedViewObjective
from mmcl.objectives.simclr import sync_batchnorm_


class SimSiamObjective(WatchedViewObjective):
    """SimSiam on the first two views of each image.

    Recipe fields: `model.ssl_head` (projector, SimSiam: [2048, 2048, 2048]; its output has BN),
    `objective.simsiam.predictor` (default `[out // 4, out]`, SimSiam's 512-2048 bottleneck).
    """

    def __init__(self, model: nn.Module, recipe: Recipe):
        super().__init__(model, recipe, last_bn=True)
        out = self.head.out_dim
        self.predictor = predictor_head(out, recipe.objective.section("simsiam").predictor, [max(1, out // 4), out])
        sync_batchnorm_(self)

    def encode(self, batch: dict) -> Features:
        v0, v1 = batch["views"][:2]
        z0, z1 = self.project(v0), self.project(v1)
        return {"z0": z0, "z1": z1, "p0": self.predictor(z0), "p1": self.predictor(z1)}

    def losses(self, features: Features) -> Dict[str, torch.Tensor]:
        self.watch(features["z0"])
        loss = symmetric_negative_cosine(features["p0"], features["p1"], features["z0"], features["z1"])
        return {"loss": loss, "loss/simsiam": loss}

    def key_features(self) -> tuple:
        return ("z0", "z1", "p0", "p1")
