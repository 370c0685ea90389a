"""SwAV (Caron et al. 2020): swapped prediction of Sinkhorn-Knopp codes over learnable prototypes.

Each view (2 large crops, then `data.small_views` small ones) goes through the tower and the projection
head and is L2-normalised; its scores are cosines with K prototypes (`mmcl.models.Prototypes`, put back on
the unit sphere before every step). The codes of each large crop come from Sinkhorn-Knopp over the global
batch (sums all-reduced across processes); every other crop predicts them (`SwaVLoss`). The prototypes get
no gradient for the first `freeze_prototypes_steps` steps (SwAV's first epoch), so AdamW leaves them alone.

Optional queue (`objective.swav.queue_size`, for small batches): the normalised features of each large crop
of the last steps, gathered from every process in rank order (identical everywhere), join the Sinkhorn
problem once the queue is full; features are queued from step `queue_start`. Each process adds every
world-th row of the queue to its share of the problem, so the rows of all processes together are the
global batch plus the queue once, as in one process. Prototypes and queue are state: checkpoints carry them.

Small views of another size than the tower's run through `mmcl.models.multicrop.encode_any_size` (timm
towers take any size; an open_clip ViT gets its positional embeddings interpolated).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from mmcl.config import Recipe
from mmcl.distributed import all_gather_no_grad, get_rank, get_world_size
from mmcl.losses.infonce import l2_normalize
from mmcl.losses.queue import enqueue_
from mmcl.losses.swav import SwaVLoss
from mmcl.models.heads import Prototypes
from mmcl.models.multicrop import check_view_size, encode_any_size
from mmcl.objectives.base import Features
from mmcl.objectives.collapse import WatchedViewObjective
from mmcl.objectives.simclr import sync_batchnorm_


class SwAVObjective(WatchedViewObjective):
    """SwAV over `data.num_views` large and `data.small_views` small views; options in `objective.swav`."""

    def __init__(self, model: nn.Module, recipe: Recipe):
        super().__init__(model, recipe)
        cfg, d = recipe.objective.section("swav"), recipe.data
        if d.small_views:
            check_view_size(model.visual, d.small_view_size or image_side(model.visual) // 2)
        self.prototypes = Prototypes(self.head.out_dim, cfg.prototypes)
        self.loss_fn = SwaVLoss(cfg.temperature, cfg.sinkhorn_iterations, cfg.sinkhorn_epsilon,
                                sinkhorn_gather_distributed=True)
        self.large, self.views = d.num_views, d.num_views + d.small_views
        self.freeze_steps, self.queue_start, self.step = cfg.freeze_prototypes_steps, cfg.queue_start, 0
        self.frozen = self.freeze_steps > 0
        self.queue: Optional[torch.Tensor]
        self.register_buffer("queue", torch.zeros(self.large, cfg.queue_size, self.head.out_dim) if cfg.queue_size
                             else None)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long) if cfg.queue_size else None)
        self.register_buffer("queue_count", torch.zeros(1, dtype=torch.long) if cfg.queue_size else None)
        sync_batchnorm_(self)

    def project(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(encode_any_size(self.model.visual, images))

    def encode(self, batch: dict) -> Features:
        return {f"z{i}": l2_normalize(self.project(view)) for i, view in enumerate(batch["views"][:self.views])}

    def losses(self, features: Features) -> Dict[str, torch.Tensor]:
        z = [features[f"z{i}"] for i in range(self.views)]
        self.watch(z[0])
        scores = [self.prototypes(x, frozen=self.frozen) for x in z]
        loss = self.loss_fn(scores[:self.large], scores[self.large:], self.queue_scores())
        if self.training and self.queue is not None and self.step >= self.queue_start:
            self.enqueue(z[:self.large])
        return {"loss": loss, "loss/swav": loss}

    @torch.no_grad()
    def queue_scores(self) -> Optional[List[torch.Tensor]]:
        """This process's share of the queue's scores per large crop, once the queue is full."""
        if self.queue is None or int(self.queue_count) < self.queue.shape[1]:
            return None
        share = self.queue[:, get_rank()::get_world_size()]
        return [self.prototypes(share[i], frozen=True) for i in range(self.large)]

    @torch.no_grad()
    def enqueue(self, large: List[torch.Tensor]) -> None:
        for i, features in enumerate(large):  # every crop's features go in at the same rows
            ptr = self.queue_ptr.clone()
            enqueue_(self.queue[i], ptr, all_gather_no_grad(features), gather=False)
        rows = self.queue.shape[1]
        self.queue_count.fill_(min(rows, int(self.queue_count) + large[0].shape[0] * get_world_size()))
        self.queue_ptr.copy_(ptr)

    def before_step(self, step: int, total_steps: int) -> None:
        self.prototypes.normalize_()
        self.step, self.frozen = step, step < self.freeze_steps

    def key_features(self) -> tuple:
        return tuple(f"z{i}" for i in range(self.views))


def image_side(visual: nn.Module) -> int:
    size = getattr(visual, "image_size", 224)
    return size if isinstance(size, int) else size[0]
