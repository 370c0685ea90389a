"""Value checks on a typed recipe, run before any work starts. Each failure names its key."""
from __future__ import annotations

import dataclasses
import inspect
import math
import os
import typing
from pathlib import Path

from mmcl import runs
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
    if m.pretrained is not None:
        from mmcl.models.hub import PretrainedNotFound, resolve

        try:  # a tag or hf-hub name is fetched (or found in the cache) now, before any work
            resolve(m.arch, m.pretrained)
        except PretrainedNotFound as err:
            raise ConfigError(str(err)) from None
    from mmcl.models import image_weights  # `pkg:NAME` image weights: a checkpoint shipped inside a package

    if m.image_weights is not None:
        image_weights.check_tower(m.image_weights, (m.config or {}).get("vision_cfg", {}))
    for key in ("image_weights", "text_weights"):
        path = getattr(m, key)
        path = image_weights.resolve_file(path) if key == "image_weights" and path else path
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"model.{key}: file not found: {path} (weights must be local; nothing downloads)")
    positive("model.lock_image_unlocked_groups", m.lock_image_unlocked_groups, allow_zero=True)
    positive("model.lock_text_unlocked_layers", m.lock_text_unlocked_layers, allow_zero=True)
    if not m.ssl_head or any(d <= 0 for d in m.ssl_head):
        raise ConfigError(f"model.ssl_head: must be a list of positive sizes, got {m.ssl_head}")
    if not 0 <= m.text_dropout < 1:
        raise ConfigError(f"model.text_dropout: must be in [0, 1), got {m.text_dropout}")


def check_model_config(config: dict) -> None:
    """An inline open_clip config: known keys only, so a typo fails here rather than as a TypeError in open_clip."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    known = {"custom_text"} | set(inspect.signature(open_clip.CLIP).parameters)
    known |= set(inspect.signature(open_clip.CustomTextCLIP).parameters)
    check_keys("model.config", config, known)
    if not is_int(config["embed_dim"]) or not 0 < config["embed_dim"] <= MAX_TOWER_SIZE:
        raise ConfigError(f"model.config.embed_dim: must be a positive integer, got {config['embed_dim']!r}")
    for key, cfg_class in (("vision_cfg", CLIPVisionCfg), ("text_cfg", CLIPTextCfg)):
        if not isinstance(config[key], dict):
            raise ConfigError(f"model.config.{key}: expected a mapping, got {type(config[key]).__name__}")
        check_keys(f"model.config.{key}", config[key], {f.name for f in dataclasses.fields(cfg_class)})
        check_tower_values(f"model.config.{key}", config[key], cfg_class)


# Sizes of a tower: positive integers (a list of them for ResNet `layers` or a (h, w) `image_size`), bounded so
# that a typo fails here instead of in a build loop that never ends or an allocation the machine cannot make.
TOWER_SIZES = ("width", "layers", "head_width", "patch_size", "image_size", "heads", "context_length", "vocab_size")
MAX_TOWER_SIZE = 1 << 20


def check_tower_values(where: str, cfg: dict, cfg_class: type) -> None:
    """Types from open_clip's config dataclass for plain fields; sizes positive; ratios finite and positive."""
    hints = typing.get_type_hints(cfg_class)
    for key, value in cfg.items():
        name = f"{where}.{key}"
        if key in TOWER_SIZES:
            values = value if isinstance(value, list) and key in ("layers", "image_size") else [value]
            if not values or not all(is_int(v) and 0 < v <= MAX_TOWER_SIZE for v in values):
                raise ConfigError(f"{name}: must be a positive integer (at most {MAX_TOWER_SIZE}), got {value!r}")
        elif key == "mlp_ratio":
            if not is_number(value) or not 0 < value < MAX_TOWER_SIZE:
                raise ConfigError(f"{name}: must be a positive number, got {value!r}")
        elif key in ("patch_dropout", "timm_drop", "timm_drop_path"):
            if value is not None and (not is_number(value) or not 0 <= value < 1):
                raise ConfigError(f"{name}: must be a number in [0, 1), got {value!r}")
        else:
            check_plain_type(name, value, hints.get(key))


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


def check_plain_type(name: str, value, hint) -> None:
    """bool, int, float, str and Optional of them; other annotations are left to open_clip."""
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    inner = [a for a in typing.get_args(hint) if a is not type(None)] if optional else [hint]
    if len(inner) != 1 or inner[0] not in (bool, int, float, str) or (value is None and optional):
        return
    expected = inner[0]
    ok = {bool: isinstance(value, bool), int: is_int(value), str: isinstance(value, str),
          float: is_number(value)}[expected]
    if not ok:
        raise ConfigError(f"{name}: expected {expected.__name__}, got {type(value).__name__} {value!r}")


