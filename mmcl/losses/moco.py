"""MoCo's losses on the mmcl InfoNCE core.

:class:`MoCoLoss` (MoCo v1/v2): each query against its own key (positive) and a FIFO queue of negatives;
after the loss, the keys of the whole global batch are enqueued. :class:`MoCoV3Loss`: symmetric, no queue,
the negatives are the other keys of the global batch.
"""

from typing import Optional, Tuple

import torch
from torch import nn

from mmcl.distributed import all_gather_no_grad, all_gather_with_grad, get_rank
from mmcl.losses.infonce import diagonal_labels, info_nce, inverse_permutation, l2_normalize
from mmcl.losses.mochi import mochi_negatives
from mmcl.losses.queue import enqueue_, random_queue
from mmcl.losses.weighting import NegativeWeighting


class MoCoLoss(nn.Module):
    """InfoNCE of queries vs [positive key, queue of negatives], then enqueue of the gathered keys.

    Args:
        temperature: softmax temperature (default 0.2).
        queue_size: number of negatives kept (default 65536); any size works, writes wrap around.
        dim: feature dimension (default 128).
        chunk_size: rows per strip for the memory-bounded path (default None: dense).
        weighting: hard-negative weighting of the queue (:class:`mmcl.losses.NegativeWeighting`).
        mochi: ``(top_k, s, s_prime)``: MoCHi's synthetic hard negatives per query
            (:func:`mmcl.losses.mochi_negatives`); None (default) for none.

    The ``queue`` (queue_size, dim) and ``queue_ptr`` buffers are in ``state_dict``, so a checkpoint resumes
    with the same negatives. Forward: ``loss(query, key, update=None)``; keys normally come from the momentum
    encoder. ``update`` defaults to ``self.training``: evaluation leaves the queue unchanged. Every rank
    enqueues the keys of all ranks in rank order, so the queues stay identical across ranks.
    ``mix = (partner, lam)`` (i-Mix): query i targets key i with weight lam[i] and key partner[i] with
    1 - lam[i]; the candidates are then the keys of the global batch followed by the queue (i-Mix's MoCo).
    """

    def __init__(self, temperature: float = 0.2, queue_size: int = 65536, dim: int = 128,
                 chunk_size: Optional[int] = None, weighting: Optional[NegativeWeighting] = None,
                 mochi: Optional[Tuple[int, int, int]] = None):
        super().__init__()
        if queue_size < 1:
            raise ValueError(f"queue_size must be positive, got {queue_size}")
        self.temperature = temperature
        self.chunk_size = chunk_size
        self.weighting, self.mochi = weighting, mochi
        self.queue: torch.Tensor
        self.queue_ptr: torch.Tensor
        self.register_buffer("queue", random_queue(queue_size, dim))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def forward(self, query: torch.Tensor, key: torch.Tensor, update: Optional[bool] = None,
                mix=None) -> torch.Tensor:
        if key.shape[-1] != self.queue.shape[1] or query.shape != key.shape:
            raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} must match the queue "
                             f"dimension {self.queue.shape[1]}")
        query, key = l2_normalize(query), l2_normalize(key)
        negatives = self.queue.clone()  # a snapshot: the enqueue below must not alter what backward uses
        if mix is None:
            extra = mochi_negatives(query, negatives, *self.mochi) if self.mochi else None
            loss = info_nce(query, negatives, 1.0 / self.temperature, pos_keys=key, chunk_size=self.chunk_size,
                            row_negatives=extra, weighting=self.weighting)
        else:
            if self.mochi:
                raise ValueError("MoCHi mixes negatives for one positive per query; it does not combine with i-Mix")
            offset = get_rank() * query.shape[0]
            loss = info_nce(query, torch.cat([all_gather_no_grad(key), negatives]), 1.0 / self.temperature,
                            diagonal_labels(query.shape[0], offset, device=query.device), chunk_size=self.chunk_size,
                            mix_labels=mix[0] + offset, mix_weight=mix[1], weighting=self.weighting)
        if self.training if update is None else update:
            enqueue_(self.queue, self.queue_ptr, key)
        return loss


class MoCoV3Loss(nn.Module):
    """MoCo v3's symmetric loss: ctr(q1, k2) + ctr(q2, k1), ctr = 2 tau CE(q k_all^T / tau, y).

    Args:
        temperature: softmax temperature (default 0.2).
        chunk_size: rows per strip for the memory-bounded path (default None: dense).

    The keys of all ranks are the candidates (gathered with autograd, a no-op for momentum-encoder keys
    that carry no gradient); each query's positive is its own image's key. ``weighting``: hard-negative
    weighting (:class:`mmcl.losses.NegativeWeighting`). ``mix = (partner, lam)`` (i-Mix): view 1 (query1 and
    key1) holds mixtures ``lam * x_i + (1 - lam) * x_partner[i]``, and the targets are mixed accordingly.
    """

    def __init__(self, temperature: float = 0.2, chunk_size: Optional[int] = None,
                 weighting: Optional[NegativeWeighting] = None):
        super().__init__()
        self.temperature = temperature
        self.chunk_size = chunk_size
        self.weighting = weighting

    def forward(self, query1, query2, key1, key2, mix=None) -> torch.Tensor:
        back = None if mix is None else (inverse_permutation(mix[0]), mix[1])
        return self._contrast(query1, key2, mix) + self._contrast(query2, key1, back)

    def _contrast(self, query, key, mix):
        query, key = l2_normalize(query), l2_normalize(key)
        all_keys = all_gather_with_grad(key)
        offset = get_rank() * query.shape[0]
        labels = diagonal_labels(query.shape[0], offset, device=query.device)
        mixed = {} if mix is None else {"mix_labels": mix[0] + offset, "mix_weight": mix[1]}
        loss = info_nce(query, all_keys, 1.0 / self.temperature, labels, chunk_size=self.chunk_size,
                        weighting=self.weighting, **mixed)
        return 2.0 * self.temperature * loss
