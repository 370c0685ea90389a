"""Pretrained weights named the open_clip way, fetched by open_clip's own loader into its caches.

`model.pretrained` (and the `NAME:WEIGHTS` of `mmcl eval --model`) takes
- a local file (.safetensors, or a pickle read with weights_only=True);
- an open_clip pretrained tag of `model.arch`, e.g. `ViT-B-32` + `laion2b_s34b_b79k`;
- `hf-hub:ORG/REPO`, a Hugging Face Hub repository holding `open_clip_model.safetensors` (or
  `open_clip_pytorch_model.bin`) for the architecture.
Tags and hub names go through `open_clip.pretrained.download_pretrained`, i.e. the Hugging Face cache
(`HF_HOME` / `HF_HUB_CACHE`; a few tags are plain URLs cached under ~/.cache/clip). With the weights cached
nothing touches the network when `HF_HUB_OFFLINE=1`; without them and without a network the name is refused on
one line, naming the tag and where it would come from, before any work starts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import open_clip

HUB_PREFIX = "hf-hub:"
PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")


class PretrainedNotFound(ValueError):
    """A pretrained name that is neither a local file nor fetchable (unknown tag, not cached and offline)."""


def pretrained_cfg(arch: Optional[str], name: str, key: str) -> Tuple[Dict, str]:
    """open_clip's pretrained config for `name` and a description of where its weights come from."""
    if name.startswith(HUB_PREFIX):
        repo = name[len(HUB_PREFIX):].strip("/")
        if repo.count("/") != 1:
            raise PretrainedNotFound(f"{key}: {name!r} is not hf-hub:ORG/REPO")
        return {"hf_hub": repo + "/"}, f"the Hugging Face Hub repository {repo}"
    if arch is None:
        raise PretrainedNotFound(f"{key}: {name!r} is not a file, and a pretrained tag needs model.arch "
                                 f"(an open_clip architecture name)")
    cfg = open_clip.pretrained.get_pretrained_cfg(arch, name)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        listed = ", ".join(tags) if tags else "none"
        raise PretrainedNotFound(f"{key}: {name!r} is neither a file nor a pretrained tag of {arch} (its tags: {listed})")
    source = cfg.get("hf_hub") or cfg.get("url")
    where = f"the Hugging Face Hub repository {source.rstrip('/')}" if cfg.get("hf_hub") else source
    return cfg, where


def resolve(arch: Optional[str], name: str, key: str = "model.pretrained") -> Tuple[str, Dict]:
    """(local weights file, open_clip pretrained config) for a file, a pretrained tag or hf-hub:ORG/REPO."""
    if Path(name).is_file():
        return name, {}
    if not name.startswith(HUB_PREFIX) and ("/" in name or Path(name).suffix in (".pt", ".bin", ".safetensors", ".pth")):
        raise PretrainedNotFound(f"{key}: weights file not found: {name}")
    cfg, where = pretrained_cfg(arch, name, key)
    try:
        path = open_clip.pretrained.download_pretrained(cfg)
    except Exception as err:  # huggingface_hub raises several types for "offline and not cached"
        reason = "HF_HUB_OFFLINE is set" if offline() else f"{type(err).__name__}"
        raise PretrainedNotFound(f"{key}: {name} is not in the Hugging Face cache ({cache_dir()}) and could not be "
                                 f"fetched from {where} ({reason})") from None
    if not path:
        raise PretrainedNotFound(f"{key}: {name} names no weights file in open_clip's pretrained config")
    return path, {**cfg, **hub_preprocess(cfg)}


def hub_preprocess(cfg: Dict) -> Dict:
    """The preprocess config a hub repository publishes in its open_clip_config.json, when cached or fetchable."""
    if not cfg.get("hf_hub") or cfg.get("mean"):
        return {}
    import json

    try:
        config_file = open_clip.pretrained.hf_hub_download(cfg["hf_hub"].rstrip("/"), "open_clip_config.json")
        return {k: v for k, v in json.loads(Path(config_file).read_text()).get("preprocess_cfg", {}).items()
                if k in PREPROCESS_KEYS}
    except Exception:  # no config in the repository: open_clip's defaults apply
        return {}


def preprocess_of(cfg: Dict) -> Dict:
    """The image preprocessing a pretrained config prescribes (mean, std, interpolation, resize mode)."""
    return {k: cfg[k] for k in PREPROCESS_KEYS if cfg.get(k) is not None}


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)
