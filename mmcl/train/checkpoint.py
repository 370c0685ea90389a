"""Checkpoints that survive crashes: write into `NAME.tmp`, fsync, rename, and mark complete with meta.json.

A reader only trusts folders holding meta.json (mmcl.runs.complete_checkpoints), so a kill at any moment
leaves the previous checkpoint as "latest". The training state is loaded with `weights_only=True`.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch
from torch import nn

from mmcl import runs
from mmcl.models import weights


def rng_state() -> Dict[str, Any]:
    state = {"python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
             "numpy": np.random.get_state()[1].tolist(), "numpy_pos": int(np.random.get_state()[2]),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(run_dir: Path, step: int, module: nn.Module, state: Dict[str, Any], meta: Dict[str, Any]) -> Path:
    """Write a complete checkpoint for `step` atomically and return its folder."""
    root = Path(run_dir) / runs.CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / runs.checkpoint_name(step)
    tmp = root / (final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights.save_weights(module.state_dict(), tmp / runs.WEIGHTS)
    torch.save(state, tmp / runs.STATE)
    (tmp / runs.META).write_text(json.dumps({"step": step, **meta}))
    for name in (runs.WEIGHTS, runs.STATE, runs.META):
        with open(tmp / name, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)  # a stale copy from an earlier, abandoned run
    os.replace(tmp, final)
    fsync_dir(root)
    return final


def prune(run_dir: Path, keep_last: int) -> None:
    """Remove all but the newest `keep_last` complete checkpoints, and stale temporaries (left by a kill)."""
    for old in runs.complete_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in (Path(run_dir) / runs.CHECKPOINTS).glob("*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def load(checkpoint: Path, module: nn.Module) -> Dict[str, Any]:
    """Restore module weights and buffers; return the training state (optimizer, RNG, data position)."""
    module.load_state_dict(weights.read_state_dict(str(checkpoint / runs.WEIGHTS)), strict=True)
    try:
        return torch.load(checkpoint / runs.STATE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refuses anything but tensors and plain containers
        first = str(err).strip().splitlines()[0] if str(err).strip() else "not plain data"
        raise weights.UnsafeCheckpointError(f"{checkpoint / runs.STATE}: refused ({first})") from None
