"""Load any model mmcl can evaluate, and export runs to open_clip's `local-dir:` format."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Optional, Tuple

import open_clip
from torch import nn

from mmcl import runs
from mmcl.config import first_line
from mmcl.data_pipelines.tokens import fast_tokenizer
from mmcl.models import factory, hub, weights

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
    weights.load_state(model, run_towers_state(checkpoint), str(checkpoint / runs.WEIGHTS), strict=True)
    open_clip.set_model_preprocess_cfg(model, config["preprocess_cfg"])
    return model, factory.eval_preprocess(model), factory.make_tokenizer(config["model_cfg"])


def load_open_clip(name: str, weights_file: Optional[str]) -> Tuple[nn.Module, Callable, Callable]:
    """An open_clip architecture (or a `local-dir:` export, or a whole `hf-hub:` model) with weights from a
    local file, an open_clip pretrained tag or `hf-hub:ORG/REPO` (through the Hugging Face cache, mmcl.models.hub)."""
    if name.startswith(hub.HUB_PREFIX):  # config, weights and tokenizer from a hub repository
        return load_hub_model(name)
    pretrained = weights_file
    if weights_file is not None and Path(weights_file).is_file():
        weights.read_state_dict(weights_file)  # refuses anything but plain tensors before open_clip reads it
    elif weights_file is not None:  # a tag open_clip resolves itself, or a hub repository's weights file
        path, _ = hub.resolve(name, weights_file, key="--model")
        pretrained = path if weights_file.startswith(hub.HUB_PREFIX) else weights_file
    if name.startswith(LOCAL_DIR):
        check_export(Path(name[len(LOCAL_DIR):]))
    if not name.startswith(LOCAL_DIR) and open_clip.get_model_config(name) is None:
        raise ValueError(f"unknown model {name!r}: not a run directory, a local-dir: export, an hf-hub: model "
                         f"or an open_clip architecture")
    extra = export_text_cfg(Path(name[len(LOCAL_DIR):])) if name.startswith(LOCAL_DIR) else {}
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, **extra)
    return model, preprocess, open_clip.get_tokenizer(name)


def load_hub_model(name: str) -> Tuple[nn.Module, Callable, Callable]:
    hub.resolve(None, name, key="--model")  # cached (or fetched now), else one line naming the repository
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name)
        return model, preprocess, open_clip.get_tokenizer(name)
    except Exception as err:  # e.g. a repository without open_clip_config.json
        raise ValueError(f"--model: {name} could not be built by open_clip ({first_line(err)})") from None


def check_export(folder: Path) -> None:
    """An open_clip `local-dir:` folder: its config is there, and every weights file open_clip may pick is
    plain tensors (read here first, so a pickle payload is refused with the file's name and never runs)."""
    if not (folder / "open_clip_config.json").is_file():
        raise FileNotFoundError(f"no open_clip export in {folder} (open_clip_config.json missing)")
    for pattern in ("*.safetensors", "*.bin", "*.pth"):
        for path in sorted(folder.glob(pattern)):
            weights.read_state_dict(str(path))


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
    """(model, eval preprocess, tokenizer) for a run dir, `local-dir:DIR`, `hf-hub:ORG/REPO`, `NAME` or
    `NAME:WEIGHTS` (WEIGHTS: a file, an open_clip pretrained tag of NAME, or hf-hub:ORG/REPO)."""
    path = Path(spec)
    if path.is_dir() and runs.is_run_dir(path):
        model, preprocess, tokenizer = load_run(path)
    elif spec.startswith(("local-dir:", hub.HUB_PREFIX)) or ":" not in spec:
        model, preprocess, tokenizer = load_open_clip(spec, None)
    else:
        name, weights_file = spec.split(":", 1)
        model, preprocess, tokenizer = load_open_clip(name, weights_file)
    return model.to(device).eval(), preprocess, fast_tokenizer(tokenizer)


def export_run(run_dir: Path, out_dir: Path, checkpoint: Optional[Path] = None) -> Path:
    """Write open_clip_config.json + open_clip_model.safetensors (+ an HF text tower's config and tokenizer
    files): everything `local-dir:OUT` needs, and no path of this machine."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not runs.is_run_dir(run_dir):
        raise FileNotFoundError(f"{run_dir}: not an mmcl run directory (no {runs.CONFIG} / {runs.MODEL_CONFIG})")
    checkpoint = checkpoint or runs.latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint to export")
    state = run_towers_state(checkpoint)  # read (and refused if need be) before anything is written
    config = json.loads((run_dir / runs.MODEL_CONFIG).read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    config["model_cfg"] = portable_model_cfg(config["model_cfg"], out_dir)
    (out_dir / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    weights.save_weights(state, out_dir / "open_clip_model.safetensors")
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


