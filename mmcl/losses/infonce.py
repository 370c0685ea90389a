"""The InfoNCE core that every mmcl softmax objective (CLIP, NT-Xent, MoCo) is written in.

Row ``i`` of the logit matrix is ``scale * query[i] @ keys.T``; its cross-entropy target is one of
  - ``labels[i]``: the column of the positive key (CLIP's diagonal, shifted by the rank offset for local rows);
  - ``pos_keys[i]``: a paired positive that is not among ``keys`` and becomes one extra column (MoCo's key
    against a queue of negatives);
  - ``pos_mask[i]``: several positive columns; the target is the mean of their logits (SupCon);
  - ``labels[i]`` and ``mix_labels[i]`` with weights lambda and 1 - lambda: i-Mix's mixed virtual labels.
``exclude[i]`` removes one column from row ``i`` (NT-Xent drops each view's similarity with itself).
``symmetric=True`` averages the row loss with the column loss of the same square matrix (CLIP's
image->text and text->image terms from one matrix). The loss is the mean over rows.

``chunk_size`` switches to the memory-bounded path in :mod:`mmcl.losses.chunked`: same values and gradients,
never more than ``chunk_size x len(keys)`` logits at once.

Hard negatives change the softmax denominator of a row, here and nowhere else: ``weighting`` (HCL's
importance weights, DCL's debiasing, the decoupled loss) and ``row_negatives`` (MoCHi's synthetic
negatives, one set per row) go through :mod:`mmcl.losses.weighting`, dense or strip-wise like the rest.
"""

from typing import Optional, Union

import torch
import torch.nn.functional as F

from mmcl.losses.chunked import Targets, chunked_info_nce
from mmcl.losses.weighting import NegativeWeighting, weighted_info_nce


def l2_normalize(features: torch.Tensor) -> torch.Tensor:
    """Unit-length rows; idempotent on features that are already normalised."""
    return F.normalize(features, dim=-1)


def diagonal_labels(rows: int, offset: int = 0, device=None) -> torch.Tensor:
    """Labels ``offset, offset + 1, ...``: this rank's rows against keys gathered from all ranks."""
    return torch.arange(offset, offset + rows, device=device, dtype=torch.long)


def inverse_permutation(partner: torch.Tensor) -> torch.Tensor:
    """``inverse[partner[i]] = i``: who mixed row i in, for i-Mix's reverse direction."""
    return torch.empty_like(partner).scatter_(0, partner, torch.arange(len(partner), device=partner.device))


def _check_targets(query, keys, labels, pos_keys, pos_mask, exclude, symmetric):
    if sum(x is not None for x in (labels, pos_keys, pos_mask)) > 1:
        raise ValueError("give at most one of labels, pos_keys and pos_mask")
    if symmetric and (pos_keys is not None or exclude is not None):
        raise ValueError("symmetric=True scores the columns of the same matrix; drop pos_keys/exclude")
    if symmetric and query.shape[0] != keys.shape[0]:
        raise ValueError(f"symmetric=True needs a square matrix, got {query.shape[0]} x {keys.shape[0]}")
    if labels is None and pos_keys is None and pos_mask is None and query.shape[0] > keys.shape[0]:
        raise ValueError(f"default diagonal labels need len(keys) >= len(query), "
                         f"got {keys.shape[0]} < {query.shape[0]}")
    if pos_mask is not None and pos_mask.shape != (query.shape[0], keys.shape[0]):
        raise ValueError(f"pos_mask must be {query.shape[0]} x {keys.shape[0]}, got {tuple(pos_mask.shape)}")


def _check_options(query, pos_mask, mix_labels, symmetric, row_negatives, weighting):
    """The i-Mix, per-row negative and hard-negative options, and the target kinds they combine with."""
    if mix_labels is not None and pos_mask is not None:
        raise ValueError("mix_labels mixes two label columns; it does not combine with pos_mask")
    if mix_labels is not None and symmetric and not torch.equal(
            mix_labels.sort().values, torch.arange(len(mix_labels), device=mix_labels.device)):
        raise ValueError("symmetric=True with mix_labels needs mix_labels to be a permutation")
    special = row_negatives is not None or (weighting is not None and weighting.active)
    if special and (pos_mask is not None or mix_labels is not None):
        raise ValueError("hard-negative weighting and row_negatives need one positive per row "
                         "(labels or pos_keys), not pos_mask or mix_labels")
    if row_negatives is not None and (symmetric or row_negatives.shape[0] != query.shape[0]):
        raise ValueError(f"row_negatives must be (N, E, D) with N = {query.shape[0]} rows, and not symmetric")


