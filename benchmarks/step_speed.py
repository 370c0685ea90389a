"""mmcl's optimizer step on synthetic in-memory batches: seconds per step, samples/s, model FLOPs.

    python benchmarks/step_speed.py RECIPE.yaml [--override key=value ...] [--count-flops]
    torchrun --nproc_per_node 2 benchmarks/step_speed.py RECIPE.yaml ...     # several processes

The run is set up by the trainer itself (mmcl.trainer.loop.start: Accelerator, objective, AdamW, gradient
sync, FSDP, compile) and steps with mmcl.trainer.loop.optimizer_step, so every switch of the recipe applies.
Batches are random images and tokens of the recipe's shapes, made once on the device (the ceiling the data
pipeline is measured against). The main process prints one JSON line: the median seconds per step, global
samples/s over the measured steps, the world size, the buckets the gradient sync sent during the backward
pass, and with --count-flops the model FLOPs per sample of one forward + backward
(torch.utils.flop_counter.FlopCounterMode on the plain path; the optimizer update is not model FLOPs).

The child of gpu_check.py (bf16 / compile / fp32 variants, overlap / FSDP on several GPUs) and of
scale_out_cpu.py (overlap vs after-backward with two gloo processes).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def synthetic_batch(run, batch_size: int) -> dict:
    import torch

    from mmcl.models import factory

    size = factory.image_size(run.model_cfg)
    context = run.model_cfg["text_cfg"].get("context_length", 77)
    device, g = run.accelerator.device, torch.Generator().manual_seed(run.accelerator.process_index)
    images = lambda: torch.randn(batch_size, 3, size, size, generator=g).to(device)  # noqa: E731
    return {"image": images(), "views": [images(), images()],
            "text": torch.randint(1, 49407, (batch_size, context), generator=g).to(device)}


def count_step_flops(run, batch) -> float:
    """Model FLOPs of one forward + backward of this process's batch."""
    from torch.utils.flop_counter import FlopCounterMode

    from mmcl.trainer import step as T

    counter = FlopCounterMode(display=False)
    with counter:
        T.plain_backward(run.objective, dict(batch), run.accelerator)
    run.optimizer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def measure(recipe_path: str, overrides, warmup: int, steps: int, count_flops: bool) -> dict:
    import torch

    from mmcl.config import load_recipe
    from mmcl.trainer import loop

    run, _ = loop.start(load_recipe(recipe_path, list(overrides) + [f"train.max_steps={warmup + steps}"]))
    batch_size, world = run.recipe.train.batch_size, run.accelerator.num_processes
    batch = synthetic_batch(run, batch_size)
    flops = count_step_flops(run, batch) / batch_size if count_flops else None
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    started = time.perf_counter()
    for _ in range(warmup):
        loop.optimizer_step(run, dict(batch))
    sync()
    warmup_seconds, times = time.perf_counter() - started, []
    for _ in range(steps):
        start = time.perf_counter()
        loop.optimizer_step(run, dict(batch))
        sync()
        times.append(time.perf_counter() - start)
    run.log.close()
    return {"seconds_per_step": statistics.median(times), "samples_per_s": steps * batch_size * world / sum(times),
            "world": world, "batch_per_process": batch_size, "warmup_seconds": warmup_seconds,
            "flops_per_sample": flops, "grad_buckets": len(run.grad_sync.buckets),
            "sent_in_backward": run.grad_sync.sent_in_backward, "threads": torch.get_num_threads(),
            "is_main": run.accelerator.is_main_process}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe")
    p.add_argument("--override", action="append", default=[], help="a recipe override key=value (repeatable)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--count-flops", action="store_true")
    args = p.parse_args(argv)
    result = measure(args.recipe, args.override, args.warmup, args.steps, args.count_flops)
    if result.pop("is_main"):
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
