"""Training steps in several processes: ``torchrun --nproc_per_node 2 train_worker.py RECIPE OUT_DIR``.

Every process sets up the run with the trainer's own code (mmcl.trainer.loop.start: Accelerator, objective, AdamW,
schedule, gradient sync, FSDP) and takes STEPS optimizer steps with mmcl.trainer.loop.optimizer_step on fixed,
seeded in-memory global batches of GLOBAL_ROWS rows, of which rank r takes rows [r*b, (r+1)*b),
b = GLOBAL_ROWS / world size. Per case, the main process writes OUT_DIR/CASE.safetensors (the final weights
and buffers of every module, gathered to full tensors under FSDP) and OUT_DIR/CASE.json (the loss of each step,
averaged over processes).

CASES lists what runs in two processes; each names the single-process REFERENCE it must equal (one process on
the whole batches, the default gradient sync). tests/test_train_distributed.py runs :func:`train_steps` for
the references and compares. This module is also imported by that test, so it does nothing at import time.
"""
import json
import os
import sys
from pathlib import Path

import torch

STEPS = 3
GLOBAL_ROWS = 16
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SSL = ["model.ssl_head=[16]"]  # BN-free heads: per-process BatchNorm statistics differ from the global batch's
ACCUM = ["train.accum_steps=2"]  # two micro-batches per process: the feature cache
# AdamW's eps at 1e-4 (recipes: 1e-6): the key bias of attention has a zero gradient in exact arithmetic (softmax
# ignores it), so its float noise (~1e-9, different for any other order of summation) divided by eps=1e-6 moves
# it by ~1e-5, and the weights of a split batch could not be compared at 1e-6
COMMON = ["optim.eps=1e-4"]
REFERENCES = {  # name -> recipe overrides, run in one process on the global batch
    "clip": ["objective.clip.local_loss=false"],
    "clip_local": ["objective.clip.local_loss=true", "optim.grad_clip=0.5"],
    "clip_accum": ["objective.clip.local_loss=false"] + ACCUM,
    "siglip": ["objective.name=siglip"],
    "siglip_accum": ["objective.name=siglip"] + ACCUM,
    "simclr": ["objective.name=simclr", "objective.clip=null"] + SSL,
    "simclr_accum": ["objective.name=simclr", "objective.clip=null"] + SSL + ACCUM,
    "moco": ["objective.name=moco", "objective.clip=null", "objective.moco.queue_size=24"] + SSL,
    "moco_accum": ["objective.name=moco", "objective.clip=null", "objective.moco.queue_size=24"] + SSL + ACCUM,
}
FSDP = ["train.fsdp=true"]
CASES = {  # name -> (reference, extra overrides for the two processes)
    **{name: (name, []) for name in REFERENCES},  # gradients sent bucket by bucket during backward (default)
    "clip_after_backward": ("clip", ["train.grad_sync=after_backward"]),
    "clip_accum_after_backward": ("clip_accum", ["train.grad_sync=after_backward"]),
    "clip_small_buckets": ("clip_local", ["train.grad_bucket_mb=0.05"]),
    "clip_fsdp": ("clip_local", FSDP),
    "clip_accum_fsdp": ("clip_accum", FSDP),
    "siglip_accum_fsdp": ("siglip_accum", FSDP),
    "moco_fsdp": ("moco", FSDP),
}


