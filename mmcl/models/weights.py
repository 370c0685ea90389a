"""Weights in and out: safetensors first; pickle files only through torch.load(weights_only=True).

A pickle checkpoint can carry code that runs on load. mmcl writes safetensors and reads pickles only with
`weights_only=True`, which refuses anything but tensors and plain containers, so a payload never runs.
"""
from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Dict

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mmcl.config import first_line


class UnsafeCheckpointError(ValueError):
    """A weights file that is not plain tensors (e.g. a pickle with a code payload)."""


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or from a pickle file loaded with weights_only=True."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if file.suffix == ".safetensors":
        try:
            return load_file(str(file))
        except Exception as err:  # SafetensorError (e.g. a pickle renamed .safetensors), or a cut file
            raise UnsafeCheckpointError(f"{path}: refused, not a safetensors file ({first_line(err)})") from None
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of files it then refuses
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for payloads; others for plain garbage
        raise UnsafeCheckpointError(f"{path}: refused, not a plain tensor checkpoint ({first_line(err)})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UnsafeCheckpointError(f"{path}: expected a mapping of names to tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_open_clip_checkpoint(model: nn.Module, path: str) -> None:
    """open_clip's own checkpoint loader (it converts older layouts), refusing anything but plain tensors."""
    import open_clip

    try:
        open_clip.load_checkpoint(model, path, strict=True, weights_only=True)
    except (pickle.UnpicklingError, SafetensorError) as err:  # weights_only refuses code payloads
        raise UnsafeCheckpointError(f"{path}: refused, not a plain tensor checkpoint ({first_line(err)})") from None
    except RuntimeError as err:  # load_state_dict's key and shape mismatches
        raise ValueError(f"{path}: weights do not match the model ({first_line(err)})") from None


def load_into(module: nn.Module, path: str, strict: bool = True) -> None:
    load_state(module, read_state_dict(path), path, strict)


def load_state(module: nn.Module, state: Dict[str, torch.Tensor], path: str, strict: bool = True) -> None:
    """Load `state` (read from `path`) into `module`; a ValueError naming the file when they do not match."""
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes differ; torch's first line only says "Error(s) in loading state_dict"
        detail = [line.strip() for line in str(err).splitlines() if line.strip()][1:2] or [first_line(err)]
        raise ValueError(f"{path}: weights do not match the model ({detail[0]})") from None
    if strict and (missing or unexpected):
        raise ValueError(f"{path}: weights do not match the model "
                         f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")



def text_tower_keys(model: nn.Module) -> list:
    """Names of the text tower's parameters: `text.*` for CustomTextCLIP, the non-visual ones for CLIP."""
    skip = ("visual.", "logit_scale", "logit_bias")
    return [k for k in model.state_dict() if not k.startswith(skip)]


def load_text_tower(model: nn.Module, path: str) -> None:
    state = read_state_dict(path)
    expected = set(text_tower_keys(model))
    unknown = [k for k in state if k not in expected]
    missing = [k for k in expected if k not in state and k != "attn_mask"]
    if unknown or missing:
        raise ValueError(f"{path}: text weights do not match the text tower "
                         f"(unknown {unknown[:3]}, missing {missing[:3]})")
    load_state(model, state, path, strict=False)


def save_weights(state: Dict[str, torch.Tensor], path: Path) -> None:
    """Write tensors to safetensors; tensors sharing storage are copied (safetensors refuses aliasing)."""
    shared = _shared(state)
    tensors = {}
    for key, value in state.items():
        value = value.detach().contiguous()
        tensors[key] = value.clone() if value.data_ptr() in shared else value
    save_file(tensors, str(path))


def _shared(state: Dict[str, torch.Tensor]) -> set:
    seen, shared = set(), set()
    for v in state.values():
        ptr = v.data_ptr()
        (shared if ptr in seen else seen).add(ptr)
    return shared
