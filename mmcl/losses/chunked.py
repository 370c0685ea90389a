"""Memory-bounded InfoNCE: the same loss and gradients as the dense core, computed strip by strip.

The logits are produced ``chunk_size`` query rows at a time (a ``chunk x M`` strip), so peak memory grows
like ``M x chunk`` instead of ``N x M``. Row log-sum-exps are exact within a strip; the column log-sum-exps
that the symmetric (CLIP) loss needs are accumulated across strips with an online log-sum-exp. The backward
pass recomputes each strip from the saved features and log-sum-exps (a custom ``autograd.Function``), so no
strip outlives its loop iteration.

Strips are upcast to at least float32 for the exponentials so half-precision features keep a stable loss.
The hard-negative weighted path (:mod:`mmcl.losses.weighting`) reuses the strip helpers of this module.
"""

import math
from typing import NamedTuple, Optional

import torch


class Targets(NamedTuple):
    """What each row's cross-entropy target is (see :func:`mmcl.losses.info_nce`).

    ``labels`` (N,) with, for i-Mix, ``mix_labels`` (N,) and ``mix_weight`` (N,) = lambda: the target is
    ``lambda * logit[labels] + (1 - lambda) * logit[mix_labels]``; or ``pos_mask`` (N, M): the mean logit of
    several positives. None everywhere with ``pos_keys`` (the positive is an extra column).
    """

    labels: Optional[torch.Tensor] = None
    mix_labels: Optional[torch.Tensor] = None
    mix_weight: Optional[torch.Tensor] = None
    pos_mask: Optional[torch.Tensor] = None


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays float64) for exponentials and sums."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _strip_logits(query, keys, scale, exclude, start, stop):
    """(scale * query[start:stop]) @ keys.T, at least float32, with excluded entries set to -inf.

    Scaling the (chunk, D) queries rather than the (chunk, M) logits saves a pass over the strip and is the
    same order of operations as the dense path (and open_clip).
    """
    logits = _wide((query[start:stop] * scale) @ keys.T)
    if exclude is not None:
        rows = torch.arange(stop - start, device=logits.device)
        logits[rows, exclude[start:stop]] = float("-inf")
    return logits


def _label_weights(targets: Targets, start, stop, dtype):
    """[(labels, weight per row), ...] of the strip's rows: one pair, or two for mixed (i-Mix) labels."""
    labels = targets.labels[start:stop]
    if targets.mix_labels is None:
        return [(labels, None)]
    lam = targets.mix_weight[start:stop].to(dtype)
    return [(labels, lam), (targets.mix_labels[start:stop], 1.0 - lam)]


def _strip_targets(logits, targets: Targets, start, stop):
    """Target logit of each row of the strip (the mean over positives for a mask), and the strip's
    contribution to the column targets of a symmetric mask (None otherwise)."""
    if targets.pos_mask is None:
        total = 0.0
        for labels, weight in _label_weights(targets, start, stop, logits.dtype):
            picked = logits.gather(1, labels[:, None]).squeeze(1)
            total = total + (picked if weight is None else weight * picked)
        return total, None
    mask = targets.pos_mask[start:stop]
    masked = logits.masked_fill(~mask, 0.0)
    return masked.sum(1) / mask.sum(1), masked.sum(0)


def _strip_grad(logits, row_shift, col_shift):
    """Weighted softmax over rows (plus columns): exp(L - row_shift) [+ exp(L - col_shift)], in place.

    The shifts are log-sum-exps minus log(weight), so the mean's 1/N weights cost no extra pass.
    """
    if col_shift is None:
        return logits.sub_(row_shift[:, None]).exp_()
    grad = (logits - row_shift[:, None]).exp_()
    return grad.add_(logits.sub_(col_shift[None, :]).exp_())


def _subtract_targets(grad, targets: Targets, start, stop, w_row, w_col):
    """Subtract the targets' weights (row weight w_row, column weight w_col) from a strip's softmax."""
    if targets.pos_mask is not None:
        mask = targets.pos_mask[start:stop].to(grad.dtype)
        weight = w_row / mask.sum(1, keepdim=True)
        if w_col:  # a symmetric mask: each column's target is the mean over its own positives
            weight = weight + w_col / targets.pos_mask.sum(0).to(grad.dtype)[None, :]
        grad.sub_(mask * weight)
    elif targets.labels is not None:
        rows = torch.arange(stop - start, device=grad.device)
        for labels, weight in _label_weights(targets, start, stop, grad.dtype):
            grad[rows, labels] -= (w_row + w_col) * (1.0 if weight is None else weight)


def strip_backward(grad, query, keys, start, stop, scale, g, grad_q, grad_k, grad_s):
    """Push one strip's logit gradient ``grad`` (chunk x M) to the queries, keys and scale, in place.

    ``g`` (the upstream gradient) and ``scale`` are folded into the matmuls' alpha.
    """
    grad = grad.to(query.dtype)
    grad_keys_sum = grad @ keys  # (chunk, D); reused for the scale gradient below
    torch.mul(grad_keys_sum, scale * g, out=grad_q[start:stop])
    # d loss / d scale = sum(grad * q k^T) = sum(q * (grad @ k)): no second pass over the strip.
    grad_s += (_wide(grad_keys_sum) * _wide(query[start:stop])).sum()
    if grad_k is not None:
        grad_k.addmm_(grad.T, query[start:stop], alpha=scale * g)


