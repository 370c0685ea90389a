"""VSE++ (Faghri et al. 2018): image-text hinge ranking on the CLIP towers instead of InfoNCE.

The towers, data and gathers are CLIP's; the loss is `VSELoss` on cosine similarities (no temperature, so
the model's logit scale is frozen): `objective.vse.margin` (default 0.2) and `.violation` ("max": the
hardest negative of each pair in the global batch, VSE++; "sum": every violation, VSE0).
"""
from __future__ import annotations

from typing import Dict

import torch

from mmcl.config import Recipe
from mmcl.losses import VSELoss
from mmcl.objectives.base import Features, Objective
from mmcl.objectives.clip import ClipObjective


class VSEObjective(ClipObjective):
    """CLIP's towers and batches, VSE++'s ranking loss."""

    def __init__(self, model, recipe: Recipe):
        Objective.__init__(self, model)
        options = recipe.objective.section("vse")
        self.loss_fn = VSELoss(options.margin, options.violation)
        model.logit_scale.requires_grad_(False)  # cosine similarities: no temperature to learn

    def losses(self, features: Features) -> Dict[str, torch.Tensor]:
        loss = self.loss_fn(features["image"], features["text"])
        return {"loss": loss, "loss/vse": loss}