def check_keys(where: str, mapping: dict, known: set) -> None:
    for key in mapping:
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown key (expected one of: {', '.join(sorted(known))})")


def check_data(recipe: Recipe) -> None:
    from mmcl.data_pipelines import shards

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
    count = 0
    for i, source in enumerate(d.train):
        try:
            urls = shards.expand_urls(source, d.split)
            shards.check_local(urls, allow_remote=d.allow_remote)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"data.train[{i}]: {err}") from None
        count += len(urls)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun and accelerate launch
    if not d.resampled and count < max(1, d.workers) * world:
        raise ConfigError(f"data.workers: {d.workers} loader workers x {world} processes need at least "
                          f"{max(1, d.workers) * world} shards, data.train has {count} (use fewer workers, more "
                          f"shards, or data.resampled: true)")


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
    if t.dist_timeout_s > YEAR_S:
        raise ConfigError(f"train.dist_timeout_s: must be at most {YEAR_S} (a year), got {t.dist_timeout_s}")
    if not 0 <= t.seed < 2 ** 32:  # numpy's seeds are 32-bit
        raise ConfigError(f"train.seed: must be in [0, 2**32), got {t.seed}")
    positive("train.grad_bucket_mb", t.grad_bucket_mb)
    if t.max_steps is not None:
        positive("train.max_steps", t.max_steps)
    if t.batch_size % t.accum_steps:
        raise ConfigError(f"train.batch_size: {t.batch_size} is not divisible by train.accum_steps={t.accum_steps}")
    if t.resume not in ("auto", "none") and not Path(t.resume).is_dir():
        raise ConfigError(f"train.resume: must be auto, none or a checkpoint directory; not found: {t.resume}")
    if t.resume not in ("auto", "none") and not (Path(t.resume) / runs.META).is_file():
        raise ConfigError(f"train.resume: {t.resume} is not a complete checkpoint (no {runs.META}; "
                          f"give a folder like RUN/{runs.CHECKPOINTS}/{runs.checkpoint_name(100)})")
    check_output_dir(t.output_dir)
    from mmcl.trainer.trackers import check_trackers

    check_trackers(t.log_with)
    for name in t.tracker_kwargs:
        if name not in t.log_with:
            raise ConfigError(f"train.tracker_kwargs.{name}: {name} is not in train.log_with {t.log_with}")
    check_scale_out(recipe)


YEAR_S = 365 * 24 * 3600


def check_scale_out(recipe: Recipe) -> None:
    """FSDP combinations mmcl does not run (each refused before any work, rather than failing mid-run)."""
    from mmcl.trainer.fsdp import requested

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
    if recipe.model.cache_locked:
        check_cache(recipe)
    if o.name in ("simclr", "moco", "slip") + TWO_VIEW and recipe.data.num_views < 2:
        raise ConfigError(f"data.num_views: {o.name} needs at least 2 views, got {recipe.data.num_views}")
    check_text_ssl(recipe)


# ---- objectives on labels and margins, and CLIP's label-aware and text-side options -------------------------

TWO_VIEW = ("supcon", "triplet", "pairwise")


def check_text_ssl(recipe: Recipe) -> None:
    """SimCSE's two views of a caption must differ: dropout in the text tower, or a token augmentation."""
    clip = recipe.objective.clip
    if clip is None or not clip.text_ssl_weight:
        return
    hf_tower = "hf_model_name" in ((recipe.model.config or {}).get("text_cfg") or {})
    if not (recipe.model.text_dropout or hf_tower or clip.simcse.token_shuffle or clip.simcse.token_cutoff):
        raise ConfigError("objective.clip.text_ssl_weight: SimCSE's two views of a caption would be identical; set "
                          "model.text_dropout (0.1 in the paper) or objective.clip.simcse.token_shuffle / token_cutoff")


def needs_labels(recipe: Recipe) -> bool:
    o = recipe.objective
    return (o.name == "supcon" or (o.name in ("clip", "slip") and o.section("clip").label_positives)
            or (o.name in ("triplet", "pairwise") and o.section(o.name).labels))


def check_labels(recipe: Recipe) -> None:
    """Objectives on class labels read `cls`: refuse data whose first sample has none, before any training."""
    from mmcl.data_pipelines import shards, tarstream

    if not needs_labels(recipe):
        return
    for i, source in enumerate(recipe.data.train):
        url = shards.local_path(shards.expand_urls(source, recipe.data.split)[0])
        if not Path(url).is_file():
            continue  # a remote source: its samples are checked as they stream
        first = next(tarstream.shard_samples(url, lambda err: None), {})
        if "cls" not in first:
            have = ", ".join(sorted(k for k in first if not k.startswith("__"))) or "nothing"
            raise ConfigError(f"data.train[{i}]: objective {recipe.objective.name} needs class labels (`cls` in "
                              f"each sample); the first sample of {url} has {have}")


