"""Memory-bounded InfoNCE: the same loss and gradients as the dense core, computed strip by strip.

The logits are produced ``chunk_size`` query rows at a time (a ``chunk x M`` strip), so peak memory grows
like ``M x chunk`` instead of ``N x M``. Row log-sum-exps are exact within a strip; the column log-sum-exps
that the symmetric (CLIP) loss needs are accumulated across strips with an online log-sum-exp. The backward
pass recomputes each strip from the saved features and log-sum-exps (a custom ``autograd.Function``), so no
strip outlives its loop iteration.

Strips are upcast to at least float32 for the exponentials so half-precision features keep a stable loss.
"""

import math
from typing import Optional

import torch


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


def _strip_targets(logits, labels, pos_mask, start, stop):
    """Logit of the positive for each row of the strip (mean over positives for a mask)."""
    if labels is not None:
        return logits.gather(1, labels[start:stop, None]).squeeze(1)
    mask = pos_mask[start:stop]
    return logits.masked_fill(~mask, 0.0).sum(1) / mask.sum(1)


def _strip_grad(logits, row_shift, col_shift):
    """Weighted softmax over rows (plus columns): exp(L - row_shift) [+ exp(L - col_shift)], in place.

    The shifts are log-sum-exps minus log(weight), so the mean's 1/N weights cost no extra pass.
    """
    if col_shift is None:
        return logits.sub_(row_shift[:, None]).exp_()
    grad = (logits - row_shift[:, None]).exp_()
    return grad.add_(logits.sub_(col_shift[None, :]).exp_())


def _subtract_targets(grad, labels, pos_mask, start, stop, weight):
    rows = torch.arange(stop - start, device=grad.device)
    if labels is not None:
        grad[rows, labels[start:stop]] -= weight
    elif pos_mask is not None:
        mask = pos_mask[start:stop].to(grad.dtype)
        grad.sub_(mask * (weight / mask.sum(1, keepdim=True)))


def _forward_strips(query, keys, scale, labels, pos_mask, exclude, symmetric, chunk, with_targets):
    """Row log-sum-exps, target logits and (symmetric) column log-sum-exps, one strip at a time."""
    n, m = query.shape[0], keys.shape[0]
    wide = torch.promote_types(query.dtype, torch.float32)
    row_lse = torch.empty(n, device=query.device, dtype=wide)
    target = torch.zeros(n, device=query.device, dtype=wide)
    col_lse = torch.full((m,), float("-inf"), device=query.device, dtype=wide) if symmetric else None
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        logits = _strip_logits(query, keys, scale, exclude, start, stop)
        row_lse[start:stop] = torch.logsumexp(logits, dim=1)
        if with_targets:
            target[start:stop] = _strip_targets(logits, labels, pos_mask, start, stop)
        if symmetric:  # online log-sum-exp down the columns, one strip at a time
            col_lse = torch.logaddexp(col_lse, torch.logsumexp(logits, dim=0))
    return row_lse, target, col_lse


class ChunkedInfoNCE(torch.autograd.Function):
    """autograd.Function behind :func:`chunked_info_nce`; see :func:`mmcl.losses.info_nce` for the math."""

    @staticmethod
    def forward(ctx, query, keys, scale, pos_keys, labels, pos_mask, exclude, symmetric, chunk):
        scale_value = float(scale)
        row_lse, target, col_lse = _forward_strips(query, keys, scale_value, labels, pos_mask, exclude,
                                                   symmetric, chunk, with_targets=pos_keys is None)
        if pos_keys is not None:  # the paired positive is one extra column per row
            target = _wide((query * pos_keys).sum(1)) * scale_value
            row_lse = torch.logaddexp(row_lse, target)
        loss = (row_lse - target).mean()
        if symmetric:
            loss = 0.5 * loss + 0.5 * (col_lse - target).mean()
        ctx.save_for_backward(query, keys, scale, pos_keys, labels, pos_mask, exclude, row_lse, col_lse)
        ctx.symmetric, ctx.chunk = symmetric, chunk
        return loss.to(query.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        query, keys, scale, pos_keys, labels, pos_mask, exclude, row_lse, col_lse = ctx.saved_tensors
        scale_value, g = float(scale), float(grad_out)
        n, m = query.shape[0], keys.shape[0]
        # Per-entry weights of the mean loss; grad_out is folded into the matmuls' alpha instead.
        w_row = (0.5 if ctx.symmetric else 1.0) / n
        w_col = 0.5 / m if ctx.symmetric else 0.0
        row_shift = row_lse - math.log(w_row)
        col_shift = col_lse - math.log(w_col) if ctx.symmetric else None
        need_k = ctx.needs_input_grad[1]
        grad_q = torch.empty_like(query)
        grad_k = torch.zeros_like(keys) if need_k else None
        grad_s = torch.zeros((), device=query.device, dtype=row_lse.dtype)
        for start in range(0, n, ctx.chunk):
            stop = min(n, start + ctx.chunk)
            grad = _strip_grad(_strip_logits(query, keys, scale_value, exclude, start, stop),
                               row_shift[start:stop], col_shift)
            if pos_keys is None:
                _subtract_targets(grad, labels, pos_mask, start, stop, w_row + w_col)
            grad = grad.to(query.dtype)
            grad_keys_sum = grad @ keys  # (chunk, D); reused for the scale gradient below
            torch.mul(grad_keys_sum, scale_value * g, out=grad_q[start:stop])
            # d loss / d scale = sum(grad * q k^T) = sum(q * (grad @ k)): no second pass over the strip.
            grad_s += (_wide(grad_keys_sum) * _wide(query[start:stop])).sum()
            if need_k:
                grad_k.addmm_(grad.T, query[start:stop], alpha=scale_value * g)
        grad_p = None
        if pos_keys is not None:
            grad_p = _positive_grads(query, pos_keys, scale_value, row_lse, w_row, g, grad_q, grad_s)
        return (grad_q, grad_k, (grad_s * g).to(scale.dtype).reshape(scale.shape), grad_p,
                None, None, None, None, None)


def _positive_grads(query, pos_keys, scale, row_lse, w_row, g, grad_q, grad_s):
    """Gradients through the extra positive column: add to grad_q and grad_s in place, return grad_p."""
    raw = _wide((query * pos_keys).sum(1))
    grad_pos = ((raw * scale - row_lse).exp() - 1.0) * w_row
    grad_s += (grad_pos * raw).sum()  # like the strips' part, multiplied by grad_out by the caller
    grad_pos = grad_pos * (scale * g)
    grad_q += (grad_pos[:, None] * _wide(pos_keys)).to(query.dtype)
    return (grad_pos[:, None] * _wide(query)).to(pos_keys.dtype)


def chunked_info_nce(query, keys, scale: torch.Tensor, labels: Optional[torch.Tensor] = None,
                     pos_keys=None, pos_mask=None, exclude=None, symmetric: bool = False,
                     chunk_size: int = 1024) -> torch.Tensor:
    """Strip-wise InfoNCE; arguments as :func:`mmcl.losses.info_nce` (already validated there)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return ChunkedInfoNCE.apply(query, keys, scale, pos_keys, labels, pos_mask, exclude,
                                symmetric, int(chunk_size))
