"""The training loop, top to bottom. Setup lives in setup.py, the backward passes in step.py."""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from mmcl import memory, runs
from mmcl.config import Recipe
from mmcl.models import factory
from mmcl.trainer import setup as S
from mmcl.trainer import locked_cache
from mmcl.trainer import step as T
from mmcl.trainer import trackers
from mmcl.trainer.locked_cache import LockedCache
from mmcl.trainer.checkpoint import CheckpointWriteError, set_rng_state
from mmcl.trainer.finish import evaluate, finish
from mmcl.trainer.logs import RunLog


class TrainingError(RuntimeError):
    """The run cannot go on (too many non-finite steps in a row, a checkpoint that cannot be written); the
    complete checkpoints it already wrote are kept."""


@dataclass
class Run:
    recipe: Recipe
    accelerator: Any
    objective: Any
    model_cfg: dict
    optimizer: Any
    scheduler: Any
    plan: S.DataPlan
    spec: Any
    state: S.TrainState
    log: RunLog
    run_dir: Path
    grad_sync: Any  # averages gradients over processes, during the backward pass (GradSync)
    cache: Optional[LockedCache] = None

    def save(self) -> None:
        try:
            S.save_checkpoint(self.run_dir, self.state, self.objective, self.optimizer, self.scheduler,
                              self.accelerator, self.recipe.train.keep_last)
        except CheckpointWriteError as err:
            raise TrainingError(f"train: {err}; {last_good(self.run_dir)}") from err


def last_good(run_dir: Path) -> str:
    latest = runs.latest_checkpoint(run_dir)
    return f"the last good checkpoint is {latest}" if latest else "no checkpoint was written before"


def train(recipe: Recipe) -> dict:
    run, rng = start(recipe)
    state, t, meter = run.state, recipe.train, Meter(run.state.samples, run.state.step)
    data = S.TrainData(recipe, run.plan, run.spec, state.epoch, skip=state.step_in_epoch)
    if rng is not None:  # resumed: the data position is restored, now the RNG exactly as saved
        set_rng_state(rng)
    while state.step < run.plan.total_steps:
        if state.step_in_epoch == 0:  # a run resumed inside an epoch keeps what was set at its start
            run.objective.before_epoch(state.epoch, run.plan.urls)
        for batch in data.epoch(state.epoch):
            losses, finite = optimizer_step(run, batch)
            meter.add(losses, finite)
            if state.step % t.log_every == 0 or state.step == run.plan.total_steps:
                run.log.write(meter.record(run, losses))
                meter.warn(run)
            if state.bad_steps >= t.max_bad_steps:  # these weights led to the bad steps: never save them as good
                run.log.close()
                raise TrainingError(f"train: {state.bad_steps} non-finite steps (loss or gradients) in a row at "
                                    f"step {state.step} (train.max_bad_steps={t.max_bad_steps}); stopped without "
                                    f"saving; {last_good(run.run_dir)}")
            if state.step >= run.plan.total_steps:
                break
            if recipe.eval.every and state.step % recipe.eval.every == 0:
                evaluate(recipe, run.objective, run.model_cfg, state.step, run.accelerator, run.log)
            # not during a streak of bad steps, so the newest checkpoint stays one from before it
            if t.save_every and state.step % t.save_every == 0 and not state.bad_steps:
                run.save()
        else:
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
    data.close()
    run.save()
    return finish(recipe, run.objective, run.model_cfg, state, run.accelerator, run.log)


def prepare(recipe: Recipe):
    """Everything up to the first step that writes nothing: processes, towers, objective, optimizer, schedule,
    data plan, the resume checkpoint (loaded and checked) and the sample spec. A problem found here leaves no
    file behind. Returns (run without a log, RNG state to restore, the checkpoint resumed from)."""
    accelerator = S.make_accelerator(recipe)
    run_dir = Path(recipe.train.output_dir)
    objective, model_cfg, optimizer = S.build(recipe, accelerator)
    plan = S.plan_data(recipe, accelerator.num_processes)
    scheduler = S.make_scheduler(optimizer.optimizer, plan.total_steps, recipe.optim)
    state, rng, resume_from = S.TrainState(skipped_samples=Counter()), None, S.resume_point(recipe, run_dir)
    if resume_from is not None:
        state, rng = S.restore(resume_from, objective, optimizer, scheduler, accelerator)
    # the towers the locked-feature cache will serve; the cache itself is built by start(), which may write
    objective.locked = locked_cache.planned(recipe, objective.model)
    spec = S.sample_spec(recipe, objective, model_cfg, factory.make_tokenizer(model_cfg), cached=objective.locked)
    sync = S.make_grad_sync(recipe, objective)
    run = Run(recipe, accelerator, objective, model_cfg, optimizer, scheduler, plan, spec, state, None, run_dir,
              sync)
    return run, rng, resume_from