def check_cache(recipe: Recipe) -> None:
    """The locked-feature cache serves image-text objectives whose locked towers see deterministic local inputs."""
    m, o, d = recipe.model, recipe.objective, recipe.data  # which parts are cached is known once built
    clip = o.section("clip") if o.name == "clip" else None
    if o.name not in ("clip", "siglip") or (clip is not None and clip.cross_modal_queue):
        raise ConfigError(f"model.cache_locked: only objective.name clip or siglip (without cross-modal queues) "
                          f"reads cached features, not {o.name}")
    for key, value in (("imix_alpha", clip and clip.imix_alpha), ("text_ssl_weight", clip and clip.text_ssl_weight)):
        if value:  # i-Mix mixes pixels and SimCSE re-encodes tokens: neither exists once a tower is cached
            raise ConfigError(f"model.cache_locked: objective.clip.{key} needs the towers' inputs, which the cache "
                              f"replaces; turn one of them off")
    if not (m.lock_image or m.lock_text):
        raise ConfigError("model.cache_locked: no tower is locked (set model.lock_image and/or model.lock_text)")
    if m.lock_image and d.augment and not m.lock_text:
        raise ConfigError("model.cache_locked: the locked image tower sees random crops (data.augment=true), so "
                          "its outputs change every epoch; set data.augment=false to cache it")
    if d.allow_remote:
        raise ConfigError("model.cache_locked: needs local shards (data.allow_remote=true); the cache is keyed by "
                          "each shard's size and modification time")


def check_eval(recipe: Recipe) -> None:
    e = recipe.eval
    positive("eval.every", e.every, allow_zero=True)
    positive("eval.batch_size", e.batch_size)
    for key in ("datasets", "retrieval"):
        for i, root in enumerate(getattr(e, key)):
            if not Path(root, e.split).is_dir():
                raise ConfigError(f"eval.{key}[{i}]: no split folder {Path(root, e.split)}")


# ---- objectives without negatives and with prototypes (BYOL, SimSiam, VICReg, SwAV, PCL) ----------------
VIEW_OBJECTIVES = ("byol", "simsiam", "vicreg", "swav", "pcl")


def check_views_and_heads(recipe: Recipe) -> None:
    """Views, multi-crop and predictor sizes of the objectives without negatives or with prototypes."""
    o, d = recipe.objective, recipe.data
    if o.name in VIEW_OBJECTIVES and d.num_views < 2:
        raise ConfigError(f"data.num_views: {o.name} needs at least 2 views, got {d.num_views}")
    positive("data.small_views", d.small_views, allow_zero=True)
    if d.small_views and o.name != "swav":
        raise ConfigError(f"data.small_views: only objective swav uses small (multi-crop) views, not {o.name}")
    if d.small_view_size is not None:
        positive("data.small_view_size", d.small_view_size)
    lo_hi = d.small_view_crop_scale
    if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
        raise ConfigError(f"data.small_view_crop_scale: must be [low, high] with 0 < low <= high <= 1, got {lo_hi}")
    if o.name in ("byol", "simsiam"):
        predictor = o.section(o.name).predictor
        if predictor is not None and predictor[-1] != recipe.model.ssl_head[-1]:
            raise ConfigError(f"objective.{o.name}.predictor: its output ({predictor[-1]}) must be the projection's "
                              f"size, model.ssl_head[-1] = {recipe.model.ssl_head[-1]}")
    if o.name == "pcl":
        check_pcl(recipe)


def check_pcl(recipe: Recipe) -> None:
    from mmcl.data_pipelines import shards

    pcl, moco = recipe.objective.section("pcl"), recipe.objective.section("moco")
    if moco.version != 2:
        raise ConfigError(f"objective.moco.version: PCL adds ProtoNCE to MoCo v2, got version {moco.version}")
    if pcl.kmeans == "faiss":
        import importlib.util

        if importlib.util.find_spec("faiss") is None:
            raise ConfigError("objective.pcl.kmeans: faiss is not installed (pip install faiss-cpu), or use sklearn")
    sizes = [shards.split_size(s, recipe.data.split) if Path(s).is_dir() else None for s in recipe.data.train]
    if all(size is not None for size in sizes) and max(pcl.num_clusters) > sum(sizes):
        raise ConfigError(f"objective.pcl.num_clusters: {max(pcl.num_clusters)} clusters for {sum(sizes)} training "
                          f"samples; k-means needs at least as many samples as clusters")


def validate(recipe: Recipe) -> None:
    for check in (check_model, check_optim, check_train, check_objective, check_data, check_labels, check_eval,
                  check_views_and_heads):
        check(recipe)
