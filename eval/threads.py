"""How many torch threads the model gets on a CPU while loading runs beside it: a rule from FLOPs per pixel.

Loading (reading tars, decoding, resizing, converting, tokenizing) and the model share the machine's cores.
Which split is best depends on which of the two needs more CPU per image:
- the model dominates (any realistic model): every core to the model. A loader that needs little CPU
  costs little when it time-shares a core, and on 2 cores the second thread nearly doubles the model's speed;
- loading dominates (tiny models): the model waits for data anyway, and OpenMP threads that share cores
  with busy loaders stall at every barrier; the model gets the cores the loaders leave free
  (cores - loaders; loaders = DataLoader workers, or 1 for the background thread).

Both costs grow with the image the model takes: loading with its pixels (the resize, the float conversion
and the transfer scale with H x W), the model with its FLOPs. So the rule compares the image tower's FLOPs
per input pixel, counted once with torch's FlopCounterMode on the first image, to `MODEL_BOUND_FLOPS_PER_PIXEL`:
at or above it the model gets every core, below it the cores the loaders leave free. The constant comes from
measurements on the 2-core development machine (README, "Threads"): loading costs about 60-200 ns of CPU per
input pixel (0.2 ms per CIFAR image at 32-64 px), one core runs a transformer at about 50 GFLOP/s, so a model
needs about 10,000 FLOPs per pixel before it needs twice the CPU of its loading (where two threads win even
if a busy loader stalls one of them: M/2 + L < M when L < M/2). Tiny models sit far below (the 32 px test
model: 2,600 FLOPs per pixel), real ones far above (a 64 px ViT of 4 layers: 57,000; ViT-B/32: 117,000).

A rule, not a timing: the same command on the same machine always runs with the same threads. Metrics do
not depend on the thread count anyway (tests/test_eval_threads.py checks them bit for bit). A thread count
given by the user is used as it is; GPUs are left alone. The most threads the model gets is what torch had
when the pass began (the machine's cores unless OMP_NUM_THREADS or torch.set_num_threads said otherwise).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

MODEL_BOUND_FLOPS_PER_PIXEL = 10_000


def image_flops(model: torch.nn.Module, images: torch.Tensor) -> float:
    """FLOPs of the image tower for one image (counted by torch, whatever the tower is; in float32: under
    autocast the attention takes another path that counts differently)."""
    from torch.utils.flop_counter import FlopCounterMode

    no_autocast = torch.autocast(images.device.type, enabled=False)
    with torch.inference_mode(), no_autocast, FlopCounterMode(display=False) as counter:
        model.encode_image(images[:1])
    return float(counter.get_total_flops())


@dataclass
class ThreadPolicy:
    """The model's torch threads during one embedding pass (see the module docstring)."""

    cores: int  # the most threads the model may have
    loaders: int  # cores loading keeps busy: DataLoader workers, or 1 for the background thread
    threads: Optional[int] = None  # given by the user: used as it is
    adaptive: bool = True  # False on a GPU, or when `threads` is given
    flops_per_pixel: Optional[float] = None
    chosen: Optional[int] = None

    @classmethod
    def for_pass(cls, device, workers: int, threads: Optional[int] = None) -> "ThreadPolicy":
        cpu = torch.device(device).type == "cpu"
        return cls(torch.get_num_threads(), max(1, workers), threads, adaptive=cpu and threads is None)

    def choose(self, model: torch.nn.Module, images: torch.Tensor) -> None:
        """Set the threads from the first batch's images (once; only when adaptive)."""
        if not self.adaptive or self.chosen is not None:
            return
        self.flops_per_pixel = image_flops(model, images) / (images.shape[-1] * images.shape[-2])
        self.chosen = self.threads_for(self.flops_per_pixel)
        torch.set_num_threads(self.chosen)

    def threads_for(self, flops_per_pixel: float) -> int:
        if flops_per_pixel >= MODEL_BOUND_FLOPS_PER_PIXEL:
            return self.cores
        return max(1, self.cores - self.loaders)

    def summary(self) -> dict:
        """What the pass used: threads, and the FLOPs per pixel they were chosen from (None: not chosen)."""
        flops = round(self.flops_per_pixel) if self.flops_per_pixel is not None else None
        return {"threads": self.threads or self.chosen or torch.get_num_threads(), "flops_per_pixel": flops}

    @contextlib.contextmanager
    def applied(self):
        """The user's threads for the block when given, then torch's previous setting back."""
        before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            yield self
        finally:
            torch.set_num_threads(before)


@contextlib.contextmanager
def fixed_threads(threads: Optional[int]):
    """torch's intra-op threads set to `threads` for the block (None: unchanged)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
