"""Checkpoints that survive crashes: write into `NAME.tmp`, fsync, rename, and mark complete with meta.json.

A reader only trusts folders holding meta.json (mmcl.runs.complete_checkpoints), so a kill at any moment
leaves the previous checkpoint as "latest". A write that fails (disk full, quota, file size limit) removes its
`.tmp` folder and raises `CheckpointWriteError` naming the folder and the OS error. The training state is
loaded with `weights_only=True`.

Test hook: with the environment variable `MMCL_FAULT=kill-during-save:STEP` the process SIGKILLs itself while
writing the checkpoint of STEP, after model.safetensors is in `NAME.tmp` and before the rename (a real kill
lands in that window too rarely to test, since a small checkpoint is written in milliseconds).
"""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch
from safetensors import SafetensorError
from torch import nn

from mmcl import runs
from mmcl.config import first_line
from mmcl.models import weights
from mmcl.trainer import fsdp


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


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; its partial folder was removed, earlier checkpoints are untouched."""


def save(run_dir: Path, step: int, module: nn.Module, state: Dict[str, Any], meta: Dict[str, Any]) -> Path:
    """Write a complete checkpoint for `step` atomically and return its folder. `module` may also be its state
    dict, already gathered (FSDP)."""
    root = Path(run_dir) / runs.CHECKPOINTS
    final = root / runs.checkpoint_name(step)
    tmp = root / (final.name + ".tmp")
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write_files(tmp, step, module, state, meta)
        shutil.rmtree(final, ignore_errors=True)  # a stale copy from an earlier, abandoned run
        os.replace(tmp, final)
        fsync_dir(root)
    # torch and safetensors wrap the OS error of a failed write in their own exception types
    except (OSError, RuntimeError, SafetensorError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"could not write checkpoint {final} ({os_error(err)})") from err
    return final


def write_files(folder: Path, step: int, module: nn.Module, state: Dict[str, Any], meta: Dict[str, Any]) -> None:
    weights.save_weights(module if isinstance(module, dict) else module.state_dict(), folder / runs.WEIGHTS)
    if os.environ.get("MMCL_FAULT") == f"kill-during-save:{step}":  # test hook, see the module docstring
        os.kill(os.getpid(), signal.SIGKILL)
    with open(folder / runs.STATE, "wb") as fh:  # a file object, so the OS error stays in the exception chain
        torch.save(state, fh)
    (folder / runs.META).write_text(json.dumps({"step": step, **meta}))
    for name in (runs.WEIGHTS, runs.STATE, runs.META):
        with open(folder / name, "rb") as fh:
            os.fsync(fh.fileno())


def os_error(err: BaseException) -> str:
    """The OS error behind `err` (e.g. `[Errno 28] No space left on device`), else its first line."""
    seen = err
    for _ in range(8):  # a short walk down the chain; chains can, rarely, loop
        if isinstance(seen, OSError) and seen.errno is not None:
            return f"[Errno {seen.errno}] {seen.strerror}"
        seen = seen.__cause__ or seen.__context__
        if seen is None:
            break
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def prune(run_dir: Path, keep_last: int) -> None:
    """Remove all but the newest `keep_last` complete checkpoints, and stale temporaries (left by a kill)."""
    for old in runs.complete_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in (Path(run_dir) / runs.CHECKPOINTS).glob("*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def load(checkpoint: Path, module: nn.Module) -> Dict[str, Any]:
    """Restore module weights and buffers; return the training state (optimizer, RNG, data position)."""
    path = str(checkpoint / runs.WEIGHTS)
    full = weights.read_state_dict(path)
    weights.load_state(module, fsdp.shard_like(full, module), path, strict=True)  # FSDP: this process's shards
    try:
        return torch.load(checkpoint / runs.STATE, map_location="cpu", weights_only=True)
    # weights_only refuses anything but tensors and plain containers (UnpicklingError); garbage fails otherwise
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise weights.UnsafeCheckpointError(f"{checkpoint / runs.STATE}: refused ({first_line(err)})") from None
