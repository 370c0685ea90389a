"""Process-group helpers for mmcl: rank and world size, gathers that keep autograd, gradient averaging.

Accelerate initialises ``torch.distributed`` (gloo on CPU, NCCL on GPU); everything here reads that state and
falls back to single-process behaviour (identity gathers, rank 0, world size 1) when no group is initialised.

Gradient convention used by every mmcl loss: the mean of the per-rank losses equals the loss of one process
on the global batch, and after :func:`all_reduce_mean_` of the parameter gradients every parameter gradient
equals the single-process one. Gradients w.r.t. a rank's own features are therefore ``world_size`` times the
single-process ones (the mean over ranks divides them back).
"""

from typing import Iterable, List

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def is_distributed() -> bool:
    """True when a torch.distributed process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """Rank of this process (0 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def get_world_size() -> int:
    """Number of processes (1 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def check_same_batch_size(tensor: torch.Tensor) -> None:
    """Raise ValueError on every rank when the first dimension differs between ranks.

    all_gather needs equal shapes; with unequal ones it would hang or return garbage, so the sizes are
    exchanged first (one tiny collective) and every rank raises the same error.
    """
    size = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(get_world_size())]
    dist.all_gather(sizes, size)
    sizes = [int(s.item()) for s in sizes]
    for other_rank, other in enumerate(sizes):
        if other != sizes[0]:
            raise ValueError(
                "all ranks must gather the same batch size: "
                f"rank 0 has {sizes[0]}, rank {other_rank} has {other} (sizes per rank: {sizes})"
            )


def _gather_list(tensor: torch.Tensor) -> List[torch.Tensor]:
    parts = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return parts


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: all_gather along dim 0. Backward: sum the gradients over ranks, keep this rank's slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rows = tensor.shape[0]
        return torch.cat(_gather_list(tensor), dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        rank, rows = get_rank(), ctx.rows
        if dist.get_backend() == "nccl":
            # reduce_scatter moves world_size times less data than all_reduce; gloo does not have it.
            out = torch.empty((rows,) + grad.shape[1:], device=grad.device, dtype=grad.dtype)
            dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM)
            return out
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[rank * rows:(rank + 1) * rows]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, keeping autograd.

    The backward pass sums the incoming gradients over ranks and returns this rank's slice, so a loss
    computed from the gathered tensor on every rank sends each rank's features the gradient of the sum of
    all per-rank losses. Identity when not distributed. Raises ValueError for unequal batch sizes.
    """
    if not is_distributed():
        return tensor
    check_same_batch_size(tensor)
    return _AllGatherWithGrad.apply(tensor)


@torch.no_grad()
def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0 without autograd (e.g. MoCo keys for the queue)."""
    if not is_distributed():
        return tensor.detach()
    check_same_batch_size(tensor)
    return torch.cat(_gather_list(tensor.detach()), dim=0)


def _ring_exchange(tensor: torch.Tensor, to_rank: int, from_rank: int) -> torch.Tensor:
    received = torch.empty_like(tensor)
    ops = [dist.P2POp(dist.isend, tensor.contiguous(), to_rank),
           dist.P2POp(dist.irecv, received, from_rank)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


class _RingExchangeWithGrad(torch.autograd.Function):
    """Send to the right neighbour, receive from the left; the gradient travels back the other way."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        rank, world = get_rank(), get_world_size()
        return _ring_exchange(tensor, (rank + 1) % world, (rank - 1) % world)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        rank, world = get_rank(), get_world_size()
        return _ring_exchange(grad, (rank - 1) % world, (rank + 1) % world)


def ring_exchange_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Return the left neighbour's ``tensor`` (rank - 1), with autograd; identity when not distributed."""
    if not is_distributed():
        return tensor
    check_same_batch_size(tensor)
    return _RingExchangeWithGrad.apply(tensor)


@torch.no_grad()
def all_reduce_mean_(tensors: Iterable[torch.Tensor]) -> None:
    """Average tensors (usually parameter gradients) over ranks in place, one all_reduce per dtype/device.

    The trainer calls this instead of wrapping the model in DDP; tensors are flattened into one bucket per
    (device, dtype) so a model with hundreds of parameters costs one collective, not hundreds.
    """
    if not is_distributed():
        return
    buckets = {}
    for tensor in tensors:
        if tensor is not None:
            buckets.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    world = get_world_size()
    for bucket in buckets.values():
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world)
        for tensor, averaged in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            tensor.copy_(averaged)


def shutdown() -> None:
    """End the process group at the end of a program: a gloo group left to the interpreter's exit can abort
    the process ("terminate called without an active exception") after all the work is done. Call it once
    every process is done communicating."""
    if is_distributed():
        dist.destroy_process_group()
