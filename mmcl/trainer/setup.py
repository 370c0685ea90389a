"""Everything the loop needs before its first step: processes, model, objective, optimizer, data, resume."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Iterator, List, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed

from mmcl.data_pipelines import shards
from mmcl.data_pipelines.stream import PAD, EpochStream, SampleSpec, ShardStream, make_loader
from mmcl.data_pipelines.tokens import CachedTokenizer
from mmcl.data_pipelines.transforms import clip_transform, view_transform
from mmcl import runs
from mmcl.config import ConfigError, Recipe, dump_recipe, first_line
from mmcl.models import factory
from mmcl.objectives import Objective, build_objective, model_init_kwargs
from mmcl.trainer import checkpoint, fsdp, trackers
from mmcl.trainer.gradsync import GradSync
from mmcl.trainer.locked_cache import NoTokens
from mmcl.trainer.optim import make_optimizer, make_scheduler


@dataclass
class TrainState:
    """Where the run is. Saved in every checkpoint; the data stream is a function of (epoch, step_in_epoch)."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    samples: int = 0
    bad_steps: int = 0  # consecutive non-finite losses
    skipped_steps: int = 0  # non-finite losses in total
    skipped_samples: dict = field(default_factory=dict)  # bad data, by kind


@dataclass
class DataPlan:
    urls: List[str]
    weights: Optional[List[float]]
    samples_per_epoch: int
    steps_per_epoch: int
    total_steps: int


def make_accelerator(recipe: Recipe) -> Accelerator:
    precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[recipe.train.precision]
    # torch's default process-group timeout is 30 minutes: a dead or hung peer would stall the others that long
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=recipe.train.dist_timeout_s))
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=precision, kwargs_handlers=[timeout],
                       **trackers.accelerator_kwargs(recipe))


def plan_data(recipe: Recipe, world: int) -> DataPlan:
    """Shards of every source, and fixed-length epochs rounded down to whole global batches."""
    d, t = recipe.data, recipe.train
    urls, weights, total = [], [], 0
    for i, source in enumerate(d.train):
        found = shards.expand_urls(source, d.split)
        urls += found
        weights += [(d.weights[i] if d.weights else 1.0) / len(found)] * len(found)
        size = shards.split_size(source, d.split) if Path(source).is_dir() else None
        total += size or 0
    samples = d.samples_per_epoch or total
    if not samples:
        raise ConfigError("data.samples_per_epoch: unknown dataset size (no sizes.json); set it explicitly")
    steps = samples // (t.batch_size * world)
    if steps < 1:
        raise ConfigError(f"data.samples_per_epoch: {samples} samples make no whole global batch of "
                          f"{t.batch_size} x {world} processes")
    total_steps = min(t.max_steps or steps * t.epochs, steps * t.epochs)
    return DataPlan(urls, weights if d.resampled else None, steps * t.batch_size * world, steps, total_steps)


def sample_spec(recipe: Recipe, objective: Objective, model_cfg: dict, tokenizer, cached=()) -> SampleSpec:
    """What a training sample carries; a tower served by the locked-feature cache (`cached`) needs no pixels or tokens."""
    size, d = factory.image_size(model_cfg), recipe.data
    pp = factory.preprocess_cfg(objective.model)
    mean, std = pp.get("mean"), pp.get("std")
    image = clip_transform(size, d.augment, mean, std, tuple(d.crop_scale))
    return SampleSpec(
        image_transform=image if objective.uses_image and "image" not in cached else None,
        tokenizer=(NoTokens() if "text" in cached else CachedTokenizer(tokenizer)) if objective.uses_text else None,
        view_transform=view_transform(size, crop_scale=tuple(d.view_crop_scale), mean=mean, std=std)
        if objective.uses_views else None,
        num_views=d.num_views, label=objective.uses_labels, max_pixels=d.max_pixels,
        **small_views(recipe, size, mean, std))


