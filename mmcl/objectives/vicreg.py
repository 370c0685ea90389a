"""VICReg (Bardes, Ponce, LeCun 2022): invariance + variance + covariance between two views' embeddings.

The expander is `model.ssl_head` (VICReg: [8192, 8192, 8192], BN + ReLU after the hidden layers); no
predictor, no momentum copy, no negatives. The variance and covariance terms are statistics of the global
batch: every process gathers the embeddings of all processes with autograd
(`objective.vicreg.gather_distributed`, default true), so two processes with b rows train exactly like one
with 2b. The three unweighted terms are logged as `loss/invariance`, `loss/variance`, `loss/covariance`.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from mmcl.config import Recipe
from mmcl.losses.vicreg import VICRegLoss
from mmcl.objectives.base import Features
from mmcl.objectives.collapse import WatchedViewObjective
from mmcl.objectives.simclr import sync_batchnorm_


class VICRegObjective(WatchedViewObjective):
    """VICReg on the first two views; weights from `objective.vicreg` (25, 25, 1 as in the paper)."""

    def __init__(self, model: nn.Module, recipe: Recipe):
        super().__init__(model, recipe)
        cfg = recipe.objective.section("vicreg")
        self.loss_fn = VICRegLoss(cfg.invariance_weight, cfg.variance_weight, cfg.covariance_weight,
                                  gather_distributed=cfg.gather_distributed, eps=cfg.eps)
        sync_batchnorm_(self)

    def encode(self, batch: dict) -> Features:
        v0, v1 = batch["views"][:2]
        return {"z0": self.project(v0), "z1": self.project(v1)}

    def losses(self, features: Features) -> Dict[str, torch.Tensor]:
        self.watch(features["z0"])
        terms = self.loss_fn.terms(features["z0"], features["z1"])
        return {"loss": terms["loss"], "loss/vicreg": terms["loss"],
                **{f"loss/{name}": terms[name].detach() for name in ("invariance", "variance", "covariance")}}

    def key_features(self) -> tuple:
        return ("z0", "z1")
