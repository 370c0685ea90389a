"""Load any model mmcl can evaluate, and export runs to open_clip's `local-dir:` format."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Optional, Tuple

import open_clip
from torch import nn

from mmcl import runs
from mmcl.models import factory, weights

LOCAL_DIR = "local-dir:"
HF_SELF = "."  # an export's HF text tower lives in the export folder itself
HF_CONFIG_FILES = ("config.json",)
# the first one must exist; the others are copied when the tokenizer has them
HF_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                      "merges.txt", "added_tokens.json", "spiece.model", "sentencepiece.bpe.model")


def run_towers_state(checkpoint: Path) -> dict:
    """The open_clip towers' weights inside a checkpoint (its `model.` entries, prefix removed)."""
    state = weights.read_state_dict(str(checkpoint / runs.WEIGHTS))
    prefix = runs.MODEL_PREFIX
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_run(run_dir: Path, checkpoint: Optional[Path] = None) -> Tuple[nn.Module, Callable, Callable]:
    """(model, eval preprocess, tokenizer) from a run directory's newest complete checkpoint."""
    checkpoint = checkpoint or runs.latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint under {run_dir / runs.CHECKPOINTS}")
    config = json.loads((run_dir / runs.MODEL_CONFIG).read_text())
    model = factory.instantiate(config["model_cfg"], load_hf_weights=False)
    model.load_state_dict(run_towers_state(checkpoint), strict=True)
    open_clip.set_model_preprocess_cfg(model, config["preprocess_cfg"])
    return model, factory.eval_preprocess(model), factory.make_tokenizer(config["model_cfg"])


def load_open_clip(name: str, weights_file: Optional[str]) -> Tuple[nn.Module, Callable, Callable]:
    """An open_clip built-in architecture (or `local-dir:`) with local weights; nothing downloads."""
    if weights_file is not None:
        weights.read_state_dict(weights_file)  # refuses anything but plain tensors before open_clip reads it
    if not name.startswith(LOCAL_DIR) and open_clip.get_model_config(name) is None:
        raise ValueError(f"unknown model {name!r}: not a run directory, a local-dir: export or an open_clip "
                         f"architecture (hub names are not fetched; download weights and pass NAME:FILE)")
    extra = export_text_cfg(Path(name[len(LOCAL_DIR):])) if name.startswith(LOCAL_DIR) else {}
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=weights_file, **extra)
    return model, preprocess, open_clip.get_tokenizer(name)


def export_text_cfg(folder: Path) -> dict:
    """For an export whose HF text tower is the folder itself (`hf_model_name: "."`), the text config with
    the folder's path in it: open_clip hands hf_model_name to transformers, which reads a relative path from
    the working directory, so mmcl resolves it against the export wherever it is run from."""
    config_file = folder / "open_clip_config.json"
    if not config_file.is_file():
        return {}
    text_cfg = json.loads(config_file.read_text()).get("model_cfg", {}).get("text_cfg", {})
    if text_cfg.get("hf_model_name") != HF_SELF:
        return {}
    return {"text_cfg": {**text_cfg, "hf_model_name": str(folder.resolve()), "hf_tokenizer_name": str(folder.resolve()),
                         "hf_model_pretrained": False}}


def load_model(spec: str, device: str = "cpu") -> Tuple[nn.Module, Callable, Callable]:
    """(model, eval preprocess, tokenizer) for a run dir, `local-dir:DIR`, `NAME` or `NAME:WEIGHTS`."""
    path = Path(spec)
    if path.is_dir() and runs.is_run_dir(path):
        model, preprocess, tokenizer = load_run(path)
    elif spec.startswith("local-dir:") or ":" not in spec:
        model, preprocess, tokenizer = load_open_clip(spec, None)
    else:
        name, weights_file = spec.split(":", 1)
        model, preprocess, tokenizer = load_open_clip(name, weights_file)
    return model.to(device).eval(), preprocess, tokenizer


def export_run(run_dir: Path, out_dir: Path, checkpoint: Optional[Path] = None) -> Path:
    """Write open_clip_config.json + open_clip_model.safetensors (+ an HF text tower's config and tokenizer
    files): everything `local-dir:OUT` needs, and no path of this machine."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not runs.is_run_dir(run_dir):
        raise FileNotFoundError(f"{run_dir}: not an mmcl run directory (no {runs.CONFIG} / {runs.MODEL_CONFIG})")
    checkpoint = checkpoint or runs.latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint to export")
    config = json.loads((run_dir / runs.MODEL_CONFIG).read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    config["model_cfg"] = portable_model_cfg(config["model_cfg"], out_dir)
    (out_dir / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    weights.save_weights(run_towers_state(checkpoint), out_dir / "open_clip_model.safetensors")
    return out_dir


def portable_model_cfg(model_cfg: dict, out_dir: Path) -> dict:
    """The model config as an export carries it: towers built from the config alone, weights from the file.

    A timm tower never fetches ImageNet weights at load. An HF text tower's config.json and tokenizer files
    are copied into the export, which becomes its HF folder (`hf_model_name: "."`): open_clip's `local-dir:`
    reads the tokenizer from the export folder itself, and the HF model config from that name.
    """
    model_cfg = json.loads(json.dumps(model_cfg))
    vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    if "timm_model_name" in vision:
        vision["timm_model_pretrained"] = False
    if "hf_model_name" in text:
        copy_hf_files(Path(text["hf_model_name"]), HF_CONFIG_FILES, out_dir)
        copy_hf_files(Path(text.get("hf_tokenizer_name") or text["hf_model_name"]), HF_TOKENIZER_FILES, out_dir)
        text.update(hf_model_name=HF_SELF, hf_tokenizer_name=HF_SELF, hf_model_pretrained=False)
    return model_cfg


def copy_hf_files(source: Path, names: Tuple[str, ...], out_dir: Path) -> None:
    if not (source / names[0]).is_file():
        raise FileNotFoundError(f"{source}: the HF text tower's folder has no {names[0]}; export needs it to "
                                f"make the model loadable anywhere (was the tower's folder moved?)")
    for name in names:
        if (source / name).is_file():
            shutil.copyfile(source / name, out_dir / name)


