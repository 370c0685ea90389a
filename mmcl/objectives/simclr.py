"""SimCLR (Chen et al. 2020): two augmented views of each image, a projection head, NT-Xent.

The image tower is `model.visual` of the open_clip model, so a SimCLR run exports and evaluates like a CLIP
run (kNN / linear probe on `model.encode_image`). The head sits on `encode_image`'s output (embed_dim) and is
dropped after training, as in the paper. Negatives are the other views of the global batch, gathered across
processes with autograd (`NTXentLoss(gather_distributed=True)`).

This module also holds what every image-only objective shares (`ViewObjective`): the frozen text tower, the
head, and SyncBatchNorm on multi-GPU runs.
"""
from __future__ import annotations

import itertools
from typing import Dict

import torch
from torch import nn

from mmcl.config import Recipe
from mmcl.distributed import is_distributed
from mmcl.losses import NTXentLoss
from mmcl.models import ProjectionHead
from mmcl.objectives.base import Features, Objective
from mmcl.objectives.clip import negative_weighting
from mmcl.objectives.imix import mix_images, mix_targets


def freeze_text_tower(model: nn.Module) -> None:
    """Stop training everything outside `model.visual` (text tower, logit scale): the optimizer skips them."""
    for name, param in model.named_parameters():
        if not name.startswith("visual."):
            param.requires_grad_(False)


def image_embed_dim(model: nn.Module) -> int:
    """Width of `model.encode_image`'s output (open_clip's embed_dim)."""
    dim = getattr(model.visual, "output_dim", None)
    if dim is not None:
        return int(dim)
    size = model.visual.image_size  # timm towers keep no output_dim: measure one forward in eval mode
    size = (size, size) if isinstance(size, int) else tuple(size)
    was_training = model.visual.training
    model.visual.eval()
    with torch.no_grad():
        dim = model.encode_image(torch.zeros(1, 3, *size)).shape[-1]
    model.visual.train(was_training)
    return int(dim)


def sync_batchnorm_(module: nn.Module) -> None:
    """On several GPU processes, convert BatchNorm layers to SyncBatchNorm, in place.

    Per-process batch statistics would let the contrastive task cheat through BN (what MoCo's shuffle-BN
    works around) and make a run depend on how the global batch is split; SyncBN normalises over the global
    batch instead (MoCo v3's choice). torch has no SyncBN on CPU, so CPU processes keep their own statistics.
    """
    if not (is_distributed() and torch.cuda.is_available()):
        return
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        from timm.layers import convert_sync_batchnorm  # also converts timm's BatchNormAct layers

        convert_sync_batchnorm(module)  # the root is no BN layer, so its children are swapped in place


class ViewObjective(Objective):
    """Base of the image-only objectives: views in, `head(model.encode_image(view))` out, text tower frozen.

    Args:
        model: the open_clip model; only `model.visual` is trained.
        recipe: `model.ssl_head` gives the head's hidden and output sizes (default [512, 128]).
        last_bn: end the head with an affine-free BatchNorm (MoCo v3's projector).
    """

    uses_text = False
    uses_image = False
    uses_views = True

    def __init__(self, model: nn.Module, recipe: Recipe, last_bn: bool = False):
        super().__init__(model)
        freeze_text_tower(model)
        self.head = ProjectionHead(image_embed_dim(model), recipe.model.ssl_head, last_bn=last_bn)

    imix_alpha = 0.0  # i-Mix's Beta(alpha, alpha) on view 0 (0: off), set by the objectives that offer it

    def project(self, images: torch.Tensor) -> torch.Tensor:
        """One forward of the image tower and the head (features are not normalised: the losses do it)."""
        return self.head(self.model.encode_image(images))

    def mix_first_view(self, views):
        """(views, features): with i-Mix on and in training, view 0 mixed and the draw recorded."""
        if not (self.imix_alpha and self.training):
            return views, {}
        mixed, features = mix_images(views[0], self.imix_alpha)
        return [mixed] + list(views[1:]), features


class SimCLRObjective(ViewObjective):
    """NT-Xent between the projections of every pair of views (SimCLR uses two), averaged over pairs.

    Args:
        recipe: `objective.simclr.temperature` (default 0.1; SimCLR uses 0.1-0.5), `.hard_negatives` (HCL / DCL /
            decoupled weighting), `.imix_alpha` (i-Mix on view 0), `objective.chunk_size`.
        memory_bank_size: 0 (default, in-batch negatives as in SimCLR) or a number of past projections kept
            as negatives (lightly's NTXentLoss memory bank). Python API only; recipes keep SimCLR's setting.
    """

    def __init__(self, model: nn.Module, recipe: Recipe, memory_bank_size: int = 0):
        super().__init__(model, recipe)
        opts = recipe.objective.section("simclr")
        bank = (memory_bank_size, self.head.out_dim) if memory_bank_size else 0
        self.loss_fn = NTXentLoss(opts.temperature, bank, gather_distributed=True,
                                  chunk_size=recipe.objective.chunk_size, weighting=negative_weighting(opts))
        self.num_views, self.imix_alpha = recipe.data.num_views, opts.imix_alpha
        sync_batchnorm_(self)

    def encode(self, batch: dict) -> Features:
        views, features = self.mix_first_view(batch["views"])
        return {**features, **{f"z{i}": self.project(view) for i, view in enumerate(views)}}

    def losses(self, features: Features) -> Dict[str, torch.Tensor]:
        pairs = list(itertools.combinations(range(self.num_views), 2))
        mix = mix_targets(features)  # i-Mix: view 0 is mixed, so pairs with view 0 have mixed targets
        loss = sum(self.loss_fn(features[f"z{i}"], features[f"z{j}"], mix=mix if i == 0 else None)
                   for i, j in pairs) / len(pairs)
        return {"loss": loss, "loss/simclr": loss}

    def key_features(self) -> tuple:
        return tuple(f"z{i}" for i in range(self.num_views))
