"""Experiment trackers through Accelerate's tracker API: TensorBoard by default, wandb, mlflow, aim, trackio, ...

`train.log_with` names Accelerate trackers; the trainer calls `accelerator.init_trackers` once with the run
config (flattened to dotted keys, since TensorBoard's hparams take scalars only), `accelerator.log` for every
record it also writes to metrics.jsonl (which stays the source of truth), and finishes the trackers at the end
(not `accelerator.end_training`, which would also end the process group).
Local trackers write inside the run directory: TensorBoard to RUN/tb/, wandb's files to RUN/wandb/ (offline
with `WANDB_MODE=offline`, no network needed).
"""
from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any, Dict, List

from mmcl.config import ConfigError, Recipe

TB_DIR = "tb"


def known_trackers() -> List[str]:
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    return sorted(LOGGER_TYPE_TO_CLASS)


def check_trackers(names: List[str]) -> None:
    """Refuse unknown or uninstalled trackers before any work (Accelerate itself would drop them silently)."""
    known = known_trackers()
    for i, name in enumerate(names):
        if name not in known:
            raise ConfigError(f"train.log_with[{i}]: unknown tracker {name!r} (Accelerate has: {', '.join(known)})")
        available = getattr(importlib.import_module("accelerate.utils"), f"is_{name}_available")
        if not available():
            package = {"tensorboard": "tensorboard", "comet_ml": "comet-ml"}.get(name, name)
            raise ConfigError(f"train.log_with[{i}]: tracker {name} is not installed (pip install {package})")
    if len(set(names)) != len(names):
        raise ConfigError(f"train.log_with: a tracker is named twice in {names}")


def accelerator_kwargs(recipe: Recipe) -> Dict[str, Any]:
    """`Accelerator(...)` arguments for the trackers: their names and the folder local trackers write under."""
    if not recipe.train.log_with:
        return {}
    from accelerate.utils import ProjectConfiguration

    run_dir = Path(recipe.train.output_dir)
    return {"log_with": list(recipe.train.log_with),
            "project_config": ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / TB_DIR))}


def flat_config(recipe: Recipe) -> Dict[str, Any]:
    """The run config as dotted keys with scalar values (lists and mappings as their text)."""
    flat: Dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[prefix] = value
        else:
            flat[prefix] = str(value)

    walk("", dataclasses.asdict(recipe))
    return flat


def start(accelerator, recipe: Recipe, start_step: int) -> None:
    """Open the trackers (main process only; Accelerate makes the other processes no-ops)."""
    if not recipe.train.log_with:
        return
    run_dir = Path(recipe.train.output_dir)
    defaults = {"tensorboard": {"purge_step": start_step + 1},  # a resumed run rewrites the steps after its checkpoint
                "wandb": {"name": run_dir.name, "dir": str(run_dir)}}
    init_kwargs = {name: {**defaults.get(name, {}), **recipe.train.tracker_kwargs.get(name, {})}
                   for name in recipe.train.log_with}
    if "wandb" in init_kwargs and accelerator.is_main_process:
        Path(init_kwargs["wandb"]["dir"]).mkdir(parents=True, exist_ok=True)  # wandb wants it to exist
    accelerator.init_trackers(recipe.train.tracker_project, config=flat_config(recipe), init_kwargs=init_kwargs)


def scalars(record: Dict[str, Any]) -> Dict[str, float]:
    """The numbers of a metrics record (not the step; None stands for a non-finite value and is left out)."""
    return {k: v for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
