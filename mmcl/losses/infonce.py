"""The InfoNCE core that every mmcl softmax objective (CLIP, NT-Xent, MoCo) is written in.

Row ``i`` of the logit matrix is ``scale * query[i] @ keys.T``; its cross-entropy target is one of
  - ``labels[i]``: the column of the positive key (CLIP's diagonal, shifted by the rank offset for local rows);
  - ``pos_keys[i]``: a paired positive that is not among ``keys`` and becomes one extra column (MoCo's key
    against a queue of negatives);
  - ``pos_mask[i]``: several positive columns; the target is the mean of their logits.
``exclude[i]`` removes one column from row ``i`` (NT-Xent drops each view's similarity with itself).
``symmetric=True`` averages the row loss with the column loss of the same square matrix (CLIP's
image->text and text->image terms from one matrix). The loss is the mean over rows.

``chunk_size`` switches to the memory-bounded path in :mod:`mmcl.losses.chunked`: same values and gradients,
never more than ``chunk_size x len(keys)`` logits at once.
"""

from typing import Optional, Union

import torch
import torch.nn.functional as F

from mmcl.losses.chunked import chunked_info_nce


def l2_normalize(features: torch.Tensor) -> torch.Tensor:
    """Unit-length rows; idempotent on features that are already normalised."""
    return F.normalize(features, dim=-1)


def diagonal_labels(rows: int, offset: int = 0, device=None) -> torch.Tensor:
    """Labels ``offset, offset + 1, ...``: this rank's rows against keys gathered from all ranks."""
    return torch.arange(offset, offset + rows, device=device, dtype=torch.long)


def _check_targets(query, keys, labels, pos_keys, pos_mask, exclude, symmetric):
    if sum(x is not None for x in (labels, pos_keys, pos_mask)) > 1:
        raise ValueError("give at most one of labels, pos_keys and pos_mask")
    if symmetric and (pos_keys is not None or pos_mask is not None or exclude is not None):
        raise ValueError("symmetric=True uses the diagonal as positives; drop pos_keys/pos_mask/exclude")
    if symmetric and query.shape[0] != keys.shape[0]:
        raise ValueError(f"symmetric=True needs a square matrix, got {query.shape[0]} x {keys.shape[0]}")
    if labels is None and pos_keys is None and pos_mask is None and query.shape[0] > keys.shape[0]:
        raise ValueError(f"default diagonal labels need len(keys) >= len(query), "
                         f"got {keys.shape[0]} < {query.shape[0]}")
    if pos_mask is not None and pos_mask.shape != (query.shape[0], keys.shape[0]):
        raise ValueError(f"pos_mask must be {query.shape[0]} x {keys.shape[0]}, got {tuple(pos_mask.shape)}")


def _dense_info_nce(query, keys, scale, labels, pos_keys, pos_mask, exclude, symmetric):
    """Plain autograd version; materialises the full logit matrix."""
    logits = scale * query @ keys.T
    if exclude is not None:
        rows = torch.arange(query.shape[0], device=query.device)
        logits = logits.index_put((rows, exclude), torch.tensor(float("-inf"), device=logits.device))
    if symmetric:
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    if pos_keys is not None:
        positive = scale * (query * pos_keys).sum(1, keepdim=True)
        logits = torch.cat([positive, logits], dim=1)
        labels = torch.zeros(query.shape[0], device=query.device, dtype=torch.long)
    if pos_mask is not None:
        target = logits.masked_fill(~pos_mask, 0.0).sum(1) / pos_mask.sum(1)
        return (torch.logsumexp(logits, dim=1) - target).mean()
    return F.cross_entropy(logits, labels)


def info_nce(query: torch.Tensor, keys: torch.Tensor, scale: Union[torch.Tensor, float],
             labels: Optional[torch.Tensor] = None, *, pos_keys: Optional[torch.Tensor] = None,
             pos_mask: Optional[torch.Tensor] = None, exclude: Optional[torch.Tensor] = None,
             symmetric: bool = False, chunk_size: Optional[int] = None) -> torch.Tensor:
    """Mean InfoNCE (softmax cross-entropy) of ``query`` rows against ``keys``.

    Args:
        query: (N, D) features; callers normalise them (the core is plain algebra).
        keys: (M, D) features.
        scale: multiplier of the dot products (CLIP's exp(t), or 1 / temperature); tensor or float.
        labels: (N,) long, positive column per row. Default (with no pos_keys/pos_mask): ``arange(N)``.
        pos_keys: (N, D) paired positives prepended as an extra column (then ``keys`` are negatives only).
        pos_mask: (N, M) bool, several positives per row.
        exclude: (N,) long, one column per row to leave out of the softmax (default None).
        symmetric: also average in the column-wise loss of the same square matrix (default False).
        chunk_size: None (default) for the dense path, else rows per strip of the memory-bounded path.
    """
    _check_targets(query, keys, labels, pos_keys, pos_mask, exclude, symmetric)
    if labels is None and pos_keys is None and pos_mask is None:
        labels = diagonal_labels(query.shape[0], device=query.device)
    if chunk_size is None:
        return _dense_info_nce(query, keys, scale, labels, pos_keys, pos_mask, exclude, symmetric)
    if not torch.is_tensor(scale):
        scale = torch.tensor(float(scale), device=query.device, dtype=torch.float32)
    return chunked_info_nce(query, keys, scale, labels, pos_keys, pos_mask, exclude, symmetric, chunk_size)
