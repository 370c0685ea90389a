"""i-Mix (Lee et al. 2021): mixup of the inputs with mixed virtual labels, for SimCLR, MoCo and CLIP.

Each batch draws lambda ~ Beta(alpha, alpha) and a permutation `partner` of its rows; image i becomes
`lambda * x_i + (1 - lambda) * x_partner[i]`, and its contrastive target (the other view, its key, its
caption) is mixed the same way: weight lambda on its own, 1 - lambda on its partner's (`info_nce`'s
`mix_labels` / `mix_weight`). The draw is stored with the features as a row offset `partner[i] - i` and the
lambda of each row, so micro-batches of the feature cache (each with its own draw) concatenate correctly.
The mixing draws from torch's global RNG (the feature cache replays it for the second pass).
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

PARTNER, LAMBDA = "imix_partner", "imix_lambda"


def mix_images(images: torch.Tensor, alpha: float) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The mixed images, and the features that record the draw."""
    rows = images.shape[0]
    lam = torch.distributions.Beta(alpha, alpha).sample().item()
    partner = torch.randperm(rows)
    mixed = lam * images + (1.0 - lam) * images[partner.to(images.device)]
    offsets = (partner - torch.arange(rows)).to(images.device)
    return mixed, {PARTNER: offsets, LAMBDA: torch.full((rows,), lam, device=images.device)}


def mix_targets(features: Dict[str, torch.Tensor]):
    """(partner, lambda) for the losses' `mix=` argument, or None when the batch was not mixed."""
    if PARTNER not in features:
        return None
    offsets = features[PARTNER]
    partner = torch.arange(len(offsets), device=offsets.device) + offsets
    return partner, features[LAMBDA].detach().float()
