"""One optimizer step: forward, backward (plain or feature-cached accumulation), gradient sync, update."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from mmcl import distributed
from mmcl.objectives import Objective
from mmcl.trainer import fsdp

BATCH_KEYS = ("image", "text", "label")


def batch_size_of(batch: dict) -> int:
    for key in BATCH_KEYS:
        if key in batch:
            return len(batch[key])
    return len(batch["views"][0])


def to_device(batch: dict, device: torch.device) -> dict:
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            out[key] = value.to(device, non_blocking=True)
        elif key == "views":
            out[key] = [v.to(device, non_blocking=True) for v in value]
        else:
            out[key] = value
    return out


def split_batch(batch: dict, parts: int) -> List[dict]:
    """Cut a batch into `parts` equal micro-batches (tensors, view lists and caption lists alike)."""
    size = batch_size_of(batch) // parts
    micro = []
    for i in range(parts):
        piece = slice(i * size, (i + 1) * size)
        mb = {}
        for key, value in batch.items():
            if key == "skipped":
                continue
            mb[key] = [v[piece] for v in value] if key == "views" else value[piece]  # keys too (PCL reads them)
        micro.append(mb)
    return micro


class RngSnapshot:
    """The RNG state before a micro-batch's first forward, so its recompute draws the same dropout/masks."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def plain_backward(objective: Objective, batch: dict, accelerator, sync=None) -> Dict[str, torch.Tensor]:
    """Forward and backward over the whole batch; `sync` (a GradSync) sends gradients as they become ready."""
    with accelerator.autocast():
        losses = objective(batch)
    if sync is not None:
        sync.arm()
    accelerator.backward(losses["loss"])
    return {k: v.detach() for k, v in losses.items()}


def leaf(features: torch.Tensor) -> torch.Tensor:
    """A cached feature as a leaf that collects its gradient (integer features, such as labels, collect none)."""
    return features.detach().requires_grad_(features.is_floating_point())


def cached_backward(objective: Objective, micro_batches: List[dict], accelerator,
                    sync=None) -> Dict[str, torch.Tensor]:
    """Feature-cache accumulation (GradCache): exact gradients of the loss over the whole batch.

    1) encode every micro-batch without gradients; 2) compute the loss once over all features (so every
    micro-batch sees the negatives of the whole batch) and back-propagate to the features; 3) re-encode each
    micro-batch with gradients and push the cached feature gradients through the towers. `sync` (a GradSync)
    is armed for the last micro-batch only: the earlier ones accumulate, and the sums travel once.
    """
    snapshots, chunks = [], []
    with torch.no_grad():
        for mb in micro_batches:
            snapshots.append(RngSnapshot(accelerator.device))
            with accelerator.autocast():
                chunks.append(objective.encode(mb))
    after_encode = RngSnapshot(accelerator.device)
    # features that are not floating point (labels, PCL's cluster rows) ride along without gradients
    leaves = {k: leaf(torch.cat([c[k] for c in chunks])) for k in chunks[0]}
    with accelerator.autocast():
        losses = objective.losses(leaves)
    accelerator.backward(losses["loss"])
    offset = 0
    for index, (mb, snapshot) in enumerate(zip(micro_batches, snapshots)):
        size = batch_size_of(mb)
        snapshot.restore()
        with accelerator.autocast():
            out = objective.encode(mb)
        pairs = [(out[k], leaves[k].grad[offset:offset + size]) for k in out
                 if out[k].requires_grad and leaves[k].grad is not None]
        if sync is not None and index == len(micro_batches) - 1:
            sync.arm()
        if pairs:
            torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs])
        offset += size
    after_encode.restore()  # the RNG continues as if each micro-batch had been encoded once
    return {k: v.detach() for k, v in losses.items()}


def grad_norm(params: List[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of the gradients (one fused pass), as torch's clip_grad_norm_ computes it.
    FSDP-sharded gradients add their shards' squared norms over processes."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    sharded = fsdp.local([g for g in grads if fsdp.is_dtensor(g)])
    if not sharded:
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    square = torch.stack(torch._foreach_norm(sharded)).square().sum()
    torch.distributed.all_reduce(square)
    plain = [g for g in grads if not fsdp.is_dtensor(g)]
    if plain:
        square = square + torch.stack(torch._foreach_norm(plain)).square().sum()
    return square.sqrt()


def clip_gradients(params: List[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
    """Scale the gradients down to `max_norm` when `norm` exceeds it (torch's clip_grad_norm_ rule)."""
    grads = fsdp.local([p.grad for p in params if p.grad is not None])
    if grads:
        torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))


def all_finite(loss: torch.Tensor, norm: Optional[torch.Tensor] = None) -> bool:
    """True when the loss and the gradient norm are finite on every process (all must agree to skip a step).
    A finite loss can still have an inf or NaN gradient, which would poison the weights; the global norm is
    non-finite exactly when some gradient is, and costs one pass instead of one check per parameter."""
    checks = [torch.isfinite(loss).all()] + ([torch.isfinite(norm)] if norm is not None else [])
    flag = torch.stack(checks).all().float().reshape(1)
    if distributed.is_distributed():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item() > 0)


def trainable(module: nn.Module) -> List[torch.Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


def sync_gradients(params: List[torch.Tensor]) -> None:
    """Average gradients over processes with one bucketed all-reduce (no DDP wrapper: see README).

    Every process runs the same code on the same towers, so the set of parameters with a gradient is the
    same everywhere; parameters without one (unused this step) are left alone.
    """
    if distributed.is_distributed():
        distributed.all_reduce_mean_([p.grad for p in params if p.grad is not None])