def _forward_strips(query, keys, scale, targets, exclude, symmetric, chunk, with_targets):
    """Row log-sum-exps, target logits and (symmetric) column log-sum-exps, one strip at a time."""
    n, m = query.shape[0], keys.shape[0]
    wide = torch.promote_types(query.dtype, torch.float32)
    row_lse = torch.empty(n, device=query.device, dtype=wide)
    target = torch.zeros(n, device=query.device, dtype=wide)
    col_lse = torch.full((m,), float("-inf"), device=query.device, dtype=wide) if symmetric else None
    col_target = torch.zeros(m, device=query.device, dtype=wide) if targets.pos_mask is not None else None
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        logits = _strip_logits(query, keys, scale, exclude, start, stop)
        row_lse[start:stop] = torch.logsumexp(logits, dim=1)
        if with_targets:
            target[start:stop], col_part = _strip_targets(logits, targets, start, stop)
            if col_part is not None:
                col_target += col_part
        if symmetric:  # online log-sum-exp down the columns, one strip at a time
            col_lse = torch.logaddexp(col_lse, torch.logsumexp(logits, dim=0))
    if col_target is not None:
        col_target = col_target / targets.pos_mask.sum(0).to(wide)
    return row_lse, target, col_lse, col_target


class ChunkedInfoNCE(torch.autograd.Function):
    """autograd.Function behind :func:`chunked_info_nce`; see :func:`mmcl.losses.info_nce` for the math."""

    @staticmethod
    def forward(ctx, query, keys, scale, pos_keys, targets, exclude, symmetric, chunk):
        scale_value = float(scale)
        row_lse, target, col_lse, col_target = _forward_strips(
            query, keys, scale_value, targets, exclude, symmetric, chunk, with_targets=pos_keys is None)
        if pos_keys is not None:  # the paired positive is one extra column per row
            target = _wide((query * pos_keys).sum(1)) * scale_value
            row_lse = torch.logaddexp(row_lse, target)
        loss = (row_lse - target).mean()
        if symmetric:  # labels (mixed or not) are permutations: the column targets sum to the row targets
            loss = 0.5 * loss + 0.5 * (col_lse - (target if col_target is None else col_target)).mean()
        ctx.save_for_backward(query, keys, scale, pos_keys, exclude, row_lse, col_lse)
        ctx.targets, ctx.symmetric, ctx.chunk = targets, symmetric, chunk
        return loss.to(query.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        query, keys, scale, pos_keys, exclude, row_lse, col_lse = ctx.saved_tensors
        scale_value, g = float(scale), float(grad_out)
        n, m = query.shape[0], keys.shape[0]
        # Per-entry weights of the mean loss; grad_out is folded into the matmuls' alpha instead.
        w_row = (0.5 if ctx.symmetric else 1.0) / n
        w_col = 0.5 / m if ctx.symmetric else 0.0
        row_shift = row_lse - math.log(w_row)
        col_shift = col_lse - math.log(w_col) if ctx.symmetric else None
        grad_q = torch.empty_like(query)
        grad_k = torch.zeros_like(keys) if ctx.needs_input_grad[1] else None
        grad_s = torch.zeros((), device=query.device, dtype=row_lse.dtype)
        for start in range(0, n, ctx.chunk):
            stop = min(n, start + ctx.chunk)
            grad = _strip_grad(_strip_logits(query, keys, scale_value, exclude, start, stop),
                               row_shift[start:stop], col_shift)
            if pos_keys is None:
                _subtract_targets(grad, ctx.targets, start, stop, w_row, w_col)
            strip_backward(grad, query, keys, start, stop, scale_value, g, grad_q, grad_k, grad_s)
        grad_p = None
        if pos_keys is not None:
            raw = _wide((query * pos_keys).sum(1))
            grad_pos = ((raw * scale_value - row_lse).exp() - 1.0) * w_row
            grad_p = positive_grads(query, pos_keys, raw, grad_pos, scale_value, g, grad_q, grad_s)
        return (grad_q, grad_k, (grad_s * g).to(scale.dtype).reshape(scale.shape), grad_p,
                None, None, None, None)


def positive_grads(query, pos_keys, raw, grad_pos, scale, g, grad_q, grad_s):
    """Gradients through the extra positive column, whose logit gradient is ``grad_pos`` (N,) and raw
    similarity ``raw``: add to grad_q and grad_s in place, return grad_p."""
    grad_s += (grad_pos * raw).sum()  # like the strips' part, multiplied by grad_out by the caller
    grad_pos = grad_pos * (scale * g)
    grad_q += (grad_pos[:, None] * _wide(pos_keys)).to(query.dtype)
    return (grad_pos[:, None] * _wide(query)).to(pos_keys.dtype)


def chunked_info_nce(query, keys, scale: torch.Tensor, targets: Targets, pos_keys=None, exclude=None,
                     symmetric: bool = False, chunk_size: int = 1024) -> torch.Tensor:
    """Strip-wise InfoNCE; arguments as :func:`mmcl.losses.info_nce` (already validated there)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return ChunkedInfoNCE.apply(query, keys, scale, pos_keys, targets, exclude, symmetric, int(chunk_size))
