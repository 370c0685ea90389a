"""The text-side term of CLIP: SimCSE (Gao et al. 2021) with ConSERT's token views (Yan et al. 2021).

SimCSE encodes each caption twice with dropout on (`model.text_dropout`) and contrasts the two embeddings:
row i of the first against the second views of the global batch, temperature 0.05, in-batch negatives (one
direction, as the paper). mmcl reuses the CLIP text embedding as the first view, so the term costs one more
text-tower pass. The second view can also take ConSERT-style token augmentations of the caption ids:
`token_shuffle` puts the word tokens in a random order, `token_cutoff` removes a fraction of them (ConSERT's
token cutoff zeroes their embeddings; removing the ids leaves open_clip's towers untouched). The first token
(start / CLS), the last non-padding token (end / SEP, where open_clip pools) and the padding (id 0) stay.
"""
from __future__ import annotations

import torch
from torch import nn

from mmcl.distributed import all_gather_with_grad, get_rank
from mmcl.losses import diagonal_labels, info_nce, l2_normalize

PAD_ID = 0  # open_clip's SimpleTokenizer and BERT-style HF tokenizers pad with 0


@torch.no_grad()
def token_views(tokens: torch.Tensor, shuffle: bool, cutoff: float) -> torch.Tensor:
    """A copy of the (N, L) caption ids with the word tokens shuffled and / or a fraction removed."""
    if not shuffle and not cutoff:
        return tokens
    out = torch.full_like(tokens, PAD_ID)
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    lengths = (torch.where(tokens != PAD_ID, positions, -1).max(1).values + 1).tolist()  # "!" is id 0 too
    for row, length in enumerate(lengths):
        ids = tokens[row, :length]
        words = ids[1:-1]
        if shuffle:
            words = words[torch.randperm(len(words))]
        if cutoff and len(words) > 1:
            keep = torch.randperm(len(words))[: max(1, round(len(words) * (1 - cutoff)))].sort().values
            words = words[keep]
        view = torch.cat([ids[:1], words, ids[-1:]]) if length > 1 else ids
        out[row, : len(view)] = view
    return out


class SimCSELoss(nn.Module):
    """Unsupervised SimCSE: view 1 of caption i against view 2 of every caption of the global batch."""

    def __init__(self, temperature: float = 0.05):
        super().__init__()
        self.temperature = temperature

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        first, second = l2_normalize(first), l2_normalize(second)
        labels = diagonal_labels(first.shape[0], get_rank() * first.shape[0], device=first.device)
        return info_nce(first, all_gather_with_grad(second), 1.0 / self.temperature, labels)
