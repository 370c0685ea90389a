"""Dropout in the text tower while training (`model.text_dropout`), for SimCSE's two views of one caption.

open_clip's own text transformer has no dropout. mmcl adds it on each block's two residual branches (after
attention and after the MLP), BERT's "hidden dropout": an `nn.Identity` layer-scale slot becomes an
`nn.Dropout`, a `LayerScale` becomes a subclass that drops after scaling. Neither has new parameters, so state
dicts, checkpoints and open_clip exports are unchanged, and evaluation (eval mode) is unaffected. A HF text
tower has its own dropout layers; the option sets their rate.
"""
from __future__ import annotations

import torch.nn.functional as F
from open_clip.transformer import LayerScale, ResidualAttentionBlock
from torch import nn


class DropoutLayerScale(LayerScale):
    """LayerScale followed by dropout (same parameters as LayerScale)."""

    p = 0.0

    def forward(self, x):
        return F.dropout(super().forward(x), self.p, self.training)


def text_tower(model: nn.Module) -> nn.Module:
    """The text tower of an open_clip CLIP (`transformer`) or CustomTextCLIP (`text`)."""
    return model.text if hasattr(model, "text") else model.transformer


def add_text_dropout(model: nn.Module, p: float) -> int:
    """Put dropout with rate `p` on the text tower's residual branches; returns how many places got it."""
    tower = text_tower(model)
    blocks = [m for m in tower.modules() if isinstance(m, ResidualAttentionBlock)]
    if not blocks:  # a HF tower: its own dropout layers, at the asked rate
        layers = [m for m in tower.modules() if isinstance(m, nn.Dropout)]
        for layer in layers:
            layer.p = p
        return len(layers)
    for block in blocks:
        for name in ("ls_1", "ls_2"):
            slot = getattr(block, name)
            if isinstance(slot, LayerScale):
                slot.__class__ = DropoutLayerScale
                slot.p = p
            else:
                setattr(block, name, nn.Dropout(p))
    return 2 * len(blocks)
