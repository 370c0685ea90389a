"""Gradient averaging across processes, launched bucket by bucket while the backward pass still runs.

The trainer does not wrap the towers in DDP: the feature cache back-propagates in several pieces (the loss
once, then each micro-batch's towers) and the loss' own parameters (temperature, bias) get their gradients
outside any tower forward, which DDP's forward-driven hooks do not follow. `GradSync` does what DDP's reducer
does, from the gradients' side instead of the forward's:

- a post-accumulate-grad hook on every trainable parameter counts the parameters of its bucket whose gradient
  is complete; when a bucket is complete, and every bucket before it has been launched, its gradients are
  flattened and an asynchronous all-reduce starts while autograd goes on with the layers below;
- only the last backward pass of a step is *armed* (`arm()`): with the feature cache, the earlier micro-batches
  only accumulate, like DDP's `no_sync`, and their gradients travel once, summed;
- `finish()` launches what the hooks did not (the loss' parameters under the feature cache, anything unused),
  waits, and writes the averages back.

Buckets follow the order in which gradients became ready in the first step (DDP rebuilds its buckets the same
way), so they fill from the top layers down as the backward pass reaches them; every process runs the same
graph, so they launch their collectives in the same order. The first step reduces everything after backward.

The sums are the same sums as the after-backward all-reduce (same values, same reduction), so the averaged
gradients are bit for bit those of `train.grad_sync: after_backward`.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from mmcl import distributed

MODES = ("overlap", "after_backward")


class Bucket:
    """Parameters reduced together, and the collective in flight for them."""

    def __init__(self, params: List[torch.Tensor]):
        self.params = params
        self.pending = len(params)
        self.flat: Optional[torch.Tensor] = None
        self.work = None

    def reset(self) -> None:
        self.pending, self.flat, self.work = len(self.params), None, None

    def launch(self, async_op: bool) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            self.flat = _flatten_dense_tensors(grads)
            self.work = dist.all_reduce(self.flat, op=dist.ReduceOp.SUM, async_op=async_op)

    def settle(self, world: int) -> None:
        """Wait for the sum, then write the averages into the gradients."""
        if self.flat is None:
            return
        if self.work is not None:
            self.work.wait()
        self.flat.div_(world)
        grads = [p.grad for p in self.params if p.grad is not None]
        for grad, averaged in zip(grads, _unflatten_dense_tensors(self.flat, grads)):
            grad.copy_(averaged)


class GradSync:
    """Average the gradients of `params` over processes; with `mode="overlap"`, during the backward pass.

    Usage per step: `arm()` just before the step's last backward pass, then `finish()` after it. Parameters
    handled by FSDP (DTensors) are not given: FSDP reduce-scatters their gradients itself.
    """

    def __init__(self, params: List[torch.Tensor], mode: str = "overlap", bucket_mb: float = 25.0):
        if mode not in MODES:
            raise ValueError(f"train.grad_sync: must be one of {', '.join(MODES)}; got {mode!r}")
        self.params, self.mode = list(params), mode
        self.bucket_bytes = max(1, int(bucket_mb * 2 ** 20))
        self.world = distributed.get_world_size()
        self.armed = False
        self.order: List[int] = []  # first step: the order in which gradients became ready
        self.buckets: List[Bucket] = []
        self.bucket_of: dict = {}  # parameter index -> bucket index
        self.next_launch = 0
        self.sent_in_backward = 0  # buckets the last step sent while its backward pass ran (tests, benchmarks)
        self.hooks = []
        if self.world > 1 and mode == "overlap":
            self.hooks = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(self.params)]

    def _hook(self, index: int):
        def ready(param: torch.Tensor) -> None:
            if not self.armed:
                return
            if not self.buckets:
                self.order.append(index)
                return
            bucket = self.bucket_of.get(index)
            if bucket is not None:
                self.buckets[bucket].pending -= 1
                self._launch_ready()
        return ready

    def _launch_ready(self) -> None:
        """Launch complete buckets in bucket order (every process issues its collectives in the same order)."""
        while self.next_launch < len(self.buckets) and self.buckets[self.next_launch].pending == 0:
            self.buckets[self.next_launch].launch(async_op=True)
            self.next_launch += 1

    def arm(self) -> None:
        """The next backward pass is the step's last: its finished gradients may be sent."""
        self.armed = True

    def finish(self) -> None:
        """Send what the hooks did not, wait for every bucket, and leave averaged gradients in `.grad`."""
        self.armed = False
        if self.world == 1:
            return
        if not self.buckets:  # after_backward, or the first step of overlap
            distributed.all_reduce_mean_([p.grad for p in self.params if p.grad is not None])
            if self.mode == "overlap":
                self._build_buckets()
            return
        self.sent_in_backward = self.next_launch
        for bucket in self.buckets[self.next_launch:]:
            bucket.launch(async_op=True)
        for bucket in self.buckets:
            bucket.settle(self.world)
            bucket.reset()
        self.next_launch = 0

    def _build_buckets(self) -> None:
        """Buckets of about `bucket_bytes` in the order the gradients became ready (one dtype and device each);
        the parameters that never became ready in an armed pass go last, in one bucket per dtype."""
        seen = set(self.order)
        rest = [i for i, p in enumerate(self.params) if i not in seen]
        groups: List[List[int]] = []
        size, key = 0, None
        for i in self.order + rest:
            p = self.params[i]
            this = (p.device, p.dtype, i in seen)
            if not groups or key != this or size >= self.bucket_bytes:
                groups.append([])
                size, key = 0, this
            groups[-1].append(i)
            size += p.numel() * p.element_size()
        self.buckets = [Bucket([self.params[i] for i in group]) for group in groups]
        # the last buckets (never ready in an armed pass) have no hook counting down: finish() sends them
        self.bucket_of = {i: b for b, group in enumerate(groups) for i in group if i in seen}

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
