"""Supervised contrastive loss (Khosla et al. 2020) on the mmcl InfoNCE core.

Every view of the global batch is an anchor; its positives are every other view of the same class (the other
view of its own image included), its candidates every other view. The loss of an anchor is the paper's
L_out: ``-1/|P(i)| sum_p log softmax_p``, i.e. ``info_nce(pos_mask=same class, exclude=self)``. With labels
all distinct it is NT-Xent (SimCLR). The views are gathered across processes with autograd and the labels
without, so two processes with batch b give the loss of one with 2b. The positive mask is N x 2B booleans
(a quarter of the float logits); ``chunk_size`` bounds the logits as everywhere else.

The paper scales the loss by temperature / base_temperature (0.07 / 0.07 by default); mmcl leaves that
constant factor out (it only rescales the learning rate).
"""

from typing import Optional

import torch
from torch import nn

from mmcl.distributed import all_gather_no_grad, all_gather_with_grad, get_rank, is_distributed
from mmcl.losses.infonce import diagonal_labels, info_nce, l2_normalize


class SupConLoss(nn.Module):
    """SupCon over two views with class labels.

    Args:
        temperature: softmax temperature (default 0.1, the paper's).
        gather_distributed: candidates from the global batch (default True; a no-op on one process).
        chunk_size: rows per strip for the memory-bounded path (default None: dense).

    Forward: ``loss(out0, out1, labels)``; out0 / out1 (N, D) projections of the two views, labels (N,) long.
    """

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = True,
                 chunk_size: Optional[int] = None):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.gather_distributed = gather_distributed
        self.chunk_size = chunk_size

    def forward(self, out0: torch.Tensor, out1: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out0, out1 = l2_normalize(out0), l2_normalize(out1)
        rows = out0.shape[0]
        if labels.shape != (rows,):
            raise ValueError(f"labels must be ({rows},), one class per image, got {tuple(labels.shape)}")
        if self.gather_distributed and is_distributed():
            all0, all1, all_labels = all_gather_with_grad(out0), all_gather_with_grad(out1), all_gather_no_grad(labels)
            own = diagonal_labels(rows, get_rank() * rows, device=out0.device)
        else:
            all0, all1, all_labels = out0, out1, labels
            own = diagonal_labels(rows, device=out0.device)
        total = all0.shape[0]
        exclude = torch.cat([own, own + total])  # each view's similarity with itself
        query_labels, key_labels = torch.cat([labels, labels]), torch.cat([all_labels, all_labels])
        pos_mask = query_labels[:, None] == key_labels[None, :]
        pos_mask[torch.arange(2 * rows, device=out0.device), exclude] = False
        return info_nce(torch.cat([out0, out1]), torch.cat([all0, all1]), 1.0 / self.temperature,
                        pos_mask=pos_mask, exclude=exclude, chunk_size=self.chunk_size)