def _dense_info_nce(query, keys, scale, targets: Targets, pos_keys, exclude, symmetric):
    """Plain autograd version; materialises the full logit matrix."""
    logits = scale * query @ keys.T
    if exclude is not None:
        rows = torch.arange(query.shape[0], device=query.device)
        logits = logits.index_put((rows, exclude), torch.tensor(float("-inf"), device=logits.device))
    labels = targets.labels
    if pos_keys is not None:
        positive = scale * (query * pos_keys).sum(1, keepdim=True)
        logits = torch.cat([positive, logits], dim=1)
        labels = torch.zeros(query.shape[0], device=query.device, dtype=torch.long)
    if targets.pos_mask is None and targets.mix_labels is None:
        if symmetric:
            return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
        return F.cross_entropy(logits, labels)
    if targets.pos_mask is not None:
        mask = targets.pos_mask
        masked = logits.masked_fill(~mask, 0.0)
        row_target, col_target = masked.sum(1) / mask.sum(1), masked.sum(0) / mask.sum(0)
    else:  # i-Mix: lambda on the labels' column, 1 - lambda on the mixed-in column
        lam = targets.mix_weight.to(logits.dtype)
        picked = logits.gather(1, torch.stack([labels, targets.mix_labels], 1))
        row_target = col_target = lam * picked[:, 0] + (1 - lam) * picked[:, 1]
    loss = (torch.logsumexp(logits, dim=1) - row_target).mean()
    if symmetric:  # mixed labels are permutations, so the column targets sum to the row targets
        loss = 0.5 * (loss + (torch.logsumexp(logits, dim=0) - col_target).mean())
    return loss


def info_nce(query: torch.Tensor, keys: torch.Tensor, scale: Union[torch.Tensor, float],
             labels: Optional[torch.Tensor] = None, *, pos_keys: Optional[torch.Tensor] = None,
             pos_mask: Optional[torch.Tensor] = None, exclude: Optional[torch.Tensor] = None,
             symmetric: bool = False, chunk_size: Optional[int] = None,
             mix_labels: Optional[torch.Tensor] = None, mix_weight=None,
             row_negatives: Optional[torch.Tensor] = None,
             weighting: Optional[NegativeWeighting] = None) -> torch.Tensor:
    """Mean InfoNCE (softmax cross-entropy) of ``query`` rows against ``keys``.

    Args:
        query: (N, D) features; callers normalise them (the core is plain algebra).
        keys: (M, D) features.
        scale: multiplier of the dot products (CLIP's exp(t), or 1 / temperature); tensor or float.
        labels: (N,) long, positive column per row. Default (with no pos_keys/pos_mask): ``arange(N)``.
        pos_keys: (N, D) paired positives prepended as an extra column (then ``keys`` are negatives only).
        pos_mask: (N, M) bool, several positives per row (SupCon); with ``symmetric`` each column's target
            is the mean over its own positive rows.
        exclude: (N,) long, one column per row to leave out of the softmax (default None).
        symmetric: also average in the column-wise loss of the same square matrix (default False).
        chunk_size: None (default) for the dense path, else rows per strip of the memory-bounded path.
        mix_labels, mix_weight: i-Mix's mixed virtual labels: the target of row i is
            ``mix_weight[i] * logit[i, labels[i]] + (1 - mix_weight[i]) * logit[i, mix_labels[i]]``
            (mix_weight a float or an (N,) tensor; with ``symmetric``, mix_labels must be a permutation).
        row_negatives: (N, E, D) extra negatives of each row alone (MoCHi's synthetic ones); constants.
        weighting: :class:`NegativeWeighting` of the negatives (HCL's beta, DCL's tau_plus, decoupled);
            None or all zero is plain InfoNCE. Needs one positive per row.
    """
    _check_targets(query, keys, labels, pos_keys, pos_mask, exclude, symmetric)
    _check_options(query, pos_mask, mix_labels, symmetric, row_negatives, weighting)
    if labels is None and pos_keys is None and pos_mask is None:
        labels = diagonal_labels(query.shape[0], device=query.device)
    if chunk_size is not None and not torch.is_tensor(scale):
        scale = torch.tensor(float(scale), device=query.device, dtype=torch.float32)
    if row_negatives is not None or (weighting is not None and weighting.active):
        row_negatives = None if row_negatives is None else row_negatives.detach()
        return weighted_info_nce(query, keys, scale, labels, pos_keys, exclude, row_negatives, symmetric,
                                 chunk_size, weighting or NegativeWeighting())
    if mix_labels is not None and not torch.is_tensor(mix_weight):
        mix_weight = torch.full((query.shape[0],), float(mix_weight), device=query.device)
    targets = Targets(labels, mix_labels, mix_weight, pos_mask)
    if chunk_size is None:
        return _dense_info_nce(query, keys, scale, targets, pos_keys, exclude, symmetric)
    return chunked_info_nce(query, keys, scale, targets, pos_keys, exclude, symmetric, chunk_size)
