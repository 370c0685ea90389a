"""The objective protocol: batch -> features -> named losses, over shared towers, heads and losses.

Splitting `encode` from `losses` is what lets the trainer accumulate contrastively (feature cache):
it encodes every micro-batch without gradients, computes the loss once over all features, then re-encodes
each micro-batch with gradients and back-propagates the cached feature gradients.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from mmcl.models.frozen import keep_locked_in_eval

Features = Dict[str, torch.Tensor]


class Objective(nn.Module):
    """Owns the open_clip towers as `self.model` plus its own heads, momentum copies and loss modules.

    Subclasses implement `encode` and `losses`; `losses(...)["loss"]` is the total that is minimised.
    """

    uses_text = True  # does a batch need captions?
    uses_image = True  # the eval-transformed single view
    uses_views = False  # augmented views (SimCLR / MoCo / SLIP)
    uses_labels = False  # class labels (`cls`): SupCon, CLIP's label positives

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.locked = {}  # tower name -> mmcl.models.frozen.TowerSplit whose frozen part the locked-feature cache holds

    def train(self, mode: bool = True) -> "Objective":
        """Locked parts of the towers stay in eval mode: no dropout, fixed statistics (mmcl.models.frozen)."""
        super().train(mode)
        if mode:
            keep_locked_in_eval(self.model)
        return self

    def encode(self, batch: dict) -> Features:
        raise NotImplementedError

    def losses(self, features: Features) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, batch: dict) -> Dict[str, torch.Tensor]:
        return self.losses(self.encode(batch))

    def before_step(self, step: int, total_steps: int) -> None:
        """Called before each optimizer step's forward passes (e.g. momentum updates of key encoders)."""

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after each optimizer step (e.g. the temperature clamp)."""

    def log_values(self) -> Dict[str, float]:
        """Scalars worth logging besides the losses (temperature, momentum, ...)."""
        return {}

    def before_epoch(self, epoch: int, urls: List[str]) -> None:
        """Called before the first step of each epoch (not when a run resumes inside one) with the training
        shards; PCL clusters the training set here."""

    def warning(self) -> Optional[str]:
        """A problem worth telling the user about (e.g. collapse), checked at each log record; None if fine."""
        return None

    def key_features(self) -> tuple:
        """Feature names that differ per sample and are gathered/concatenated across micro-batches."""
        return ()
