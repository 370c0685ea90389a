"""Memory-bounded InfoNCE: the same loss and gradients as the dense core, computed strip by strip.

The logits are produced ``chunk_size`` query rows at a time (a ``chunk x M`` strip), so peak memory grows
like ``M x chunk`` instead of ``N x M``. Row log-sum-exps are exact within a strip; the column log-sum-exps
that the symmetric (CLIP) loss needs are accumulated across strips with an online log-sum-exp. The backward
pass recomputes each strip from the saved features and log-sum-exps (a custom ``autograd.Function``), so no
strip outlives its loop iteration.

Strips are upcast to at least float32 for the exponentials so half-precision features keep a stable loss.
"""

from typing import Optional

import torch


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays float64) for exponentials and sums."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _strip_logits(query, keys, scale, exclude, start, stop):
    """scale * query[start:stop] @ keys.T, at least float32, with excluded entries set to -inf."""
    logits = _wide(query[start:stop] @ keys.T).mul_(scale)
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


def _strip_grad(logits, row_lse, col_lse, w_row, w_col):
    """d loss / d logits before the targets are subtracted: weighted softmax over rows (and columns)."""
    if col_lse is None:
        return logits.sub_(row_lse[:, None]).exp_().mul_(w_row)
    grad = (logits - row_lse[:, None]).exp_().mul_(w_row)
    return grad.add_(logits.sub_(col_lse[None, :]).exp_(), alpha=w_col)


def _subtract_targets(grad, labels, pos_mask, start, stop, weight):
    rows = torch.arange(stop - start, device=grad.device)
    if labels is not None:
        grad[rows, labels[start:stop]] -= weight
    elif pos_mask is not None:
        mask = pos_mask[start:stop].to(grad.dtype)
        grad.sub_(mask * (weight / mask.sum(1, keepdim=True)))


class ChunkedInfoNCE(torch.autograd.Function):
    """autograd.Function behind :func:`chunked_info_nce`; see :func:`mmcl.losses.info_nce` for the math."""

    @staticmethod
    def forward(ctx, query, keys, scale, pos_keys, labels, pos_mask, exclude, symmetric, chunk):
        scale_value = float(scale)
        n, m = query.shape[0], keys.shape[0]
        wide = torch.promote_types(query.dtype, torch.float32)
        row_lse = torch.empty(n, device=query.device, dtype=wide)
        target = torch.zeros(n, device=query.device, dtype=wide)
        col_lse = torch.full((m,), float("-inf"), device=query.device, dtype=wide) if symmetric else None
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            logits = _strip_logits(query, keys, scale_value, exclude, start, stop)
            row_lse[start:stop] = torch.logsumexp(logits, dim=1)
            if pos_keys is None:
                target[start:stop] = _strip_targets(logits, labels, pos_mask, start, stop)
            if symmetric:  # online log-sum-exp down the columns, one strip at a time
                col_lse = torch.logaddexp(col_lse, torch.logsumexp(logits, dim=0))
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
        w_row = g / n * (0.5 if ctx.symmetric else 1.0)
        w_col = g / m * 0.5 if ctx.symmetric else 0.0
        need_q, need_k, need_s, need_p = ctx.needs_input_grad[:4]
        grad_q = torch.zeros_like(query)
        grad_k = torch.zeros_like(keys) if need_k else None
        grad_s = torch.zeros((), device=query.device, dtype=row_lse.dtype)
        for start in range(0, n, ctx.chunk):
            stop = min(n, start + ctx.chunk)
            logits = _strip_logits(query, keys, scale_value, exclude, start, stop)
            grad = _strip_grad(logits, row_lse[start:stop], col_lse, w_row, w_col)
            if pos_keys is None:
                _subtract_targets(grad, labels, pos_mask, start, stop, w_row + w_col)
            grad = grad.to(query.dtype)
            grad_keys_sum = grad @ keys  # (chunk, d); reused for the scale gradient below
            grad_q[start:stop] = grad_keys_sum * scale_value
            # d loss / d scale = sum(grad * q k^T) = sum(q * (grad @ k)): no second pass over the strip.
            grad_s += (_wide(grad_keys_sum) * _wide(query[start:stop])).sum()
            if need_k:
                grad_k.addmm_(grad.T, query[start:stop], alpha=scale_value)
        grad_p = None
        if pos_keys is not None:
            raw_pos = _wide((query * pos_keys).sum(1))
            grad_pos = ((raw_pos * scale_value - row_lse).exp() - 1.0) * w_row
            grad_q += (grad_pos[:, None] * _wide(pos_keys) * scale_value).to(query.dtype)
            grad_p = (grad_pos[:, None] * _wide(query) * scale_value).to(pos_keys.dtype)
            grad_s += (grad_pos * raw_pos).sum()
        grad_s = grad_s.to(scale.dtype).reshape(scale.shape) if need_s else None
        return (grad_q if need_q else None, grad_k, grad_s, grad_p if need_p else None,
                None, None, None, None, None)


def chunked_info_nce(query, keys, scale: torch.Tensor, labels: Optional[torch.Tensor] = None,
                     pos_keys=None, pos_mask=None, exclude=None, symmetric: bool = False,
                     chunk_size: int = 1024) -> torch.Tensor:
    """Strip-wise InfoNCE; arguments as :func:`mmcl.losses.info_nce` (already validated there)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return ChunkedInfoNCE.apply(query, keys, scale, pos_keys, labels, pos_mask, exclude,
                                symmetric, int(chunk_size))
