"""Hard-negative weighting of the InfoNCE denominator: HCL, debiased and decoupled contrastive learning.

For a row with positive logit ``p`` and negative logits ``l_j`` (n of them), plain InfoNCE is
``log(e^p + sum_j e^l_j) - p``. Three published changes act on the negatives' sum only:

- HCL (Robinson et al. 2021): importance weights ``w_j = exp(beta * l_j) / mean_k exp(beta * l_k)`` on the
  negatives (beta times the logit, as the authors' code does), so the sum becomes
  ``sum_j w_j e^l_j = n * exp(lse((1 + beta) l) - lse(beta l))``: harder negatives count more.
- Debiasing (Chuang et al. 2020, DCL): with the class prior ``tau_plus`` (the chance that a "negative" shares
  the anchor's class), ``Ng = (sum_j w_j e^l_j - tau_plus * n * e^p) / (1 - tau_plus)``, floored at its
  smallest possible value ``n * e^-scale`` (all cosines -1) as in both papers' code.
- Decoupled (Yeh et al. 2022): the positive leaves the denominator: ``log Ng - p``.

``beta = 0, tau_plus = 0`` (and not decoupled) is plain InfoNCE. The formula of a row lives once, in
:func:`weighted_row_loss`; the dense path feeds it log-sum-exps of the masked logit matrix, the chunked path
(:class:`ChunkedWeightedInfoNCE`) accumulates the same log-sum-exps strip by strip and gets the formula's
partial derivatives from autograd on those (N,) vectors, so both give the same values and gradients.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch

from mmcl.losses.chunked import _strip_logits, _wide, positive_grads, strip_backward


@dataclass(frozen=True)
class NegativeWeighting:
    """How the negatives of each row are weighted (defaults: plain InfoNCE).

    Args:
        beta: HCL concentration; 0 weights every negative alike (Robinson et al. use 0.5-1 on CIFAR).
        tau_plus: DCL / HCL class prior in [0, 1); 0 applies no debiasing (0.1 for ten balanced classes).
        decoupled: drop the positive from the denominator (Yeh et al., lightly's DCLLoss).
    """

    beta: float = 0.0
    tau_plus: float = 0.0
    decoupled: bool = False

    def __post_init__(self):
        if not self.beta >= 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if not 0 <= self.tau_plus < 1:
            raise ValueError(f"tau_plus must be in [0, 1), got {self.tau_plus}")

    @property
    def active(self) -> bool:
        return bool(self.beta or self.tau_plus or self.decoupled)


def weighted_row_loss(pos, lse_a, lse_b, count, scale: float, w: NegativeWeighting) -> torch.Tensor:
    """Per-row loss from the positive logit ``pos``, ``lse_a = lse((1 + beta) l)`` and ``lse_b = lse(beta l)``
    over the row's negatives (``lse_b`` None when beta = 0), and their ``count`` n."""
    log_n = count.to(pos.dtype).log()
    log_sum = lse_a - lse_b + log_n if lse_b is not None else lse_a  # log of sum_j w_j e^l_j
    if w.tau_plus > 0:
        log_u = math.log(w.tau_plus) + log_n + pos - log_sum  # log(tau_plus * n * e^p / weighted sum)
        one_minus_u = -torch.expm1(log_u.clamp(max=0.0))
        debiased = log_sum + one_minus_u.clamp_min(1e-30).log() - math.log1p(-w.tau_plus)
        debiased = torch.where(one_minus_u > 0, debiased, torch.full_like(debiased, float("-inf")))
        log_neg = torch.maximum(debiased, log_n - scale)  # the floor n * e^-scale is a constant
    else:
        log_neg = log_sum
    return log_neg - pos if w.decoupled else torch.logaddexp(pos, log_neg) - pos


def negative_stats(neg_logits, beta: float, dim: int):
    """lse((1 + beta) l), lse(beta l) (None for beta = 0) and the count of finite entries along ``dim``;
    ``neg_logits`` holds -inf wherever an entry is no negative."""
    lse_a = torch.logsumexp(neg_logits * (1.0 + beta), dim=dim)
    lse_b = torch.logsumexp(neg_logits * beta, dim=dim) if beta else None
    return lse_a, lse_b, torch.isfinite(neg_logits).sum(dim)


def _mask_positives(logits, labels, start=0):
    """A copy of the logits with each row's positive column at -inf (labels None: the positive is elsewhere)."""
    if labels is None:
        return logits
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits.index_put((rows, labels[start:start + logits.shape[0]]),
                            torch.tensor(float("-inf"), device=logits.device, dtype=logits.dtype))


def _extra_logits(query, row_negatives, scale):
    """Logits of per-row extra negatives (N, E, D) -> (N, E)."""
    return torch.einsum("nd,ned->ne", query * scale, row_negatives.to(query.dtype))


def dense_weighted_info_nce(query, keys, scale, labels, pos_keys, exclude, row_negatives, symmetric,
                            w: NegativeWeighting):
    """The weighted loss with plain autograd over the full logit matrix (arguments as info_nce)."""
    logits = scale * query @ keys.T
    if exclude is not None:
        rows = torch.arange(query.shape[0], device=query.device)
        logits = logits.index_put((rows, exclude), torch.tensor(float("-inf"), device=logits.device))
    pos = scale * (query * pos_keys).sum(1) if pos_keys is not None else logits.gather(1, labels[:, None])[:, 0]
    negatives = _mask_positives(logits, None if pos_keys is not None else labels)
    if row_negatives is not None:
        negatives = torch.cat([negatives, _extra_logits(query, row_negatives, scale)], dim=1)
    floor = float(scale.detach()) if torch.is_tensor(scale) else float(scale)
    loss = weighted_row_loss(pos, *negative_stats(negatives, w.beta, 1), floor, w).mean()
    if symmetric:  # each column (text) against its own positive row (image) and the other rows
        col_pos = torch.empty_like(pos).index_copy(0, labels, pos)
        cols = weighted_row_loss(col_pos, *negative_stats(negatives, w.beta, 0), floor, w).mean()
        loss = 0.5 * (loss + cols)
    return loss


def _row_partials(stats, floor, w, weight):
    """Row losses summed with ``weight`` per row, and their partial derivatives w.r.t. the stats."""
    leaves = [s.detach().requires_grad_(True) if s is not None and s.is_floating_point() else s for s in stats]
    with torch.enable_grad():
        total = weighted_row_loss(*leaves, floor, w).sum() * weight
        wanted = [s for s in leaves[:3] if s is not None]
        partials = iter(torch.autograd.grad(total, wanted))
    return total.detach(), [next(partials) if s is not None else None for s in leaves[:3]]


def _weighted_strip_grad(neg, lse_a, lse_b, g_a, g_b, beta, dim):
    """d loss / d l of the negative entries along rows (dim 1) or columns (dim 0):
    g_a (1 + beta) exp((1 + beta) l - lse_a) + g_b beta exp(beta l - lse_b)."""
    shape = (slice(None), None) if dim == 1 else (None, slice(None))
    grad = (neg * (1.0 + beta) - lse_a[shape]).exp_().mul_((g_a * (1.0 + beta))[shape])
    if lse_b is not None:
        grad.add_((neg * beta - lse_b[shape]).exp_().mul_((g_b * beta)[shape]))
    return grad


class ChunkedWeightedInfoNCE(torch.autograd.Function):
    """The weighted loss strip by strip: forward accumulates the log-sum-exps, backward recomputes strips."""

    @staticmethod
    def forward(ctx, query, keys, scale, pos_keys, labels, exclude, row_negatives, symmetric, chunk, w):
        s = float(scale)
        row, col = _weighted_stats(query, keys, s, pos_keys, labels, exclude, row_negatives, symmetric, chunk, w)
        loss, row_partials = _row_partials(row, s, w, (0.5 if symmetric else 1.0) / query.shape[0])
        col_partials = None
        if symmetric:
            col_loss, col_partials = _row_partials(col, s, w, 0.5 / keys.shape[0])
            loss = loss + col_loss
        ctx.save_for_backward(query, keys, scale, pos_keys, labels, exclude, row_negatives)
        ctx.stats, ctx.partials = (row, col), (row_partials, col_partials)
        ctx.chunk, ctx.w = chunk, w
        return loss.to(query.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        query, keys, scale, pos_keys, labels, exclude, row_negatives = ctx.saved_tensors
        s, g, beta = float(scale), float(grad_out), ctx.w.beta
        (row, col), (rp, cp) = ctx.stats, ctx.partials
        grad_q = torch.empty_like(query)
        grad_k = torch.zeros_like(keys) if ctx.needs_input_grad[1] else None
        grad_s = torch.zeros((), device=query.device, dtype=row[1].dtype)
        for start in range(0, query.shape[0], ctx.chunk):
            stop = min(query.shape[0], start + ctx.chunk)
            neg = _mask_positives(_strip_logits(query, keys, s, exclude, start, stop), labels, start)
            grad = _weighted_strip_grad(neg, row[1][start:stop], _part(row[2], start, stop),
                                        rp[1][start:stop], _part(rp[2], start, stop), beta, 1)
            rows = torch.arange(stop - start, device=grad.device)
            if labels is not None:
                grad[rows, labels[start:stop]] += rp[0][start:stop]
            if cp is not None:
                grad += _weighted_strip_grad(neg, col[1], col[2], cp[1], cp[2], beta, 0)
                grad[rows, labels[start:stop]] += cp[0][labels[start:stop]]
            strip_backward(grad, query, keys, start, stop, s, g, grad_q, grad_k, grad_s)
            if row_negatives is not None:
                _extra_backward(query, row_negatives, s, g, row, rp, beta, start, stop, grad_q, grad_s)
        grad_p = None
        if pos_keys is not None:
            grad_p = positive_grads(query, pos_keys, _wide((query * pos_keys).sum(1)), rp[0], s, g, grad_q, grad_s)
        return (grad_q, grad_k, (grad_s * g).to(scale.dtype).reshape(scale.shape), grad_p,
                None, None, None, None, None, None)


def _part(tensor, start, stop):
    return None if tensor is None else tensor[start:stop]


def _weighted_stats(query, keys, s, pos_keys, labels, exclude, row_negatives, symmetric, chunk, w):
    """(pos, lse_a, lse_b, count) per row and, when symmetric, per column, one strip at a time."""
    n, m, beta = query.shape[0], keys.shape[0], w.beta
    pos = _wide((query * pos_keys).sum(1)) * s if pos_keys is not None else None
    row_parts, col = [], None
    if symmetric:
        wide = torch.promote_types(query.dtype, torch.float32)
        empty = torch.full((m,), float("-inf"), device=query.device, dtype=wide)
        col = [torch.empty(m, device=query.device, dtype=wide), empty, empty.clone() if beta else None,
               torch.zeros(m, device=query.device, dtype=torch.long)]
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        logits = _strip_logits(query, keys, s, exclude, start, stop)
        strip_pos = logits.gather(1, labels[start:stop, None])[:, 0] if labels is not None else None
        neg = _mask_positives(logits, labels, start)
        if symmetric:
            a, b, count = negative_stats(neg, beta, 0)
            col[0][labels[start:stop]] = strip_pos
            col[1] = torch.logaddexp(col[1], a)
            col[2] = torch.logaddexp(col[2], b) if beta else None
            col[3] += count
        if row_negatives is not None:
            neg = torch.cat([neg, _wide(_extra_logits(query[start:stop], row_negatives[start:stop], s))], dim=1)
        row_parts.append((strip_pos, *negative_stats(neg, beta, 1)))
    joined = [torch.cat(part) if part[0] is not None else None for part in zip(*row_parts)]
    if pos is not None:
        joined[0] = pos
    return joined, col


def _extra_backward(query, row_negatives, s, g, row, rp, beta, start, stop, grad_q, grad_s):
    """Gradients through the per-row extra negatives (constants): to the strip's queries and the scale."""
    extra = row_negatives[start:stop]
    logits = _wide(_extra_logits(query[start:stop], extra, s))
    grad = _weighted_strip_grad(logits, row[1][start:stop], _part(row[2], start, stop),
                                rp[1][start:stop], _part(rp[2], start, stop), beta, 1)
    pushed = torch.einsum("ne,ned->nd", grad, _wide(extra))  # (chunk, D)
    grad_q[start:stop] += (pushed * (s * g)).to(query.dtype)
    grad_s += (pushed * _wide(query[start:stop])).sum()


def weighted_info_nce(query, keys, scale, labels, pos_keys, exclude, row_negatives, symmetric,
                      chunk_size: Optional[int], w: NegativeWeighting) -> torch.Tensor:
    """The weighted loss, dense or strip-wise; arguments as :func:`mmcl.losses.info_nce` (validated there)."""
    if chunk_size is None:
        return dense_weighted_info_nce(query, keys, scale, labels, pos_keys, exclude, row_negatives, symmetric, w)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return ChunkedWeightedInfoNCE.apply(query, keys, scale, pos_keys, labels, exclude, row_negatives,
                                        symmetric, int(chunk_size), w)
