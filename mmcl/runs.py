"""The layout of a run directory, shared by the trainer, the exporter and the evaluator.

RUN/config.yaml                  the resolved recipe
RUN/open_clip_config.json        {"model_cfg", "preprocess_cfg"}: the towers as open_clip describes them
RUN/checkpoints/step_00000100/   model.safetensors (every module's weights and buffers), state.pt
                                 (optimizer, scheduler, scaler, RNG, data position), meta.json (written last)
RUN/checkpoints/*.tmp            a checkpoint being written; never read
RUN/metrics.jsonl, RUN/tb/, RUN/plots/, RUN/summary.json
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

CONFIG = "config.yaml"
MODEL_CONFIG = "open_clip_config.json"
CHECKPOINTS = "checkpoints"
WEIGHTS = "model.safetensors"
STATE = "state.pt"
META = "meta.json"  # written last: its presence marks a complete checkpoint
MODEL_PREFIX = "model."  # the open_clip towers inside the saved module tree


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(run_dir: Path) -> List[Path]:
    """Complete checkpoints, oldest first. Temporary or half-written folders are ignored."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp") and (p / META).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def read_meta(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / META).read_text())


def is_run_dir(path: Path) -> bool:
    return (Path(path) / CONFIG).is_file() and (Path(path) / MODEL_CONFIG).is_file()


def write_text_atomic(path: Path, text: str) -> None:
    """Write a run file whole or not at all: into NAME.tmp, fsync, rename over NAME. A write that fails (disk
    full, quota, file-size limit) removes the temporary, leaves an earlier NAME as it was, and raises an
    OSError naming the file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        failed = OSError(f"could not write {path} ([Errno {err.errno}] {err.strerror or err})")
        failed.errno = err.errno
        raise failed from err
