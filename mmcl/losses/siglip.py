"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023), open_clip's definition.

Every image-text pair is an independent binary problem: label +1 on the diagonal, -1 elsewhere,
loss = -sum log sigmoid(label * (s * i.t + b)) / local batch. Scale s = exp(t) and bias b are learnable and
start at t = ln 10, b = -10. Across ranks the text features travel around (a ring of neighbour exchanges, or
one all_gather); each rank adds the negative-only blocks of the other ranks' texts against its own images.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.distributed import all_gather_with_grad, get_rank, get_world_size, ring_exchange_with_grad
from mmcl.losses.infonce import l2_normalize

INIT_LOGIT_SCALE = math.log(10.0)
"""ln 10: initial value of SigLIP's logit-scale parameter t (scale exp(t) = 10)."""

INIT_LOGIT_BIAS = -10.0
"""Initial value of SigLIP's learnable logit bias."""


def sigmoid_block_loss(image_features, text_features, logit_scale, logit_bias, with_positives: bool):
    """-sum log sigmoid(label * logit) / len(image_features) for one image x text block.

    ``with_positives`` marks the diagonal as positive pairs (this rank's own texts); other ranks' texts are
    all negatives.
    """
    logits = logit_scale * image_features @ text_features.T + logit_bias
    labels = -torch.ones_like(logits)
    if with_positives:
        labels = labels + 2 * torch.eye(logits.shape[0], logits.shape[1], device=logits.device,
                                        dtype=logits.dtype)
    return -F.logsigmoid(labels * logits).sum() / image_features.shape[0]


class SigLipLoss(nn.Module):
    """Sigmoid loss for language-image pretraining.

    Args:
        dist_impl: how text features reach the other ranks: "ring" (default; world_size - 1 neighbour
            exchanges, memory of one extra block) or "gather" (one all_gather with autograd).

    Distributed convention: the mean of the per-rank losses equals the single-process loss on the global
    batch, and averaged parameter gradients equal the single-process ones.
    """

    def __init__(self, dist_impl: str = "ring"):
        super().__init__()
        if dist_impl not in ("ring", "gather"):
            raise ValueError(f"dist_impl must be 'ring' or 'gather', got {dist_impl!r}")
        self.dist_impl = dist_impl

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, logit_bias: torch.Tensor, output_dict: bool = False):
        image_features, text_features = l2_normalize(image_features), l2_normalize(text_features)
        loss = sigmoid_block_loss(image_features, text_features, logit_scale, logit_bias, True)
        for other_texts in self._other_ranks_texts(text_features):
            loss = loss + sigmoid_block_loss(image_features, other_texts, logit_scale, logit_bias, False)
        return {"contrastive_loss": loss} if output_dict else loss

    def _other_ranks_texts(self, text_features):
        """Yield the text features of every other rank, with autograd."""
        world = get_world_size()
        if world == 1:
            return
        if self.dist_impl == "gather":
            blocks = all_gather_with_grad(text_features).chunk(world)
            yield from (block for rank, block in enumerate(blocks) if rank != get_rank())
            return
        texts = text_features
        for _ in range(world - 1):
            texts = ring_exchange_with_grad(texts)
            yield texts
