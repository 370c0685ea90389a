"""Locked towers cut in two: the frozen part, whose outputs can be computed once, and the part that trains.

LiT (Zhai et al. 2022) locks a pretrained tower; what is locked computes the same output for the same input
for the whole run, so mmcl's locked-feature cache (mmcl.trainer.locked_cache) stores it and runs only the rest.
`TowerSplit.trainable(TowerSplit.frozen(x))` equals the tower's output (unnormalised features) exactly:
- a tower with no trainable parameter at all: frozen = the whole tower, trainable = nothing;
- a timm tower with a locked trunk: frozen = the trunk (pooled), trainable = the projection head;
- a timm EfficientNet-family trunk with its last groups unlocked (`model.lock_image_unlocked_groups`):
  frozen = the stem and the locked blocks, trainable = the unlocked blocks, the head conv, pooling, head;
- an HF text tower with a locked transformer: frozen = transformer + pooling, trainable = the projection.
Anything else (e.g. unlocked layers inside an HF or open_clip text tower) is not split: it runs every step.

Locked parts run in eval mode (`keep_locked_in_eval`): a locked tower with active dropout would give other
features at every step, which is neither what "locked" means nor cacheable.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn


@dataclass
class TowerSplit:
    """`frozen(input)` -> what the cache stores; `trainable(stored)` -> the tower's features."""

    frozen: Callable[[torch.Tensor], torch.Tensor]
    trainable: Callable[[torch.Tensor], torch.Tensor]
    frozen_state: Callable[[], Dict[str, torch.Tensor]]  # the frozen weights: part of the cache's fingerprint
    where: str  # the cut, in words (logged, and part of the fingerprint)
    frozen_repr: str  # the frozen layers as PyTorch prints them (their kinds and settings): fingerprinted too
    pad_id: Optional[int] = None  # text towers that mask padding: trailing pad tokens may be cut before `frozen`


def state_of(*modules: nn.Module) -> Callable[[], Dict[str, torch.Tensor]]:
    return lambda: {f"{i}.{k}": v for i, m in enumerate(modules) for k, v in m.state_dict().items()}


def repr_of(*modules: nn.Module) -> str:
    return "\n".join(repr(m) for m in modules)


def is_frozen(module: nn.Module) -> bool:
    return all(not p.requires_grad for p in module.parameters())


def has_frozen_weights(module: nn.Module) -> bool:
    params = list(module.parameters())
    return bool(params) and all(not p.requires_grad for p in params)


def keep_locked_in_eval(module: nn.Module) -> None:
    """Put every largest submodule whose weights are all frozen in eval mode (dropout off, BN statistics
    fixed); call after `.train()`. Submodules without weights follow their parent."""
    for child in module.children():
        if has_frozen_weights(child):
            child.eval()
        else:
            keep_locked_in_eval(child)


def freeze_locked_batch_norm(module: nn.Module) -> nn.Module:
    """Fixed statistics for every BatchNorm whose weights are locked, by timm's own conversion, which keeps
    the activation of timm's fused BatchNormAct2d. (open_clip's `freeze_bn_stats` turns a BatchNormAct2d into
    a plain FrozenBatchNorm2d and so drops the activation: a locked EfficientNet then computes garbage.)"""
    from timm.layers import freeze_batch_norm_2d

    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and has_frozen_weights(child):
            module.add_module(name, freeze_batch_norm_2d(child))
        else:
            freeze_locked_batch_norm(child)
    return module


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def split_image_tower(model: nn.Module) -> Optional[TowerSplit]:
    """The image tower's split, or None when its first layer trains (nothing to cache)."""
    visual = model.visual
    if is_frozen(visual):
        return TowerSplit(visual, identity, state_of(visual), "the whole image tower", repr_of(visual))
    trunk = getattr(visual, "trunk", None)
    if trunk is None:
        return None
    if is_frozen(trunk):
        return TowerSplit(trunk, visual.head, state_of(trunk), "the timm trunk (pooled)", repr_of(trunk))
    stages = efficientnet_stages(trunk)
    if stages is None:
        return None
    first = next(i for i, (_, m) in enumerate(stages) if not is_frozen(m))
    if first == 0:
        return None
    locked, rest = [m for _, m in stages[:first]], [m for _, m in stages[first:]]
    return TowerSplit(Chain(locked), Chain(rest + [trunk.forward_head, visual.head]), state_of(*locked),
                      f"the timm trunk before {stages[first][0]}", repr_of(*locked))


def efficientnet_stages(trunk: nn.Module) -> Optional[List[Tuple[str, nn.Module]]]:
    """timm EfficientNet-family trunks in forward order: stem, every block, head conv (forward_features)."""
    if not all(hasattr(trunk, n) for n in ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "forward_head")):
        return None
    stages = [("conv_stem", trunk.conv_stem), ("bn1", trunk.bn1)]
    for i, stage in enumerate(trunk.blocks):
        stages += [(f"blocks.{i}.{j}", block) for j, block in enumerate(stage)]
    return stages + [("conv_head", trunk.conv_head), ("bn2", trunk.bn2)]


class Chain:
    """Callables applied in order (modules stay where they are: no new parameters, names or state)."""

    def __init__(self, steps: Sequence[Callable]):
        self.steps = list(steps)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            x = step(x)
        return x


def split_text_tower(model: nn.Module) -> Optional[TowerSplit]:
    """The text tower's split, or None when it cannot be cut (unlocked layers inside it)."""
    text = getattr(model, "text", None)
    if text is not None and is_frozen(text):
        return TowerSplit(text, identity, state_of(text), "the whole text tower", repr_of(text), hf_pad_id(text))
    if text is None:  # open_clip's CLIP: the text tower is the model's own non-visual attributes
        if any(p.requires_grad for n, p in model.named_parameters() if not n.startswith(("visual.", "logit_"))):
            return None
        state = lambda: {k: v for k, v in model.state_dict().items() if not k.startswith(("visual.", "logit_"))}
        return TowerSplit(lambda tokens: model.encode_text(tokens), identity, state, "the whole text tower",
                          repr_of(model.token_embedding, model.transformer, model.ln_final))
    if is_hf(text) and is_frozen(text.transformer):
        return TowerSplit(HFPooled(text), text.proj, state_of(text.transformer), "the HF transformer (pooled)",
                          repr_of(text.transformer, text.pooler), hf_pad_id(text))
    return None


def is_hf(text: nn.Module) -> bool:
    return hasattr(text, "transformer") and hasattr(text, "pooler") and hasattr(text, "proj")


def hf_pad_id(text: nn.Module) -> Optional[int]:
    """An HF tower masks its pad tokens (open_clip's HFTextEncoder), so cutting trailing ones changes nothing."""
    return text.config.pad_token_id if is_hf(text) else None


class HFPooled:
    """open_clip's HFTextEncoder up to its projection: transformer, then pooling over the non-pad tokens."""

    def __init__(self, text: nn.Module):
        self.text = text

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = (tokens != self.text.config.pad_token_id).long()
        out = self.text.transformer(input_ids=tokens, attention_mask=mask)
        return self.text.pooler(out, mask)
