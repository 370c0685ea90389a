"""SLIP (Mu et al. 2022): CLIP on image-caption pairs plus SimCLR on two views of the same images.

One image tower serves both: the CLIP image embedding is `encode_image(image)` and the SimCLR projections
are `head(encode_image(view))`, one tower forward per view (three per step: the CLIP image and two views).
The total is `clip_weight * CLIP + ssl_weight * NT-Xent` (defaults 1 and 1, SLIP's). SLIP's NT-Xent uses
temperature 0.1 (`objective.simclr.temperature`); CLIP keeps its learnable temperature. The weights are
`objective.slip.clip_weight` and `objective.slip.ssl_weight`; CLIP's own options are read from `objective.clip`.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from mmcl.config import Recipe
from mmcl.losses import NTXentLoss
from mmcl.models import ProjectionHead
from mmcl.objectives.base import Features
from mmcl.objectives.clip import ClipObjective
from mmcl.objectives.simclr import image_embed_dim, sync_batchnorm_


class SlipObjective(ClipObjective):
    """CLIP loss + weighted SimCLR loss over a shared image tower (`model.ssl_head` sizes the head)."""

    uses_views = True

    def __init__(self, model: nn.Module, recipe: Recipe):
        if recipe.data.num_views < 2:
            raise ValueError(f"data.num_views: slip needs at least 2 views, got {recipe.data.num_views}")
        super().__init__(model, recipe)
        cfg = recipe.objective.section("slip")
        self.head = ProjectionHead(image_embed_dim(model), recipe.model.ssl_head)
        self.ssl_loss = NTXentLoss(recipe.objective.section("simclr").temperature, gather_distributed=True,
                                   chunk_size=recipe.objective.chunk_size)
        self.clip_weight, self.ssl_weight = cfg.clip_weight, cfg.ssl_weight
        sync_batchnorm_(self)

    def encode(self, batch: dict) -> Features:
        features = super().encode(batch)
        views = batch["views"]
        features["z0"] = self.head(self.model.encode_image(views[0]))
        features["z1"] = self.head(self.model.encode_image(views[1]))
        return features

    def losses(self, features: Features) -> Dict[str, torch.Tensor]:
        clip = super().losses(features)["loss"]
        ssl = self.ssl_loss(features["z0"], features["z1"])
        loss = self.clip_weight * clip + self.ssl_weight * ssl
        return {"loss": loss, "loss/clip": clip, "loss/simclr": ssl}

    def key_features(self) -> tuple:
        return ("image", "text", "z0", "z1")
