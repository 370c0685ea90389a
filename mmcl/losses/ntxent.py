"""SimCLR's NT-Xent loss on the mmcl InfoNCE core, with lightly's signature and values.

Each of the 2N views is a query; its positive is the other view of the same image and its negatives are the
other 2N - 2 views (2N - 1 candidates: the view's similarity with itself is excluded). With
``gather_distributed`` the candidates are the views of the global batch, gathered with autograd. With a
memory bank the negatives are a FIFO queue of past ``out1`` features instead (MoCo-style), as in lightly.
"""

from typing import Optional, Sequence, Union

import torch
from torch import nn

from mmcl.distributed import all_gather_with_grad, get_rank, is_distributed
from mmcl.losses.infonce import diagonal_labels, info_nce, inverse_permutation, l2_normalize
from mmcl.losses.queue import enqueue_, random_queue
from mmcl.losses.weighting import NegativeWeighting


def _bank_shape(memory_bank_size):
    """lightly's convention: 0 disables the bank, (size, dim) enables it; a bare size lacks the dim."""
    if isinstance(memory_bank_size, int):
        if memory_bank_size != 0:
            raise ValueError(f"memory_bank_size={memory_bank_size} does not give the feature dimension: "
                             f"pass (size, dim), or 0 to disable the memory bank")
        return None
    shape = tuple(int(x) for x in memory_bank_size)
    if len(shape) != 2 or min(shape) < 0:
        raise ValueError(f"memory_bank_size must be 0 or (size, dim), got {memory_bank_size}")
    return shape if shape[0] > 0 else None


class NTXentLoss(nn.Module):
    """Normalised temperature-scaled cross-entropy (SimCLR), optionally with a memory bank.

    Args:
        temperature: softmax temperature (default 0.5); logits are cosine similarities / temperature.
        memory_bank_size: 0 (default, in-batch negatives) or (size, dim) for a queue of negatives kept in
            the ``queue`` / ``queue_ptr`` buffers (saved in state_dict, unlike lightly's).
        gather_distributed: use the global batch (in-batch mode) or enqueue gathered features (bank mode).
        chunk_size: rows per strip for the memory-bounded path (default None: dense).
        weighting: hard-negative weighting (:class:`mmcl.losses.NegativeWeighting`: HCL, debiased, or
            decoupled, which is lightly's DCLLoss); default plain NT-Xent.

    Forward: ``loss(out0, out1, mix=None)`` with the two views' projections, shape (N, D). The bank is updated
    only when ``out0`` requires grad (as in lightly), so evaluation leaves it unchanged. ``mix = (partner,
    lam)`` (in-batch mode): view 0 holds i-Mix mixtures ``lam * x_i + (1 - lam) * x_partner[i]``, so row i of
    view 0 targets view 1 of i (weight lam) and of partner[i] (1 - lam), and view 1 targets view 0 alike.
    """

    def __init__(self, temperature: float = 0.5, memory_bank_size: Union[int, Sequence[int]] = 0,
                 gather_distributed: bool = False, chunk_size: Optional[int] = None,
                 weighting: Optional[NegativeWeighting] = None):
        super().__init__()
        self.weighting = weighting
        if abs(temperature) < 1e-8:
            raise ValueError(f"Illegal temperature: abs({temperature}) < 1e-8")
        self.temperature = temperature
        self.gather_distributed = gather_distributed
        self.chunk_size = chunk_size
        shape = _bank_shape(memory_bank_size)
        self.queue: Optional[torch.Tensor]
        self.register_buffer("queue", random_queue(*shape) if shape else None)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long) if shape else None)

    def forward(self, out0: torch.Tensor, out1: torch.Tensor, mix=None) -> torch.Tensor:
        out0, out1 = l2_normalize(out0), l2_normalize(out1)
        if self.queue is None:
            return self._in_batch_loss(out0, out1, mix)
        if mix is not None:
            raise ValueError("i-Mix (mix=...) needs in-batch negatives, not a memory bank")
        negatives = self.queue.clone()  # a snapshot: the enqueue below must not alter what backward uses
        if out0.requires_grad:
            enqueue_(self.queue, self.queue_ptr, out1, gather=self.gather_distributed)
        return info_nce(out0, negatives, 1.0 / self.temperature, pos_keys=out1, chunk_size=self.chunk_size,
                        weighting=self.weighting)

    def _in_batch_loss(self, out0, out1, mix):
        rows = out0.shape[0]
        if self.gather_distributed and is_distributed():
            all0, all1 = all_gather_with_grad(out0), all_gather_with_grad(out1)
            own = diagonal_labels(rows, get_rank() * rows, device=out0.device)
        else:
            all0, all1 = out0, out1
            own = diagonal_labels(rows, device=out0.device)
        total = all0.shape[0]
        # Queries [view0; view1] against keys [all view0; all view1]: a view-0 row's positive is its view 1
        # (column total + i), a view-1 row's is its view 0 (column i); each row drops its own column.
        labels = torch.cat([own + total, own])
        exclude = torch.cat([own, own + total])
        targets = {}
        if mix is not None:  # view 1 of partner[i] for view-0 rows; view 0 of inverse[i] for view-1 rows
            partner, lam = mix
            targets = {"mix_labels": torch.cat([partner + own[0] + total, inverse_permutation(partner) + own[0]]),
                       "mix_weight": torch.cat([lam, lam])}
        return info_nce(torch.cat([out0, out1]), torch.cat([all0, all1]), 1.0 / self.temperature,
                        labels, exclude=exclude, chunk_size=self.chunk_size, weighting=self.weighting, **targets)
