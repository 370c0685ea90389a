"""MoCo v2 (Chen et al. 2020) and MoCo v3 (Chen, Xie, He 2021) over the open_clip image tower.

Both keep a momentum (EMA) copy of the image tower and projection head as the key encoder; it is never in
the optimizer and moves only in `before_step`, by `objective.moco.momentum` (default 0.99), annealed to 1
along a half cosine when `objective.moco.momentum_cosine` is set.

- v2: each query's positive is the key of the other view of its image, its negatives a queue of past keys
  (`MoCoLoss`, `objective.moco.queue_size`, default 4096; 65,536 at ImageNet scale). The loss is symmetrised over
  the two views (as MoCo v3's paper and lightly's benchmarks do) and the keys of one view per step, gathered
  from every process, are enqueued. The queue is a buffer, so checkpoints carry it.
- v3: no queue; a predictor head on the queries, a projector ending in BatchNorm, and the symmetric loss
  `MoCoV3Loss` with the keys of the global batch as candidates. Works with ViTs as well as ResNets.

Multi-GPU runs convert BatchNorm to SyncBatchNorm (see `sync_batchnorm_`) in place of MoCo v2's shuffle-BN.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from mmcl.config import Recipe
from mmcl.losses import MoCoLoss, MoCoV3Loss, inverse_permutation
from mmcl.models import ProjectionHead, ema_step, momentum_copy
from mmcl.objectives.base import Features
from mmcl.objectives.clip import negative_weighting
from mmcl.objectives.imix import mix_targets
from mmcl.objectives.simclr import ViewObjective, sync_batchnorm_


class MoCoObjective(ViewObjective):
    """MoCo v2 or v3 (`objective.moco.version`) on the first two views of each image.

    Recipe fields (`objective.moco`): `temperature` (default 0.1; MoCo v2 uses 0.2, v3 0.2 for ViTs),
    `queue_size` (v2), `momentum`, `momentum_cosine`, `hard_negatives` (HCL / DCL / decoupled weighting),
    `mochi` (v2: synthetic hard negatives from the queue), `imix_alpha` (i-Mix on view 0; queries and keys of
    that view are mixed); `objective.chunk_size`; `model.ssl_head` (projector sizes; the v3 predictor is
    `[ssl_head[0], ssl_head[-1]]`).
    """

    def __init__(self, model: nn.Module, recipe: Recipe):
        cfg = recipe.objective.section("moco")
        super().__init__(model, recipe, last_bn=cfg.version == 3)
        self.version, chunk_size = cfg.version, recipe.objective.chunk_size
        out_dim, dims = self.head.out_dim, recipe.model.ssl_head
        weighting, self.imix_alpha = negative_weighting(cfg), cfg.imix_alpha
        if self.version == 3:
            self.predictor = ProjectionHead(out_dim, [dims[0], out_dim] if len(dims) > 1 else [out_dim])
            self.loss_fn = MoCoV3Loss(cfg.temperature, chunk_size=chunk_size, weighting=weighting)
        else:
            mochi = (cfg.mochi.top_k, cfg.mochi.s, cfg.mochi.s_prime) if cfg.mochi.active else None
            self.loss_fn = MoCoLoss(cfg.temperature, cfg.queue_size, out_dim, chunk_size=chunk_size,
                                    weighting=weighting, mochi=mochi)
        self.key_visual = momentum_copy(model.visual)
        self.key_head = momentum_copy(self.head)
        self.base_momentum, self.momentum_cosine = cfg.momentum, cfg.momentum_cosine
        self.momentum = cfg.momentum
        sync_batchnorm_(self)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        out = self.project(images)
        return self.predictor(out) if self.version == 3 else out

    @torch.no_grad()
    def key(self, images: torch.Tensor) -> torch.Tensor:
        return self.key_head(self.key_visual(images))

    def encode(self, batch: dict) -> Features:
        views, features = self.mix_first_view(batch["views"])
        return {**features, "q0": self.query(views[0]), "q1": self.query(views[1]),
                "k0": self.key(views[0]), "k1": self.key(views[1])}

    def losses(self, features: Features) -> Dict[str, torch.Tensor]:
        q0, q1, k0, k1 = (features[name] for name in ("q0", "q1", "k0", "k1"))
        mix = mix_targets(features)  # i-Mix: view 0 (q0 and k0) is mixed
        if self.version == 3:
            loss = self.loss_fn(q0, q1, k0, k1, mix=mix)
        else:  # both directions see the same queue; only the second call enqueues (k0, once per step)
            back = None if mix is None else (inverse_permutation(mix[0]), mix[1])
            loss = 0.5 * (self.loss_fn(q0, k1, update=False, mix=mix) + self.loss_fn(q1, k0, mix=back))
        return {"loss": loss, f"loss/moco_v{self.version}": loss}

    def before_step(self, step: int, total_steps: int) -> None:
        """Move the key encoder towards the query encoder before this step's keys are computed."""
        pairs = ((self.key_visual, self.model.visual), (self.key_head, self.head))
        self.momentum = ema_step(pairs, self.base_momentum, step, total_steps, self.momentum_cosine)

    def log_values(self) -> Dict[str, float]:
        return {"momentum": float(self.momentum)}

    def key_features(self) -> tuple:
        return ("q0", "q1", "k0", "k1")
