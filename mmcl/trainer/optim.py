"""AdamW with the usual contrastive-training parameter groups, and the warmup + cosine schedule."""
from __future__ import annotations

import math
from typing import List

import torch
from torch import nn

from mmcl.config import OptimConfig
from mmcl.trainer.fsdp import split_param_groups

# Parameters that must not decay: gains, biases, embeddings, and the temperature/bias of the loss.
NO_DECAY_NAMES = ("logit_scale", "logit_bias", "positional_embedding", "class_embedding", "token_embedding",
                  "embeddings", "cls_token", "pos_embed", "queue")


def exclude_from_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, norm gains, and other 1-d tensors, plus embeddings and the temperature: as open_clip does."""
    return param.ndim < 2 or any(part in name for part in NO_DECAY_NAMES) or "norm" in name or name.endswith(".bias")


def param_groups(module: nn.Module, weight_decay: float) -> List[dict]:
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if param.requires_grad:
            (no_decay if exclude_from_decay(name, param) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return split_param_groups(groups)  # FSDP: sharded and replicated parameters apart (one kind per kernel)


def make_optimizer(module: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(module, cfg.weight_decay)
    if not any(group["params"] for group in groups):
        raise ValueError("nothing to train: every parameter is frozen (check model.lock_image / lock_text)")
    # the fused kernel updates every tensor in one pass; torch's CPU default is a Python loop over tensors
    fused = cfg.fused and all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
                              for group in groups for p in group["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Linear warmup to 1, then cosine (or constant) down to min_lr_ratio at total_steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))
