"""lightly 1.6.0's implementations of the SSL methods, as the side-by-side benchmarks train them.

Each class is built from an mmcl objective before its first step: the image tower is copied, lightly's head
modules are built with the same layer sizes and get mmcl's initial weights (so both sides start from the same
point), and the loss, the momentum update and the schedule are lightly's (`NTXentLoss` with or without its
memory bank, `NegativeCosineSimilarity`, `VICRegLoss`, `SwaVLoss` + `SwaVPrototypes`, `update_momentum`,
`cosine_schedule`), used the way lightly's examples and CIFAR-10 benchmark use them. The optimiser is mmcl's
AdamW with the same parameter groups, schedule and gradient clipping, so that only the implementation of
the method differs. `step(batch)` trains one step on a batch of views and returns the loss.

lightly has no PCL; mmcl's PCL has no counterpart here.
"""
from __future__ import annotations

import copy
from typing import Dict, List

import torch
from lightly import loss as lightly_loss
from lightly.models import utils as lightly_utils
from lightly.models.modules import heads as lightly_heads
from lightly.utils.scheduler import cosine_schedule
from torch import nn

from mmcl.models.multicrop import encode_any_size
from mmcl.trainer.optim import make_optimizer, make_scheduler


def lightly_head(mmcl_head: nn.Sequential) -> lightly_heads.ProjectionHead:
    """lightly's ProjectionHead with the blocks (and weights) of an mmcl ProjectionHead."""
    linears = [m for m in mmcl_head if isinstance(m, nn.Linear)]
    norms = [m for m in mmcl_head if isinstance(m, nn.BatchNorm1d)]
    blocks = []
    for i, linear in enumerate(linears):
        last = i == len(linears) - 1
        norm = copy.deepcopy(norms[i]) if i < len(norms) else None
        activation = None if last else nn.ReLU()
        blocks.append((linear.in_features, linear.out_features, norm, activation, linear.bias is not None))
    head = lightly_heads.ProjectionHead(blocks)
    head.layers.load_state_dict(mmcl_head.state_dict())
    return head


class LightlyMethod(nn.Module):
    """Tower copy + the optimiser of the mmcl run; subclasses build heads and `loss(views, step)`."""

    def __init__(self, objective, recipe, total_steps: int):
        super().__init__()
        self.visual = copy.deepcopy(objective.model.visual)
        self.total_steps, self.clip, self.step_index = total_steps, recipe.optim.grad_clip, 0
        self.build(objective, recipe)
        self.optimizer = make_optimizer(self, recipe.optim)
        self.scheduler = make_scheduler(self.optimizer, total_steps, recipe.optim)

    def build(self, objective, recipe) -> None:
        raise NotImplementedError

    def add_momentum_copies(self) -> None:
        """lightly's momentum encoder: copies of tower and head with requires_grad off."""
        self.visual_momentum, self.head_momentum = copy.deepcopy(self.visual), copy.deepcopy(self.head)
        lightly_utils.deactivate_requires_grad(self.visual_momentum)
        lightly_utils.deactivate_requires_grad(self.head_momentum)

    def momentum_targets(self, views: List[torch.Tensor], m: float) -> List[torch.Tensor]:
        """update_momentum by m, then the momentum encoder's outputs for the first two views."""
        lightly_utils.update_momentum(self.visual, self.visual_momentum, m)
        lightly_utils.update_momentum(self.head, self.head_momentum, m)
        with torch.no_grad():
            return [self.head_momentum(self.visual_momentum(x)) for x in views[:2]]

    def loss(self, views: List[torch.Tensor], step: int) -> torch.Tensor:
        raise NotImplementedError

    def step(self, batch: Dict) -> float:
        self.train()
        loss = self.loss(batch["views"], self.step_index)
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_([p for p in self.parameters() if p.requires_grad], self.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_index += 1
        return float(loss.detach())


class LightlySimCLR(LightlyMethod):
    def build(self, objective, recipe):
        self.head = lightly_head(objective.head)
        self.criterion = lightly_loss.NTXentLoss(temperature=recipe.objective.section("simclr").temperature)

    def loss(self, views, step):
        return self.criterion(*(self.head(self.visual(x)) for x in views[:2]))


class LightlyMoCo(LightlyMethod):
    """lightly's MoCo (its CIFAR-10 benchmark): NTXentLoss with a memory bank, symmetric loss."""

    def build(self, objective, recipe):
        cfg = recipe.objective.section("moco")
        self.head = lightly_head(objective.head)
        self.add_momentum_copies()
        self.momentum = cfg.momentum
        self.criterion = lightly_loss.NTXentLoss(temperature=cfg.temperature,
                                                 memory_bank_size=(cfg.queue_size, self.head.layers[-1].out_features))

    def loss(self, views, step):
        k0, k1 = self.momentum_targets(views, self.momentum)
        q0, q1 = (self.head(self.visual(x)) for x in views[:2])
        return 0.5 * (self.criterion(q0, k1) + self.criterion(q1, k0))


class LightlyBYOL(LightlyMethod):
    def build(self, objective, recipe):
        self.head, self.predictor = lightly_head(objective.head), lightly_head(objective.predictor)
        self.add_momentum_copies()
        self.m0 = recipe.objective.section("byol").momentum
        self.criterion = lightly_loss.NegativeCosineSimilarity()

    def loss(self, views, step):
        m = cosine_schedule(step, self.total_steps + 1, self.m0, 1.0)  # BYOL's schedule over total_steps
        z0, z1 = self.momentum_targets(views, m)
        p0, p1 = (self.predictor(self.head(self.visual(x))) for x in views[:2])
        return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))


