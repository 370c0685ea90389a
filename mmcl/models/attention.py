"""A faster training path for the self-attention of open_clip's default transformer blocks.

open_clip's `ResidualAttentionBlock` calls `nn.MultiheadAttention`, which in training (gradients on) reshapes
the packed q/k/v projection through several transposes and copies, and its backward fills and copies
gradients of the same shape again: at CLIP-tiny sizes that costs about a third of each attention layer on a
CPU. `PackedSelfAttention` computes the same function with the same parameters: one projection, one view,
`scaled_dot_product_attention`, the output projection. It is the module's class swapped in place, so names,
state dicts, exports and `isinstance(m, nn.MultiheadAttention)` are unchanged. Anything it does not cover
(cross-attention, key padding masks, per-head masks, returned weights, sequence-first layout) and every no-grad call
(where PyTorch's own fused inference kernel is faster) go to `nn.MultiheadAttention.forward`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class PackedSelfAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention with a leaner self-attention forward for training (same parameters)."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self._packed_case(query, key, value, key_padding_mask, need_weights, attn_mask):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        return self._packed(query, attn_mask, is_causal), None

    def _packed_case(self, query, key, value, key_padding_mask, need_weights, attn_mask) -> bool:
        return (torch.is_grad_enabled() and self.batch_first and query is key and key is value
                and key_padding_mask is None and not need_weights and self._qkv_same_embed_dim
                and (attn_mask is None or attn_mask.dim() == 2)  # a 3-D mask is per (batch x head)
                and self.in_proj_weight is not None and self.bias_k is None and not self.add_zero_attn
                and query.dim() == 3)

    def _packed(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool) -> torch.Tensor:
        batch, length, width = x.shape
        heads = self.num_heads
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(q.dtype)
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout,
                                             is_causal=is_causal and attn_mask is None)
        out = out.transpose(1, 2).reshape(batch, length, width)
        return F.linear(out, self.out_proj.weight, self.out_proj.bias)


def use_packed_attention(model: nn.Module) -> int:
    """Switch every plain nn.MultiheadAttention in `model` to PackedSelfAttention; returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is nn.MultiheadAttention:
            module.__class__ = PackedSelfAttention
            count += 1
    return count