def small_views(recipe: Recipe, size: int, mean, std) -> dict:
    """SampleSpec fields of SwAV's small multi-crop views (none unless `data.small_views`)."""
    d = recipe.data
    if not d.small_views:
        return {}
    small = d.small_view_size or size // 2
    return {"small_view_transform": view_transform(small, crop_scale=tuple(d.small_view_crop_scale), mean=mean,
                                                   std=std), "num_small_views": d.small_views}


class DataRng:
    """A torch RNG stream of its own for one epoch's data loading, seeded from (train.seed, epoch).

    The DataLoader draws a seed from the global RNG when it starts, and in-process loading (data.workers=0)
    augments with it. Without this, the model's random draws (dropout, patch dropout) would depend on how many
    batches were loaded before them, and the batches on the model's draws; a resumed run, which re-reads and
    skips the batches already trained, would then not continue the way the uninterrupted run did.
    """

    def __init__(self, seed: int):
        self.state = torch.Generator().manual_seed(seed).get_state()

    def run(self, fn):
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.state)
            out = fn()
            self.state = torch.get_rng_state()
        return out


class TrainData:
    """This process's batches, epoch after epoch, from one DataLoader whose workers live across epochs.

    A loader per epoch restarted its workers at every epoch end, and the refill of their shuffle buffers
    and prefetch queues competed with the first steps of the next epoch (about a second per epoch on the
    digits, a fifth of the run). `EpochStream` keeps the batches a loader per epoch gives: resuming at any
    (epoch, step) reproduces the uninterrupted run.
    """

    def __init__(self, recipe: Recipe, plan: DataPlan, spec: SampleSpec, first_epoch: int, skip: int,
                 epochs: Optional[int] = None):
        d = recipe.data
        epochs = epochs or -(-plan.total_steps // plan.steps_per_epoch) - first_epoch
        stream = ShardStream(plan.urls, spec, recipe.train.batch_size, seed=recipe.train.seed, epoch=first_epoch,
                             resampled=d.resampled, weights=plan.weights, shuffle_buffer=d.shuffle_buffer)
        epoch_stream = EpochStream(stream, plan.steps_per_epoch, first_epoch, max(1, epochs))
        self.rng = DataRng(recipe.train.seed * 1_000_003 + first_epoch)
        self.loader = self.rng.run(lambda: iter(make_loader(epoch_stream, d.workers)))
        self.items = epoch_stream.items_per_epoch(d.workers)
        self.next_epoch, self.skip = first_epoch, skip

    def epoch(self, epoch: int) -> Iterator[dict]:
        """The batches of `epoch` (the next one), after skipping those already trained when resuming."""
        if epoch != self.next_epoch:
            raise ValueError(f"epoch {epoch} asked for, the stream is at epoch {self.next_epoch}")
        self.next_epoch, skip, self.skip = epoch + 1, self.skip, 0
        index = 0
        for _ in range(self.items):
            batch = self.rng.run(lambda: next(self.loader))
            if batch.get(PAD):
                continue
            if index >= skip:
                yield batch
            index += 1

    def close(self) -> None:
        self.loader = None  # the loader iterator shuts its workers down when it goes


def epoch_batches(recipe: Recipe, plan: DataPlan, spec: SampleSpec, epoch: int, skip: int) -> Iterator[dict]:
    """The batches of one epoch on their own (benchmarks and tests)."""
    return TrainData(recipe, plan, spec, epoch, skip, epochs=1).epoch(epoch)


def build(recipe: Recipe, accelerator: Accelerator):
    """Model, objective, optimizer and scheduler, identically initialised on every process."""
    set_seed(recipe.train.seed)
    if recipe.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    model, model_cfg = factory.build_model(recipe.model, **model_init_kwargs(recipe))
    try:
        objective = build_objective(recipe, model).to(accelerator.device)
    except (RuntimeError, ValueError, TypeError, OverflowError, MemoryError) as err:  # sizes torch cannot allocate
        raise ConfigError(f"objective: cannot build {recipe.objective.name} with these sizes "
                          f"({type(err).__name__}: {first_line(err)})") from None
    if fsdp.requested(recipe) and accelerator.num_processes > 1:  # one process has nothing to shard over
        fsdp.shard(objective, accelerator.device)
    if recipe.model.compile:
        factory.compile_towers(objective.model)
    optimizer = accelerator.prepare_optimizer(make_optimizer(objective, recipe.optim))
    return objective, model_cfg, optimizer


def make_grad_sync(recipe: Recipe, objective: Objective) -> GradSync:
    """Gradient averaging for the parameters FSDP does not reduce itself (all of them without FSDP)."""
    params = [p for p in objective.parameters() if p.requires_grad and not fsdp.is_dtensor(p)]
    return GradSync(params, recipe.train.grad_sync, recipe.train.grad_bucket_mb)


def write_run_files(recipe: Recipe, run_dir: Path, model: torch.nn.Module, model_cfg: dict) -> None:
    """config.yaml and open_clip_config.json, each written whole or not at all; a run folder made here is
    removed again if they cannot be written (disk full)."""
    made = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        dump_recipe(recipe, run_dir / runs.CONFIG)
        config = {"model_cfg": model_cfg, "preprocess_cfg": factory.preprocess_cfg(model)}
        runs.write_text_atomic(run_dir / runs.MODEL_CONFIG, json.dumps(config, indent=2))
    except OSError:
        if made:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def resume_point(recipe: Recipe, run_dir: Path) -> Optional[Path]:
    if recipe.train.resume == "none":
        return None
    if recipe.train.resume == "auto":
        return runs.latest_checkpoint(run_dir)
    return Path(recipe.train.resume)


def restore(ckpt: Path, objective, optimizer, scheduler, accelerator) -> TrainState:
    saved = checkpoint.load(ckpt, objective)
    try:
        optimizer.load_state_dict(fsdp.shard_optimizer_state(saved["optimizer"], optimizer))
        scheduler.load_state_dict(saved["scheduler"])
        if accelerator.scaler is not None and saved.get("scaler"):
            accelerator.scaler.load_state_dict(saved["scaler"])
        state = TrainState(**saved["train_state"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:  # e.g. towers locked since it was saved
        raise ConfigError(f"train.resume: {ckpt} does not match this recipe ({type(err).__name__}: "
                          f"{first_line(err)})") from None
    state.skipped_samples = Counter(state.skipped_samples)
    return state, saved["rng"][min(accelerator.process_index, len(saved["rng"]) - 1)]


def save_checkpoint(run_dir: Path, state: TrainState, objective, optimizer, scheduler, accelerator,
                    keep_last: int) -> None:
    """Every process contributes its RNG state (and, under FSDP, its shards); the main process writes."""
    rng = [checkpoint.rng_state()]
    if accelerator.num_processes > 1:
        gathered = [None] * accelerator.num_processes
        torch.distributed.all_gather_object(gathered, rng[0])
        rng = gathered
    sharded = fsdp.is_sharded(objective)
    weights = fsdp.full_state_dict(objective) if sharded else objective
    optimizer_state = fsdp.full_optimizer_state(optimizer) if sharded else None
    if accelerator.is_main_process:
        saved = {"optimizer": optimizer_state or optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": rng, "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                 "train_state": {**asdict(state), "skipped_samples": dict(state.skipped_samples)}}
        checkpoint.save(run_dir, state.step, weights, saved, {"epoch": state.epoch, "samples": state.samples})
        checkpoint.prune(run_dir, keep_last)
    accelerator.wait_for_everyone()


__all__ = ["TrainState", "DataPlan", "make_accelerator", "plan_data", "sample_spec", "TrainData", "epoch_batches", "build",
           "write_run_files", "resume_point", "restore", "save_checkpoint", "make_scheduler", "make_grad_sync"]
