"""CLIP with cross-modal queues (`objective.clip.cross_modal_queue: N`), so small batches see many negatives.

MoCo-style, as ALBEF does it: a momentum (EMA) copy of the whole open_clip model encodes keys; each image
query is scored against the key texts of the global batch followed by a queue of N past key texts, and each
text query against the key images and a queue of N past key images. The positive is the key of the query's
own pair, and the temperature is CLIP's learnable one. After the loss, the gathered keys are enqueued
(identically on every process). Keys come from the slowly moving copy, not from the live towers, so the
queue stays consistent with the current batch (MoCo's argument); the copy moves in `before_step` by
`objective.clip.momentum` (default 0.99, cosine to 1 with `objective.clip.momentum_cosine`).
`objective.clip.hard_negatives` weights the negatives (HCL / DCL / decoupled) and `objective.clip.mochi` adds
MoCHi's synthetic negatives mixed from each query's hardest entries of the other modality's queue.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from mmcl.config import Recipe
from mmcl.distributed import all_gather_no_grad, get_rank
from mmcl.losses import diagonal_labels, info_nce, l2_normalize, mochi_negatives
from mmcl.losses.queue import enqueue_, random_queue
from mmcl.models import ema_step, momentum_copy
from mmcl.objectives.base import Features
from mmcl.objectives.clip import ClipObjective
from mmcl.objectives.simclr import image_embed_dim


class ClipQueueObjective(ClipObjective):
    """Symmetric InfoNCE against momentum keys of the global batch plus image and text key queues.

    Buffers `image_queue` / `text_queue` (N, embed_dim) and their `*_ptr` are in `state_dict`, so a checkpoint
    resumes with the same negatives. The queues change only in training mode.
    """

    def __init__(self, model: nn.Module, recipe: Recipe):
        super().__init__(model, recipe)
        cfg = recipe.objective.section("clip")
        size, dim = cfg.cross_modal_queue, image_embed_dim(model)
        self.key_model = momentum_copy(model)
        for name in ("image", "text"):
            self.register_buffer(f"{name}_queue", random_queue(size, dim))
            self.register_buffer(f"{name}_queue_ptr", torch.zeros(1, dtype=torch.long))
        self.base_momentum, self.momentum_cosine = cfg.momentum, cfg.momentum_cosine
        self.momentum = cfg.momentum
        self.chunk_size = recipe.objective.chunk_size
        self.mochi = (cfg.mochi.top_k, cfg.mochi.s, cfg.mochi.s_prime) if cfg.mochi.active else None

    def encode(self, batch: dict) -> Features:
        features = super().encode(batch)
        with torch.no_grad():
            features["key_image"] = self.key_model.encode_image(batch["image"], normalize=True)
            features["key_text"] = self.key_model.encode_text(batch["text"], normalize=True)
        return features

    def contrast(self, features: Features) -> torch.Tensor:
        image, text = l2_normalize(features["image"]), l2_normalize(features["text"])
        key_image = all_gather_no_grad(l2_normalize(features["key_image"]))
        key_text = all_gather_no_grad(l2_normalize(features["key_text"]))
        rows, scale = image.shape[0], self.model.logit_scale.exp()
        labels = diagonal_labels(rows, get_rank() * rows, device=image.device)
        to_text = self._direction(image, key_text, self.text_queue, scale, labels)
        to_image = self._direction(text, key_image, self.image_queue, scale, labels)
        if self.training:  # torch.cat in _direction copied the queues: backward sees the pre-update negatives
            enqueue_(self.image_queue, self.image_queue_ptr, key_image, gather=False)
            enqueue_(self.text_queue, self.text_queue_ptr, key_text, gather=False)
        return 0.5 * (to_text + to_image)

    def _direction(self, query, keys, queue, scale, labels):
        """Queries against the keys of the global batch and the other modality's queue (+ MoCHi negatives)."""
        extra = mochi_negatives(query, queue, *self.mochi) if self.mochi else None
        return info_nce(query, torch.cat([keys, queue]), scale, labels, chunk_size=self.chunk_size,
                        row_negatives=extra, weighting=self.loss_fn.weighting)

    def before_step(self, step: int, total_steps: int) -> None:
        self.momentum = ema_step(((self.key_model, self.model),), self.base_momentum, step, total_steps,
                                 self.momentum_cosine)

    def log_values(self) -> Dict[str, float]:
        return {**super().log_values(), "momentum": float(self.momentum)}

    def key_features(self) -> tuple:
        return ("image", "text", "key_image", "key_text")
