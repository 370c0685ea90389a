"""CLIP's symmetric contrastive loss with a learnable temperature, on the mmcl InfoNCE core.

L = 1/2 [CE(s I T^T, y) + CE(s T I^T, y)], features L2-normalised, s = exp(t). The parameter t lives in the
model (open_clip's ``logit_scale``), starts at ln(1/0.07) and is clamped so that s <= 100 after every
optimizer step (:func:`clamp_logit_scale`). The loss receives s, already exponentiated, like open_clip's.
"""

import math
from typing import Optional

import torch
from torch import nn

from mmcl.distributed import all_gather_no_grad, all_gather_with_grad, get_rank, get_world_size
from mmcl.losses.infonce import diagonal_labels, info_nce, inverse_permutation, l2_normalize
from mmcl.losses.weighting import NegativeWeighting

INIT_LOGIT_SCALE = math.log(1 / 0.07)
"""ln(1/0.07): the initial value of the learnable logit-scale parameter t (CLIP)."""

MAX_LOGIT_SCALE = 100.0
"""Largest allowed scale exp(t)."""


def init_logit_scale(temperature: float = 0.07) -> float:
    """Initial value of the parameter t for a starting temperature (default 0.07 -> ln(1/0.07))."""
    return math.log(1.0 / temperature)


@torch.no_grad()
def clamp_logit_scale(param: torch.Tensor, max_scale: float = MAX_LOGIT_SCALE) -> None:
    """Clamp the parameter t in place to [0, ln(max_scale)] (scale in [1, max_scale]); call after each step."""
    param.clamp_(0.0, math.log(max_scale))


def gather_features(image_features, text_features, local_loss: bool, gather_with_grad: bool):
    """All ranks' features, as open_clip's gather_features does it.

    With ``gather_with_grad`` the gather carries autograd. Without it the gathered copies are constants; for
    the global loss this rank's slice is put back as the live tensor so its own features still get gradients.
    """
    if gather_with_grad:
        return all_gather_with_grad(image_features), all_gather_with_grad(text_features)
    all_image, all_text = all_gather_no_grad(image_features), all_gather_no_grad(text_features)
    if not local_loss:
        rows, start = image_features.shape[0], get_rank() * image_features.shape[0]
        all_image = torch.cat([all_image[:start], image_features, all_image[start + rows:]])
        all_text = torch.cat([all_text[:start], text_features, all_text[start + rows:]])
    return all_image, all_text


def pair_targets(rows: int, offset: int, classes=None, mix=None, inverse: bool = False, gathered: bool = False,
                 device=None) -> dict:
    """info_nce target options for ``rows`` query rows whose own pairs are the columns from ``offset`` on.

    ``classes`` (rows,): same-class columns are positives too (a mask against the gathered classes).
    ``mix = (partner, lam)``: query i's second target is pair partner[i] with weight 1 - lam[i] (i-Mix);
    ``inverse`` gives the reverse direction (the rows are the unmixed side: texts against mixed images).
    ``gathered``: the rows are the whole global batch (the symmetric loss), so classes and mix are gathered
    and the labels are the diagonal.
    """
    if classes is not None:
        all_classes = all_gather_no_grad(classes)
        return {"pos_mask": (all_classes if gathered else classes)[:, None] == all_classes[None, :]}
    out = {} if gathered else {"labels": diagonal_labels(rows, offset, device=device)}
    if mix is not None:
        partner, lam = mix
        partner = (inverse_permutation(partner) if inverse else partner) + offset
        out.update(mix_labels=all_gather_no_grad(partner) if gathered else partner,
                   mix_weight=all_gather_no_grad(lam) if gathered else lam)
    return out


class ClipLoss(nn.Module):
    """Symmetric InfoNCE between image and text features (CLIP).

    Args:
        local_loss: score only this rank's rows against all gathered columns (default False: every rank
            computes the full global matrix). Cheaper for many ranks; same loss and averaged gradients.
        gather_with_grad: gather features with autograd (default True). False follows open_clip: the
            gathered features are constants, so averaged gradients are 1/world_size of the global ones
            (local_loss=False) or lose the key-side term (local_loss=True).
        chunk_size: None (default) for dense logits; an int for the memory-bounded block-wise path that
            gives the same loss and gradients with peak memory ~ batch x chunk_size.
        weighting: hard-negative weighting of both directions (:class:`mmcl.losses.NegativeWeighting`).

    Forward keywords: ``classes`` (b,) long: pairs of the same class are positives too, in both directions
    (SupCon's label positives, gathered across processes); ``mix = (partner, lam)``: the images are i-Mix
    mixtures ``lam * x_i + (1 - lam) * x_partner[i]`` (partner a permutation of this batch's rows, lam constant
    on its cycles), so image i's target text is i with weight lam and partner[i] with 1 - lam, and the
    reverse for the texts.

    Distributed convention: the mean of the per-rank losses is the loss of one process on the global batch,
    and averaging the parameter gradients over ranks gives the single-process gradients.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = True,
                 chunk_size: Optional[int] = None, weighting: Optional[NegativeWeighting] = None):
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.chunk_size = chunk_size
        self.weighting = weighting

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, output_dict: bool = False, *, classes=None, mix=None):
        image_features, text_features = l2_normalize(image_features), l2_normalize(text_features)
        if get_world_size() > 1 and self.local_loss:
            loss = self._local_loss(image_features, text_features, logit_scale, classes, mix)
        else:
            if get_world_size() > 1:
                image_features, text_features = gather_features(image_features, text_features, False,
                                                                self.gather_with_grad)
            rows = image_features.shape[0] // get_world_size()
            targets = pair_targets(rows, get_rank() * rows, classes, mix, gathered=True)
            loss = info_nce(image_features, text_features, logit_scale, symmetric=True,
                            chunk_size=self.chunk_size, weighting=self.weighting, **targets)
        return {"contrastive_loss": loss} if output_dict else loss

    def _local_loss(self, image_features, text_features, logit_scale, classes, mix):
        """This rank's image rows vs all texts and this rank's text rows vs all images."""
        all_image, all_text = gather_features(image_features, text_features, True, self.gather_with_grad)
        rows = image_features.shape[0]
        offset = get_rank() * rows
        options = {"chunk_size": self.chunk_size, "weighting": self.weighting}
        device = image_features.device
        per_image = info_nce(image_features, all_text, logit_scale, **options,
                             **pair_targets(rows, offset, classes, mix, device=device))
        per_text = info_nce(text_features, all_image, logit_scale, **options,
                            **pair_targets(rows, offset, classes, mix, inverse=True, device=device))
        return 0.5 * (per_image + per_text)
