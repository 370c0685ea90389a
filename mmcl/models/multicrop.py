"""Image towers on views of another size than they were built for (SwAV's small multi-crop views).

Convolutional towers (timm ResNets) take any size. An open_clip ViT has a fixed grid of positional
embeddings; for another size (a multiple of the patch size) the grid is resized by bicubic interpolation
(DINO's `interpolate_pos_encoding`), and the tower runs with the resized embeddings in place of its own
through `torch.func.functional_call`, so the gradient still reaches the original parameter. open_clip's
ModifiedResNet pools with a fixed-size attention and is refused.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from open_clip.model import ModifiedResNet
from open_clip.transformer import VisionTransformer
from torch import nn
from torch.func import functional_call


def _pair(value) -> Tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def check_view_size(visual: nn.Module, size: int, key: str = "data.small_view_size") -> None:
    """Raise ValueError naming `key` when `visual` cannot take square views of `size` pixels."""
    if size == _pair(getattr(visual, "image_size", size))[0]:
        return
    if isinstance(visual, ModifiedResNet):
        raise ValueError(f"{key}: {size} px views need a tower that takes other sizes than its image_size "
                         f"{visual.image_size}; open_clip's ModifiedResNet does not (use a timm tower or a ViT)")
    if isinstance(visual, VisionTransformer):
        patch = _pair(visual.patch_size)[0]
        if size % patch:
            raise ValueError(f"{key}: {size} px is not a multiple of the ViT's patch size {patch}")


def resized_positional_embedding(visual: VisionTransformer, height: int, width: int) -> torch.Tensor:
    """The tower's positional embeddings for a (height / patch) x (width / patch) grid (class token kept)."""
    grid = _pair(visual.grid_size)
    patch = _pair(visual.patch_size)
    pos = visual.positional_embedding
    first, rest = pos[:1], pos[1:]
    rest = rest.reshape(1, grid[0], grid[1], -1).permute(0, 3, 1, 2)
    rest = F.interpolate(rest.float(), size=(height // patch[0], width // patch[1]), mode="bicubic",
                         align_corners=False).to(pos.dtype)
    return torch.cat([first, rest.permute(0, 2, 3, 1).reshape(-1, pos.shape[-1])])


def encode_any_size(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """`visual(images)` for images of any size the tower can take (see the module docstring)."""
    height, width = images.shape[-2:]
    if not isinstance(visual, VisionTransformer) or (height, width) == _pair(visual.image_size):
        return visual(images)
    pos = resized_positional_embedding(visual, height, width)
    return functional_call(visual, {"positional_embedding": pos}, (images,))
