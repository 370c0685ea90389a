"""CLIP and SigLIP: image-text contrast over the open_clip towers."""
from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F

from mmcl.config import Recipe
from mmcl.losses import ClipLoss, SigLipLoss, clamp_logit_scale
from mmcl.objectives.base import Features, Objective

SIGLIP_INIT_SCALE = math.log(10.0)
SIGLIP_INIT_BIAS = -10.0


class ClipObjective(Objective):
    """Symmetric InfoNCE with the learnable temperature exp(t) of the model, clamped at 100 after each step."""

    def __init__(self, model, recipe: Recipe):
        super().__init__(model)
        opts = recipe.objective.section("clip")
        self.loss_fn = ClipLoss(local_loss=opts.local_loss, gather_with_grad=opts.gather_with_grad,
                                chunk_size=recipe.objective.chunk_size)

    def encode(self, batch: dict) -> Features:
        """Both towers; a tower whose locked part is in the locked-feature cache runs only from the cached output on
        (`batch["image_locked"]` / `batch["text_locked"]`, put there by mmcl.train.locked_cache)."""
        if "image_locked" in batch:
            image = F.normalize(self.locked["image"].trainable(batch["image_locked"]), dim=-1)
        else:
            image = self.model.encode_image(batch["image"], normalize=True)
        if "text_locked" in batch:
            text = F.normalize(self.locked["text"].trainable(batch["text_locked"]), dim=-1)
        else:
            text = self.model.encode_text(batch["text"], normalize=True)
        return {"image": image, "text": text}

    def losses(self, features: Features) -> Dict[str, torch.Tensor]:
        loss = self.loss_fn(features["image"], features["text"], self.model.logit_scale.exp())
        return {"loss": loss}

    def after_step(self, step: int, total_steps: int) -> None:
        clamp_logit_scale(self.model.logit_scale)

    def log_values(self) -> Dict[str, float]:
        return {"logit_scale": float(self.model.logit_scale.detach().exp())}

    def key_features(self) -> tuple:
        return ("image", "text")


class SigLipObjective(ClipObjective):
    """Pairwise sigmoid loss with learnable scale and bias (the model is built with init ln 10 and -10)."""

    def __init__(self, model, recipe: Recipe):
        Objective.__init__(self, model)
        if getattr(model, "logit_bias", None) is None:
            raise ValueError("objective.name=siglip needs a model built with a logit bias")
        self.loss_fn = SigLipLoss(dist_impl=recipe.objective.section("siglip").dist_impl)

    def losses(self, features: Features) -> Dict[str, torch.Tensor]:
        loss = self.loss_fn(features["image"], features["text"], self.model.logit_scale.exp(), self.model.logit_bias)
        return {"loss": loss}

    def log_values(self) -> Dict[str, float]:
        return {"logit_scale": float(self.model.logit_scale.detach().exp()),
                "logit_bias": float(self.model.logit_bias.detach())}