def start(recipe: Recipe):
    """Prepare, then write the run files and open the log."""
    if recipe.train.keep_freed_memory:
        memory.keep_freed_memory()
    run, rng, _ = prepare(recipe)
    if run.accelerator.is_main_process:
        S.write_run_files(recipe, run.run_dir, run.objective.model, run.model_cfg)
    run.accelerator.wait_for_everyone()
    run.cache = locked_cache.prepare(recipe, run.objective.model, run.model_cfg,
                                     factory.make_tokenizer(run.model_cfg), run.accelerator, run.run_dir,
                                     run.plan.urls)
    run.objective.locked = run.cache.splits if run.cache else {}
    trackers.start(run.accelerator, recipe, run.state.step)
    run.log = RunLog(run.run_dir, run.accelerator.is_main_process, run.plan.total_steps, run.state.step,
                     recipe.train.progress, tracker=run.accelerator if recipe.train.log_with else None)
    return run, rng


def dry_run(recipe: Recipe) -> dict:
    """`mmcl train --dry-run`: validate and build everything a run needs, write nothing, print what it found."""
    run, _, resume_from = prepare(recipe)
    params = factory.count_parameters(run.objective)
    found = {"parameters": params["total"], "trainable": params["trainable"], "shards": len(run.plan.urls),
             "steps_per_epoch": run.plan.steps_per_epoch, "total_steps": run.plan.total_steps,
             "resume_from": str(resume_from) if resume_from else None, "start_step": run.state.step}
    if run.accelerator.is_main_process:
        print(f"dry run: ok; {found['parameters']:,} parameters ({found['trainable']:,} trainable), "
              f"{found['shards']} shards, {found['steps_per_epoch']} steps per epoch, {found['total_steps']} "
              f"steps, starting at step {found['start_step']}"
              + (f" from {resume_from}" if resume_from else "") + f"; nothing written to {run.run_dir}")
    return found


def optimizer_step(run: Run, batch: dict):
    """Forward and backward over one global batch, average gradients, update; skip non-finite steps."""
    state, accelerator, objective, t = run.state, run.accelerator, run.objective, run.recipe.train
    state.skipped_samples.update(batch.pop("skipped", {}))
    if run.cache is not None:
        run.cache.fill(batch)
    batch = T.to_device(batch, accelerator.device)
    objective.train()
    objective.before_step(state.step, run.plan.total_steps)
    if t.accum_steps == 1:
        losses = T.plain_backward(objective, batch, accelerator, run.grad_sync)
    else:
        losses = T.cached_backward(objective, T.split_batch(batch, t.accum_steps), accelerator, run.grad_sync)
    run.grad_sync.finish()  # the averaged gradients, most of them sent while the backward pass ran
    params = T.trainable(objective)
    if accelerator.scaler is not None:
        accelerator.unscale_gradients()  # the norm and the clipping see the true gradients
    norm = T.grad_norm(params)
    # fp16: the gradient scaler owns overflowing gradients (it skips the update and lowers the scale)
    finite = T.all_finite(losses["loss"], norm if accelerator.scaler is None else None)
    if finite:
        if run.recipe.optim.grad_clip:
            T.clip_gradients(params, run.recipe.optim.grad_clip, norm)
        run.optimizer.step()
        if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: the scaler skipped this update
            run.scheduler.step()
        objective.after_step(state.step, run.plan.total_steps)
    run.optimizer.zero_grad(set_to_none=True)
    state.bad_steps = 0 if finite else state.bad_steps + 1
    state.skipped_steps += 0 if finite else 1
    state.step, state.step_in_epoch = state.step + 1, state.step_in_epoch + 1
    state.samples += T.batch_size_of(batch) * accelerator.num_processes
    return losses, finite


class Meter:
    """Mean losses and throughput between log records; builds each record (and drives the progress bar)."""

    def __init__(self, samples: int, step: int):
        self.tick, self.samples, self.step = time.time(), samples, step
        self.sums: Dict[str, float] = {}
        self.count = 0
        self.warned = False

    def add(self, losses: Dict[str, Any], finite: bool) -> None:
        if finite:  # a skipped non-finite step is counted separately, not averaged in
            for key, value in losses.items():
                self.sums[key] = self.sums.get(key, 0.0) + float(value)
            self.count += 1

    def warn(self, run: Run) -> None:
        """Tell the user, once, what the objective finds wrong (e.g. collapse)."""
        message = run.objective.warning()
        if message and not self.warned:
            run.log.warn(run.state.step, message)
        self.warned = self.warned or bool(message)

    def record(self, run: Run, losses: Dict[str, Any]) -> dict:
        state, now = run.state, time.time()
        rate = (state.samples - self.samples) / max(now - self.tick, 1e-9)
        means = {k: v / self.count for k, v in self.sums.items()} if self.count else {k: float(v) for k, v in losses.items()}
        record = {"step": state.step, "epoch": state.epoch, "lr": run.scheduler.get_last_lr()[0],
                  "samples_per_s": rate, **means, **run.objective.log_values(),
                  "skipped_steps": state.skipped_steps,
                  **{f"skipped/{k}": v for k, v in sorted(state.skipped_samples.items())}}
        run.log.progress(state.step - self.step, {"loss": f"{record['loss']:.3f}", "samples/s": f"{rate:.0f}"})
        self.tick, self.samples, self.step = now, state.samples, state.step
        self.sums, self.count = {}, 0
        return record
