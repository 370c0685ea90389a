"""Margin and ranking losses on the same normalised features and gathers as the InfoNCE losses.

- :class:`TripletLoss`: two views of each image; anchor = a view, positive = the other view of its image,
  negative = mined among the other views of the global batch ("semihard", "hardest" or "all"); the loss is
  ``torch.nn.functional.triplet_margin_loss`` on those triplets (Euclidean distance, margin).
- :class:`PairwiseMarginLoss`: the contrastive (pairwise) loss of Hadsell, Chopra & LeCun 2006 on two views:
  ``1/2 d^2`` for positive pairs, ``1/2 max(0, margin - d)^2`` for negative pairs, each averaged per anchor.
- :class:`VSELoss`: VSE++ (Faghri et al. 2018) image-text hinge ranking: for each pair, the violations
  ``[margin - s(i, t) + s(i, t')]_+`` over the other texts t' and ``[margin - s(i, t) + s(i', t)]_+`` over the
  other images i' of the global batch, summed (VSE0) or the largest of each (max violation, VSE++).

All take unnormalised features and L2-normalise them (so d^2 = 2 - 2 cos). Each rank scores its own anchors
against candidates gathered with autograd and the loss is the mean over anchors, so the mean of the per-rank
losses is the loss of one process on the global batch (the paper's VSE++ sums over the batch; mmcl divides
by the batch size so that learning rates do not depend on it).
"""

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.distributed import all_gather_no_grad, all_gather_with_grad, get_rank
from mmcl.losses.infonce import diagonal_labels, l2_normalize

MINING = ("semihard", "hardest", "all")


def two_view_candidates(out0: torch.Tensor, out1: torch.Tensor):
    """Anchors [out0; out1] (this rank), candidates [all out0; all out1] (gathered with autograd), each
    anchor's positive column (its other view) and its own column."""
    out0, out1 = l2_normalize(out0), l2_normalize(out1)
    all0, all1 = all_gather_with_grad(out0), all_gather_with_grad(out1)
    rows, total = out0.shape[0], all0.shape[0]
    own = diagonal_labels(rows, get_rank() * rows, device=out0.device)
    return (torch.cat([out0, out1]), torch.cat([all0, all1]), torch.cat([own + total, own]),
            torch.cat([own, own + total]))


def negative_mask(shape, positive, own, device, labels=None) -> torch.Tensor:
    """True where a candidate is a negative of the anchor: neither itself nor its positive, and with class
    labels (N,) of this rank's images, not of the anchor's class."""
    mask = torch.ones(shape, dtype=torch.bool, device=device)
    rows = torch.arange(shape[0], device=device)
    mask[rows, positive] = False
    mask[rows, own] = False
    if labels is not None:
        mask &= ~same_class(labels)
    return mask


def same_class(labels: torch.Tensor) -> torch.Tensor:
    """(2N, 2B) True where anchor and candidate are views of the same class (labels gathered without grad)."""
    every = all_gather_no_grad(labels)
    return torch.cat([labels, labels])[:, None] == torch.cat([every, every])[None, :]


@torch.no_grad()
def mine_negatives(anchors, candidates, positive, negatives, mining: str):
    """(anchor index, negative index) pairs: every negative ("all"), the closest ("hardest"), or the closest
    one farther than the positive, else the farthest (FaceNet's "semihard", TensorFlow Addons' fallback)."""
    rows = torch.arange(anchors.shape[0], device=anchors.device)
    if mining == "all":
        return negatives.nonzero(as_tuple=True)
    dist = torch.cdist(anchors, candidates)
    if mining == "hardest":
        chosen = dist.masked_fill(~negatives, float("inf")).argmin(1)
    else:
        outside = negatives & (dist > dist[rows, positive][:, None])
        closest_outside = dist.masked_fill(~outside, float("inf")).argmin(1)
        farthest = dist.masked_fill(~negatives, float("-inf")).argmax(1)
        chosen = torch.where(outside.any(1), closest_outside, farthest)
    has = negatives.any(1)  # with labels, a batch of one class leaves an anchor no negative: it sits out
    return rows[has], chosen[has]


