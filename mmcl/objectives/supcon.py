"""SupCon (Khosla et al. 2020) and the margin objectives (triplet, pairwise) on two augmented views.

All three are image-only like SimCLR (`ViewObjective`: the image tower and a projection head train, the text
tower is frozen) and differ only in the loss on the two views' projections:

- `supcon`: every view of the same class (`cls`) in the global batch is a positive (`SupConLoss`);
- `triplet`: a triplet margin loss with negatives mined in the global batch (`TripletLoss`);
- `pairwise`: Hadsell et al.'s margin-based contrastive loss over all pairs (`PairwiseMarginLoss`).
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from mmcl.config import Recipe
from mmcl.losses import PairwiseMarginLoss, SupConLoss, TripletLoss
from mmcl.objectives.base import Features
from mmcl.objectives.simclr import ViewObjective, sync_batchnorm_


class TwoViewObjective(ViewObjective):
    """The first two views through the tower and head, then `self.loss_fn(z0, z1)` under `self.name`."""

    name = ""

    def __init__(self, model: nn.Module, recipe: Recipe, loss_fn: nn.Module):
        super().__init__(model, recipe)
        self.loss_fn = loss_fn
        sync_batchnorm_(self)

    def encode(self, batch: dict) -> Features:
        views = batch["views"]
        return {"z0": self.project(views[0]), "z1": self.project(views[1])}

    def losses(self, features: Features) -> Dict[str, torch.Tensor]:
        loss = self.loss_fn(features["z0"], features["z1"])
        return {"loss": loss, f"loss/{self.name}": loss}

    def key_features(self) -> tuple:
        return ("z0", "z1")


class SupConObjective(TwoViewObjective):
    """Supervised contrastive learning: `objective.supcon.temperature` (default 0.1); batches carry `cls`."""

    name = "supcon"
    uses_labels = True

    def __init__(self, model: nn.Module, recipe: Recipe):
        options = recipe.objective.section("supcon")
        super().__init__(model, recipe, SupConLoss(options.temperature, chunk_size=recipe.objective.chunk_size))

    def encode(self, batch: dict) -> Features:
        return {**super().encode(batch), "label": batch["label"]}

    def losses(self, features: Features) -> Dict[str, torch.Tensor]:
        loss = self.loss_fn(features["z0"], features["z1"], features["label"])
        return {"loss": loss, "loss/supcon": loss}


class MarginObjective(TwoViewObjective):
    """A margin loss on two views; with `objective.<name>.labels: true` batches carry `cls` and the loss
    takes them (which views are negatives, and for the pairwise loss which are positives)."""

    def __init__(self, model: nn.Module, recipe: Recipe, loss_fn: nn.Module):
        super().__init__(model, recipe, loss_fn)
        self.uses_labels = recipe.objective.section(self.name).labels

    def encode(self, batch: dict) -> Features:
        features = super().encode(batch)
        return {**features, "label": batch["label"]} if self.uses_labels else features

    def losses(self, features: Features) -> Dict[str, torch.Tensor]:
        loss = self.loss_fn(features["z0"], features["z1"], features.get("label"))
        return {"loss": loss, f"loss/{self.name}": loss}


class TripletObjective(MarginObjective):
    """Triplet loss: `objective.triplet.margin` (default 0.2), `.mining` (semihard, hardest or all), `.labels`."""

    name = "triplet"

    def __init__(self, model: nn.Module, recipe: Recipe):
        options = recipe.objective.section("triplet")
        super().__init__(model, recipe, TripletLoss(options.margin, options.mining))


class PairwiseObjective(MarginObjective):
    """Margin-based contrastive (pairwise) loss: `objective.pairwise.margin` (default 1.0) and `.labels`."""

    name = "pairwise"

    def __init__(self, model: nn.Module, recipe: Recipe):
        super().__init__(model, recipe, PairwiseMarginLoss(recipe.objective.section("pairwise").margin))
