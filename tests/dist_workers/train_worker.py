"""Training steps in several processes: ``torchrun --nproc_per_node 2 train_worker.py RECIPE OUT_DIR``.

Every process sets up the run with the trainer's own code (mmcl.train.loop.start: Accelerator, objective, AdamW,
schedule) and takes STEPS optimizer steps with mmcl.train.loop.optimizer_step on fixed, seeded in-memory global
batches of GLOBAL_ROWS rows, of which rank r takes rows [r*b, (r+1)*b), b = GLOBAL_ROWS / world size.
Per case, the main process writes OUT_DIR/CASE.safetensors (the final weights of every module) and
OUT_DIR/CASE.json (the loss of each step, averaged over processes).

tests/test_train_distributed.py runs :func:`train_steps` in one process on the whole batches and compares.
This module is also imported by that test, so it does nothing at import time.
"""
import json
import os
import sys
from pathlib import Path

import torch

STEPS = 3
GLOBAL_ROWS = 16
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CASES = {  # name -> recipe overrides
    "global_loss": ["objective.local_loss=false"],
    "local_loss": ["objective.local_loss=true", "optim.grad_clip=0.5"],
}


def global_batches(tokenizer, steps: int = STEPS, rows: int = GLOBAL_ROWS):
    """The same seeded images and captions on every process."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        images = torch.randn(rows, 3, 32, 32, generator=generator)
        picks = torch.randint(len(WORDS), (rows,), generator=generator).tolist()
        yield {"image": images, "text": tokenizer([f"a handwritten {WORDS[i]}" for i in picks])}


def train_steps(recipe_path: str, overrides: list):
    """Set up the run, take STEPS optimizer steps on this process's rows.

    Returns (run, mean loss of each step, largest change of any weight: the steps must have moved them)."""
    from mmcl.config import load_recipe
    from mmcl.distributed import all_reduce_mean_
    from mmcl.models import factory
    from mmcl.train import loop

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rows = GLOBAL_ROWS // world
    run, _ = loop.start(load_recipe(recipe_path, overrides + [f"train.batch_size={rows}", f"train.max_steps={STEPS}"]))
    assert run.accelerator.num_processes == world
    start = run.accelerator.process_index * rows
    initial = {key: value.clone() for key, value in run.objective.state_dict().items()}
    losses = []
    for batch in global_batches(factory.make_tokenizer(run.model_cfg)):
        mine = {key: value[start:start + rows] for key, value in batch.items()}
        out, finite = loop.optimizer_step(run, mine)
        assert finite
        loss = out["loss"].clone()
        all_reduce_mean_([loss])
        losses.append(float(loss))
    run.log.close()
    moved = max(float((value - initial[key]).abs().max()) for key, value in run.objective.state_dict().items())
    return run, losses, moved


def main(recipe_path: str, out_dir: str) -> None:
    from mmcl.models.weights import save_weights

    out = Path(out_dir)
    for name, overrides in CASES.items():
        run, losses, moved = train_steps(recipe_path, overrides + [f"train.output_dir={out / ('run_' + name)}"])
        if run.accelerator.is_main_process:
            save_weights(run.objective.state_dict(), out / f"{name}.safetensors")
            backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
            report = {"losses": losses, "moved": moved, "world": run.accelerator.num_processes, "backend": backend}
            (out / f"{name}.json").write_text(json.dumps(report))
        run.accelerator.wait_for_everyone()


if __name__ == "__main__":
    from mmcl.distributed import shutdown

    main(sys.argv[1], sys.argv[2])
    shutdown()