class TripletLoss(nn.Module):
    """Triplet margin loss over two views with negatives mined in the global batch.

    Args:
        margin: hinge margin on Euclidean distances of unit vectors (in [0, 2]; default 0.2).
        mining: "semihard" (default), "hardest" (batch-hard) or "all" (every negative, averaged).

    Forward: ``loss(out0, out1, labels=None)``, the two views' projections (N, D); with class labels (N,),
    negatives are mined among views of other classes only (FaceNet's identities), the positive stays the
    anchor's other view.
    """

    def __init__(self, margin: float = 0.2, mining: Literal["semihard", "hardest", "all"] = "semihard"):
        super().__init__()
        if mining not in MINING:
            raise ValueError(f"mining must be one of {', '.join(MINING)}, got {mining!r}")
        self.margin, self.mining = margin, mining

    def forward(self, out0: torch.Tensor, out1: torch.Tensor, labels=None) -> torch.Tensor:
        anchors, candidates, positive, own = two_view_candidates(out0, out1)
        negatives = negative_mask((anchors.shape[0], candidates.shape[0]), positive, own, anchors.device, labels)
        rows, negative = mine_negatives(anchors.detach(), candidates.detach(), positive, negatives, self.mining)
        if rows.numel() == 0:  # no anchor has a negative: nothing to rank, a zero that keeps the graph
            return anchors.sum() * 0.0
        return F.triplet_margin_loss(anchors[rows], candidates[positive[rows]], candidates[negative],
                                     margin=self.margin)


class PairwiseMarginLoss(nn.Module):
    """Hadsell et al.'s contrastive loss over two views: pull positives together, push negatives past a margin.

    Args:
        margin: distance beyond which a negative costs nothing (unit vectors: in [0, 2]; default 1.0).

    Forward: ``loss(out0, out1, labels=None)``; per anchor ``mean_p 1/2 d(a, p)^2 + mean_n 1/2 max(0, margin -
    d(a, n))^2``. Without labels the one positive is the anchor's other view; with class labels (N,) (the
    paper's similar / dissimilar pairs) every other view of the same class is a positive and the rest negatives.
    """

    def __init__(self, margin: float = 1.0):
        super().__init__()
        self.margin = margin

    def forward(self, out0: torch.Tensor, out1: torch.Tensor, labels=None) -> torch.Tensor:
        anchors, candidates, positive, own = two_view_candidates(out0, out1)
        squared = (2.0 - 2.0 * anchors @ candidates.T).clamp_min(0.0)
        rows = torch.arange(anchors.shape[0], device=anchors.device)
        negatives = negative_mask(squared.shape, positive, own, anchors.device, labels)
        positives = torch.zeros_like(negatives)
        positives[rows, positive] = True
        if labels is not None:
            positives |= same_class(labels)
            positives[rows, own] = False
        pull = (squared * positives).sum(1) / positives.sum(1)
        push = (self.margin - squared.clamp_min(1e-12).sqrt()).clamp_min(0.0).pow(2)
        push = (push * negatives).sum(1) / negatives.sum(1).clamp_min(1)
        return (0.5 * pull + 0.5 * push).mean()


class VSELoss(nn.Module):
    """VSE++ hinge ranking between image and text features over the global batch.

    Args:
        margin: the ranking margin on cosine similarities (default 0.2, the paper's).
        violation: "max" (default: the hardest negative, VSE++) or "sum" (every violation, VSE0).

    Forward: ``loss(image_features, text_features)``; the i-th image and text are a pair.
    """

    def __init__(self, margin: float = 0.2, violation: Literal["max", "sum"] = "max"):
        super().__init__()
        if violation not in ("max", "sum"):
            raise ValueError(f"violation must be 'max' or 'sum', got {violation!r}")
        self.margin, self.violation = margin, violation

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        image, text = l2_normalize(image_features), l2_normalize(text_features)
        labels = diagonal_labels(image.shape[0], get_rank() * image.shape[0], device=image.device)
        positive = (image * text).sum(1)
        to_texts = self._violations(image @ all_gather_with_grad(text).T, positive, labels)
        to_images = self._violations(text @ all_gather_with_grad(image).T, positive, labels)
        return (to_texts + to_images).mean()

    def _violations(self, scores, positive, labels):
        rows = torch.arange(scores.shape[0], device=scores.device)
        cost = (self.margin - positive[:, None] + scores).clamp_min(0.0)
        cost = cost.index_put((rows, labels), torch.zeros((), device=cost.device, dtype=cost.dtype))
        return cost.max(1).values if self.violation == "max" else cost.sum(1)
