"""CLIP and SigLIP: image-text contrast over the open_clip towers."""
from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F

from mmcl.config import Recipe
from mmcl.losses import ClipLoss, NegativeWeighting, SigLipLoss, clamp_logit_scale
from mmcl.objectives.base import Features, Objective
from mmcl.objectives.imix import mix_images, mix_targets
from mmcl.objectives.text_ssl import SimCSELoss, token_views

SIGLIP_INIT_SCALE = math.log(10.0)
SIGLIP_INIT_BIAS = -10.0


def negative_weighting(options) -> NegativeWeighting:
    """The loss-side weighting from a section's `hard_negatives` block."""
    block = options.hard_negatives
    return NegativeWeighting(block.beta, block.tau_plus, block.decoupled)


class ClipObjective(Objective):
    """Symmetric InfoNCE with the learnable temperature exp(t) of the model, clamped at 100 after each step.

    Options of `objective.clip` beyond the loss' own: `hard_negatives` (HCL / DCL / decoupled weighting),
    `label_positives` (same-class pairs are positives; batches carry `cls`), `imix_alpha` (i-Mix on the
    images), `text_ssl_weight` + `simcse` (a SimCSE term on the captions, see mmcl.objectives.text_ssl).
    """

    imix_alpha, text_ssl_weight, label_positives = 0.0, 0.0, False  # SigLIP skips ClipObjective.__init__

    def __init__(self, model, recipe: Recipe):
        super().__init__(model)
        opts = recipe.objective.section("clip")
        self.loss_fn = ClipLoss(local_loss=opts.local_loss, gather_with_grad=opts.gather_with_grad,
                                chunk_size=recipe.objective.chunk_size, weighting=negative_weighting(opts))
        self.imix_alpha, self.label_positives = opts.imix_alpha, opts.label_positives
        self.uses_labels = opts.label_positives
        self.text_ssl_weight, self.simcse = opts.text_ssl_weight, opts.simcse
        self.text_ssl = SimCSELoss(opts.simcse.temperature) if opts.text_ssl_weight else None

    def encode(self, batch: dict) -> Features:
        """Both towers; a tower whose locked part is in the locked-feature cache runs only from the cached output
        on (`batch["image_locked"]` / `batch["text_locked"]`, put there by mmcl.trainer.locked_cache)."""
        images, features = batch.get("image"), {}
        if self.imix_alpha and self.training:  # never with the cache (mmcl.validate): it mixes pixels
            images, features = mix_images(images, self.imix_alpha)
        if "image_locked" in batch:
            features["image"] = F.normalize(self.locked["image"].trainable(batch["image_locked"]), dim=-1)
        else:
            features["image"] = self.model.encode_image(images, normalize=True)
        if "text_locked" in batch:
            features["text"] = F.normalize(self.locked["text"].trainable(batch["text_locked"]), dim=-1)
        else:
            features["text"] = self.model.encode_text(batch["text"], normalize=True)
        if self.text_ssl_weight:  # SimCSE's second view: another dropout draw, maybe other tokens
            tokens = token_views(batch["text"], self.simcse.token_shuffle, self.simcse.token_cutoff)
            features["text_view"] = self.model.encode_text(tokens, normalize=True)
        if self.label_positives:
            features["label"] = batch["label"]
        return features

    def contrast(self, features: Features) -> torch.Tensor:
        """The image-text term."""
        classes = features["label"] if self.label_positives else None
        return self.loss_fn(features["image"], features["text"], self.model.logit_scale.exp(), classes=classes,
                            mix=mix_targets(features))

    def losses(self, features: Features) -> Dict[str, torch.Tensor]:
        loss = self.contrast(features)
        if not self.text_ssl_weight:
            return {"loss": loss}
        text_ssl = self.text_ssl(features["text"], features["text_view"])
        return {"loss": loss + self.text_ssl_weight * text_ssl, "loss/clip": loss, "loss/simcse": text_ssl}

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