class LightlySimSiam(LightlyMethod):
    def build(self, objective, recipe):
        self.head, self.predictor = lightly_head(objective.head), lightly_head(objective.predictor)
        self.criterion = lightly_loss.NegativeCosineSimilarity()

    def loss(self, views, step):
        z0, z1 = (self.head(self.visual(x)) for x in views[:2])
        p0, p1 = self.predictor(z0), self.predictor(z1)
        return 0.5 * (self.criterion(p0, z1.detach()) + self.criterion(p1, z0.detach()))


class LightlyVICReg(LightlyMethod):
    def build(self, objective, recipe):
        cfg = recipe.objective.section("vicreg")
        self.head = lightly_head(objective.head)
        self.criterion = lightly_loss.VICRegLoss(cfg.invariance_weight, cfg.variance_weight, cfg.covariance_weight,
                                                 eps=cfg.eps)

    def loss(self, views, step):
        return self.criterion(*(self.head(self.visual(x)) for x in views[:2]))


class LightlySwaV(LightlyMethod):
    """lightly's SwaV example: prototypes normalised before each step, frozen for the first steps."""

    def build(self, objective, recipe):
        cfg = recipe.objective.section("swav")
        self.head = lightly_head(objective.head)
        self.prototypes = lightly_heads.SwaVPrototypes(self.head.layers[-1].out_features, cfg.prototypes,
                                                       n_steps_frozen_prototypes=cfg.freeze_prototypes_steps)
        with torch.no_grad():  # mmcl's initial prototypes; lightly's Linear adds a bias, which starts at 0
            self.prototypes.heads[0].weight.copy_(objective.prototypes.layer.weight)
            self.prototypes.heads[0].bias.zero_()
        self.large = recipe.data.num_views
        self.criterion = lightly_loss.SwaVLoss(cfg.temperature, cfg.sinkhorn_iterations, cfg.sinkhorn_epsilon)

    def loss(self, views, step):
        self.prototypes.normalize()
        scores = [self.prototypes(nn.functional.normalize(self.head(encode_any_size(self.visual, x)), dim=1), step)
                  for x in views]
        return self.criterion(scores[:self.large], scores[self.large:])


LIGHTLY = {"simclr": LightlySimCLR, "moco": LightlyMoCo, "byol": LightlyBYOL, "simsiam": LightlySimSiam,
           "vicreg": LightlyVICReg, "swav": LightlySwaV}
