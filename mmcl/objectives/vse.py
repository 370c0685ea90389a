"""VSE++ (Faghri et al. 2018): image-text hinge ranking on the CLIP towers instead of InfoNCE.

The towers, data and gathers are CLIP's; the loss is `VSELoss` on cosine similarities (no temperature, so
the model's logit scale is frozen): `objective.vse.margin` (default 0.2) and `.violation` ("max": the
hardest negative of each pair in the global batch, VSE++; "sum": every violation, VSE0). Trained from
scratch, the max violation can collapse every embedding to one point, where each pair costs exactly twice the
margin (fartashf/vsepp#27; VSE++ trained on pretrained features); `.sum_warmup_steps` uses the sum for the
first steps, as VSE-infinity (Chen et al. 2021) does for its first epoch.
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
        self.violation, self.sum_warmup_steps = options.violation, options.sum_warmup_steps
        model.logit_scale.requires_grad_(False)  # cosine similarities: no temperature to learn

    def before_step(self, step: int, total_steps: int) -> None:
        self.loss_fn.violation = "sum" if step < self.sum_warmup_steps else self.violation

    def losses(self, features: Features) -> Dict[str, torch.Tensor]:
        loss = self.loss_fn(features["image"], features["text"])
        return {"loss": loss, "loss/vse": loss}
