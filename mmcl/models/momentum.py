"""Momentum (EMA) copies of towers and heads: MoCo's key encoder, the cross-modal queue's key towers."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen copy that only ever changes through `ema_update`."""
    twin = copy.deepcopy(module)
    for param in twin.parameters():
        param.requires_grad_(False)
    return twin


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """target <- m * target + (1 - m) * source, for parameters; buffers (BN statistics) are copied."""
    for t, s in zip(target.parameters(), source.parameters()):
        t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)
    for t, s in zip(target.buffers(), source.buffers()):
        t.copy_(s)


def cosine_momentum(base: float, step: int, total_steps: int) -> float:
    """BYOL / MoCo v3 schedule: from `base` up to 1 along a half cosine."""
    if total_steps <= 0:
        return base
    progress = min(step / total_steps, 1.0)
    return 1 - (1 - base) * (math.cos(math.pi * progress) + 1) / 2


def ema_step(pairs, base: float, step: int, total_steps: int, cosine: bool) -> float:
    """Move every target of the (target, source) pairs by this step's momentum and return it: `base`, or with
    `cosine` `base` raised towards 1 along a half cosine (BYOL, MoCo v3). Called before the step's forward."""
    momentum = cosine_momentum(base, step, total_steps) if cosine else base
    for target, source in pairs:
        ema_update(target, source, momentum)
    return momentum
