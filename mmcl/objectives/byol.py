"""BYOL (Grill et al. 2020): an online network regresses the projections of an EMA target network.

The online network is the open_clip image tower (`model.visual`), the projection head and a predictor; the
target network is a momentum copy of tower and head that never reaches the optimiser. Before each step the
target moves towards the online weights by the momentum m, which rises from `objective.byol.momentum` (m0)
to 1 along a half cosine over the run (BYOL's schedule; `momentum_cosine: false` keeps it at m0). The loss is
the symmetrised negative cosine between each view's prediction and the target's projection of the other
view. The target is part of the objective's state, so checkpoints carry it and a resumed run continues
exactly; `mmcl export` and evaluation use the online tower, as the paper does.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from mmcl.config import Recipe
from mmcl.losses.byol import symmetric_negative_cosine
from mmcl.models import ProjectionHead, ema_step, momentum_copy
from mmcl.objectives.base import Features
from mmcl.objectives.collapse import WatchedViewObjective
from mmcl.objectives.simclr import sync_batchnorm_


def predictor_head(out_dim: int, sizes: Optional[List[int]], default: List[int]) -> ProjectionHead:
    """The predictor MLP from the projection's size back to it: `sizes` (hidden..., out) or `default`."""
    return ProjectionHead(out_dim, list(sizes) if sizes else default)


class BYOLObjective(WatchedViewObjective):
    """BYOL on the first two views of each image.

    Recipe fields: `objective.byol.momentum` (m0, default 0.99; BYOL: 0.996), `momentum_cosine` (default
    true), `predictor` (default `[model.ssl_head[0], model.ssl_head[-1]]`, BYOL's 4096-256);
    `model.ssl_head` (projector, BYOL: [4096, 256]).
    """

    def __init__(self, model: nn.Module, recipe: Recipe):
        super().__init__(model, recipe)
        cfg, dims = recipe.objective.section("byol"), recipe.model.ssl_head
        self.predictor = predictor_head(self.head.out_dim, cfg.predictor, [dims[0], dims[-1]] if len(dims) > 1
                                        else [dims[-1]])
        self.target_visual = momentum_copy(model.visual)
        self.target_head = momentum_copy(self.head)
        self.base_momentum, self.momentum_cosine = cfg.momentum, cfg.momentum_cosine
        self.momentum = cfg.momentum
        sync_batchnorm_(self)

    @torch.no_grad()
    def target(self, images: torch.Tensor) -> torch.Tensor:
        return self.target_head(self.target_visual(images))

    def encode(self, batch: dict) -> Features:
        v0, v1 = batch["views"][:2]
        z0, z1 = self.project(v0), self.project(v1)
        return {"p0": self.predictor(z0), "p1": self.predictor(z1), "t0": self.target(v0), "t1": self.target(v1),
                "z0": z0.detach()}

    def losses(self, features: Features) -> Dict[str, torch.Tensor]:
        self.watch(features["z0"])
        loss = symmetric_negative_cosine(features["p0"], features["p1"], features["t0"], features["t1"])
        return {"loss": loss, "loss/byol": loss}

    def before_step(self, step: int, total_steps: int) -> None:
        """Move the target towards the online network before this step's targets are computed."""
        pairs = ((self.target_visual, self.model.visual), (self.target_head, self.head))
        self.momentum = ema_step(pairs, self.base_momentum, step, total_steps, self.momentum_cosine)

    def log_values(self) -> Dict[str, float]:
        return {**super().log_values(), "momentum": float(self.momentum)}

    def key_features(self) -> tuple:
        return ("p0", "p1", "t0", "t1", "z0")
