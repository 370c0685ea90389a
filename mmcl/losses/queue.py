"""A FIFO queue of negative features kept in module buffers (MoCo's queue, lightly's memory bank).

The queue is a ``(size, dim)`` buffer plus a one-element ``ptr`` buffer holding the next row to overwrite;
being buffers, both are in ``state_dict`` so a checkpoint resumes with the same negatives. Writes wrap
around, so ``size`` need not be a multiple of the batch.
"""

import torch

from mmcl.distributed import all_gather_no_grad
from mmcl.losses.infonce import l2_normalize


def random_queue(size: int, dim: int) -> torch.Tensor:
    """Initial queue: unit-length random rows (MoCo's initialisation)."""
    return l2_normalize(torch.randn(size, dim))


@torch.no_grad()
def enqueue_(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor, gather: bool = True) -> None:
    """Write ``keys`` (detached; gathered from all ranks when ``gather``) at ``ptr``, oldest rows first out.

    Rows past the end wrap to the start. With more keys than rows only the newest ``size`` keys are kept.
    """
    keys = all_gather_no_grad(keys) if gather else keys.detach()
    size, count, start = queue.shape[0], keys.shape[0], int(ptr[0])
    rows = (start + torch.arange(count, device=queue.device)) % size
    if count > size:  # older keys would be overwritten within this same write anyway
        rows, keys = rows[-size:], keys[-size:]
    queue[rows] = keys.to(queue.dtype)
    ptr[0] = (start + count) % size
