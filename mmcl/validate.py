"""Value checks on a typed recipe, run before any work starts. Each failure names its key."""
from __future__ import annotations

import dataclasses
import inspect
import math
import os
from pathlib import Path

from mmcl.config import ConfigError, Recipe
from mmcl.objective_options import SECTIONS, OptionError


def positive(key: str, value, allow_zero: bool = False) -> None:
    bad = value < 0 if allow_zero else value <= 0
    if bad or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def check_model(recipe: Recipe) -> None:
    m = recipe.model
    if (m.arch is None) == (m.config is None):
        raise ConfigError("model: give exactly one of model.arch (open_clip name) or model.config (inline)")
    if m.config is not None:
        for key in ("embed_dim", "vision_cfg", "text_cfg"):
            if key not in m.config:
                raise ConfigError(f"model.config.{key}: missing (open_clip model configs need it)")
        check_model_config(m.config)
    for key in ("pretrained", "image_weights", "text_weights"):
        path = getattr(m, key)
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"model.{key}: file not found: {path} (weights must be local; nothing downloads)")
    if not m.ssl_head or any(d <= 0 for d in m.ssl_head):
        raise ConfigError(f"model.ssl_head: must be a list of positive sizes, got {m.ssl_head}")


def check_model_config(config: dict) -> None:
    """An inline open_clip config: known keys only, so a typo fails here rather than as a TypeError in open_clip."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    known = {"custom_text"} | set(inspect.signature(open_clip.CLIP).parameters)
    known |= set(inspect.signature(open_clip.CustomTextCLIP).parameters)
    check_keys("model.config", config, known)
    if isinstance(config["embed_dim"], bool) or not isinstance(config["embed_dim"], int) or config["embed_dim"] <= 0:
        raise ConfigError(f"model.config.embed_dim: must be a positive integer, got {config['embed_dim']!r}")
    for key, cfg_class in (("vision_cfg", CLIPVisionCfg), ("text_cfg", CLIPTextCfg)):
        if not isinstance(config[key], dict):
            raise ConfigError(f"model.config.{key}: expected a mapping, got {type(config[key]).__name__}")
        check_keys(f"model.config.{key}", config[key], {f.name for f in dataclasses.fields(cfg_class)})


def check_keys(where: str, mapping: dict, known: set) -> None:
    for key in mapping:
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown key (expected one of: {', '.join(sorted(known))})")


def check_data(recipe: Recipe) -> None:
    from data_pipelines import shards

    d = recipe.data
    if not d.train:
        raise ConfigError("data.train: no training data given")
    positive("data.shuffle_buffer", d.shuffle_buffer, allow_zero=True)
    positive("data.workers", d.workers, allow_zero=True)
    positive("data.max_pixels", d.max_pixels)
    positive("data.num_views", d.num_views)
    if d.samples_per_epoch is not None:
        positive("data.samples_per_epoch", d.samples_per_epoch)
    if d.weights is not None and len(d.weights) != len(d.train):
        raise ConfigError(f"data.weights: {len(d.weights)} weights for {len(d.train)} sources")
    for key in ("crop_scale", "view_crop_scale"):
        lo_hi = getattr(d, key)
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
            raise ConfigError(f"data.{key}: must be [low, high] with 0 < low <= high <= 1, got {lo_hi}")
    for i, source in enumerate(d.train):
        try:
            urls = shards.expand_urls(source, d.split)
            shards.check_local(urls, allow_remote=d.allow_remote)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"data.train[{i}]: {err}") from None


def check_optim(recipe: Recipe) -> None:
    o = recipe.optim
    positive("optim.lr", o.lr)
    positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    positive("optim.warmup_steps", o.warmup_steps, allow_zero=True)
    positive("optim.eps", o.eps)
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas: must be two numbers in [0, 1), got {o.betas}")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio: must be in [0, 1], got {o.min_lr_ratio}")
    if o.grad_clip is not None:
        positive("optim.grad_clip", o.grad_clip)


def check_train(recipe: Recipe) -> None:
    t = recipe.train
    positive("train.batch_size", t.batch_size)
    positive("train.accum_steps", t.accum_steps)
    positive("train.epochs", t.epochs)
    positive("train.log_every", t.log_every)
    positive("train.save_every", t.save_every, allow_zero=True)
    positive("train.keep_last", t.keep_last)
    positive("train.max_bad_steps", t.max_bad_steps)
    positive("train.dist_timeout_s", t.dist_timeout_s)
    positive("train.grad_bucket_mb", t.grad_bucket_mb)
    if t.max_steps is not None:
        positive("train.max_steps", t.max_steps)
    if t.batch_size % t.accum_steps:
        raise ConfigError(f"train.batch_size: {t.batch_size} is not divisible by train.accum_steps={t.accum_steps}")
    if t.resume not in ("auto", "none") and not Path(t.resume).is_dir():
        raise ConfigError(f"train.resume: must be auto, none or a checkpoint directory; not found: {t.resume}")
    check_output_dir(t.output_dir)
    check_scale_out(recipe)


def check_scale_out(recipe: Recipe) -> None:
    """FSDP combinations mmcl does not run (each refused before any work, rather than failing mid-run)."""
    from mmcl.train.fsdp import requested

    if not requested(recipe):
        return
    if recipe.train.precision == "fp16":
        raise ConfigError("train.fsdp: fp16 is not supported with FSDP (its gradient scaler would see sharded "
                          "gradients); use train.precision=bf16")
    if recipe.model.compile:
        raise ConfigError("model.compile: not supported together with train.fsdp (compile the towers, or shard "
                          "them, not both)")


def check_output_dir(path: str) -> None:
    """The run directory must be creatable and writable: better to fail now than at the first save."""
    target = Path(path).resolve()
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"train.output_dir: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"train.output_dir: {existing} is not writable")


def check_objective(recipe: Recipe) -> None:
    """Each section the objective reads checks its own values (mmcl/objective_options.py)."""
    o = recipe.objective
    if o.chunk_size is not None:
        positive("objective.chunk_size", o.chunk_size)
    for name in SECTIONS[o.name]:
        try:
            o.section(name).check(f"objective.{name}")
        except OptionError as err:
            raise ConfigError(str(err)) from None
    if o.name != "clip" and o.clip is not None and o.clip.cross_modal_queue:
        raise ConfigError(f"objective.clip.cross_modal_queue: only objective.name=clip has cross-modal queues, "
                          f"not {o.name}")
    if o.name in ("simclr", "moco", "slip") and recipe.data.num_views < 2:
        raise ConfigError(f"data.num_views: {o.name} needs at least 2 views, got {recipe.data.num_views}")


def check_eval(recipe: Recipe) -> None:
    e = recipe.eval
    positive("eval.every", e.every, allow_zero=True)
    positive("eval.batch_size", e.batch_size)
    for key in ("datasets", "retrieval"):
        for i, root in enumerate(getattr(e, key)):
            if not Path(root, e.split).is_dir():
                raise ConfigError(f"eval.{key}[{i}]: no split folder {Path(root, e.split)}")


def validate(recipe: Recipe) -> None:
    for check in (check_model, check_optim, check_train, check_objective, check_data, check_eval):
        check(recipe)