def global_batches(tokenizer, steps: int = STEPS, rows: int = GLOBAL_ROWS):
    """The same seeded images, captions and augmented views on every process."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        images = torch.randn(rows, 3, 32, 32, generator=generator)
        picks = torch.randint(len(WORDS), (rows,), generator=generator).tolist()
        views = [torch.randn(rows, 3, 32, 32, generator=generator) for _ in range(2)]
        yield {"image": images, "text": tokenizer([f"a handwritten {WORDS[i]}" for i in picks]), "views": views}


def mine(batch: dict, start: int, rows: int) -> dict:
    return {key: [v[start:start + rows] for v in value] if key == "views" else value[start:start + rows]
            for key, value in batch.items()}


def train_steps(recipe_path: str, overrides: list):
    """Set up the run, take STEPS optimizer steps on this process's rows.

    Returns (run, mean loss of each step, largest change of any weight: the steps must have moved them)."""
    from mmcl.config import load_recipe
    from mmcl.distributed import all_reduce_mean_
    from mmcl.models import factory
    from mmcl.trainer import fsdp, loop

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rows = GLOBAL_ROWS // world
    run, _ = loop.start(load_recipe(recipe_path, overrides + [f"train.batch_size={rows}", f"train.max_steps={STEPS}"]))
    assert run.accelerator.num_processes == world
    assert fsdp.is_sharded(run.objective) == ("train.fsdp=true" in overrides and world > 1)
    start = run.accelerator.process_index * rows
    initial = {key: value.clone() for key, value in fsdp.full_state_dict(run.objective).items()}
    losses = []
    for batch in global_batches(factory.make_tokenizer(run.model_cfg)):
        out, finite = loop.optimizer_step(run, mine(batch, start, rows))
        assert finite
        loss = out["loss"].clone()
        all_reduce_mean_([loss])
        losses.append(float(loss))
    run.log.close()
    final = fsdp.full_state_dict(run.objective)
    moved = max(float((value.float() - initial[key].float()).abs().max()) for key, value in final.items())
    return run, losses, moved, final


def fsdp_resume(recipe_path: str, out: Path) -> dict:
    """FSDP checkpoints: run A takes STEPS steps and saves (full tensors, gathered); run B resumes from that
    checkpoint (cutting them back into shards); both then take one more step on the same rows. Returns the
    largest difference between A's and B's weights after it (zero when weights and AdamW state came back)."""
    from mmcl.config import load_recipe
    from mmcl.models import factory
    from mmcl.trainer import fsdp, loop

    rows = GLOBAL_ROWS // int(os.environ.get("WORLD_SIZE", "1"))
    overrides = COMMON + REFERENCES["clip_accum"] + FSDP + [
        "optim.schedule=constant", f"train.batch_size={rows}", f"train.output_dir={out / 'run_fsdp_resume'}"]
    first, _ = loop.start(load_recipe(recipe_path, overrides + [f"train.max_steps={STEPS}"]))
    start = first.accelerator.process_index * rows
    batches = [mine(b, start, rows) for b in global_batches(factory.make_tokenizer(first.model_cfg), STEPS + 1)]
    for batch in batches[:STEPS]:
        loop.optimizer_step(first, dict(batch))
    first.save()
    second, _ = loop.start(load_recipe(recipe_path, overrides + [f"train.max_steps={STEPS + 1}", "train.resume=auto"]))
    assert second.state.step == STEPS and fsdp.is_sharded(second.objective)
    for run in (first, second):
        loop.optimizer_step(run, dict(batches[STEPS]))
    a, b = fsdp.full_state_dict(first.objective), fsdp.full_state_dict(second.objective)
    for run in (first, second):
        run.log.close()
    return {"max_difference": max(float((a[k].float() - b[k].float()).abs().max()) for k in a),
            "run_dir": str(out / "run_fsdp_resume")}


def main(recipe_path: str, out_dir: str) -> None:
    from mmcl.models.weights import save_weights

    out = Path(out_dir)
    for name, (reference, extra) in CASES.items():
        overrides = COMMON + REFERENCES[reference] + extra + [f"train.output_dir={out / ('run_' + name)}"]
        run, losses, moved, final = train_steps(recipe_path, overrides)
        if run.accelerator.is_main_process:
            save_weights(final, out / f"{name}.safetensors")
            backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
            report = {"losses": losses, "moved": moved, "world": run.accelerator.num_processes, "backend": backend,
                      "buckets": len(run.grad_sync.buckets), "sent_in_backward": run.grad_sync.sent_in_backward}
            (out / f"{name}.json").write_text(json.dumps(report))
        run.accelerator.wait_for_everyone()
    resumed = fsdp_resume(recipe_path, out)
    if int(os.environ.get("RANK", "0")) == 0:
        (out / "fsdp_resume.json").write_text(json.dumps(resumed))


if __name__ == "__main__":
    from mmcl.distributed import shutdown

    main(sys.argv[1], sys.argv[2])
    shutdown()
