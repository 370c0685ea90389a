"""Experiment trackers through Accelerate: TensorBoard by default, wandb offline; both hold what metrics.jsonl
holds, and the run config. Unknown or uninstalled trackers are refused before any work."""
from __future__ import annotations

import glob
import json
import struct
from pathlib import Path

import pytest

from mmcl.trainer.logs import read_metrics

BLOCK, HEADER = 32768, 7  # the LevelDB log layout of a wandb offline run file (after its 7-byte file header)


def wandb_records(path: str) -> list:
    """The protobuf records of an offline wandb run file (`run-ID.wandb`): LevelDB-log blocks of 32 KiB,
    each record a 7-byte header (crc, length, type: 1 full, 2 first, 3 middle, 4 last) and its payload."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    records, pos, parts = [], HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if length == 0 and kind == 0:
            pos += left
            continue
        parts += data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            records.append(record)
            parts = b""
    return records


def wandb_history_and_config(run_dir: Path):
    [path] = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    history, config = [], {}
    name = (lambda item: item.key or "/".join(item.nested_key))
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({name(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "config":
            config.update({name(item): json.loads(item.value_json) for item in record.config.update})
    return history, config


def tensorboard_scalars(run_dir: Path, tag: str) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in glob.glob(str(run_dir / "tb" / "**" / "events.out.tfevents.*"), recursive=True):
        acc = EventAccumulator(events)
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values


@pytest.mark.slow
def test_wandb_offline_and_tensorboard_hold_the_logged_metrics_and_config(tiny_recipe, run_mmcl, tmp_path):
    pytest.importorskip("wandb")
    recipe = tiny_recipe({"train.max_steps": 4, "train.log_every": 1, "train.log_with": ["tensorboard", "wandb"],
                          "train.tracker_kwargs": {"wandb": {"tags": ["test"]}}})
    done = run_mmcl(["train", recipe], env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert done.returncode == 0, done.stderr[-2000:]
    run_dir = tmp_path / "run"
    losses = {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}
    assert sorted(losses) == [1, 2, 3, 4]
    history, config = wandb_history_and_config(run_dir)
    logged = {row["_step"]: row["loss"] for row in history if "loss" in row}
    assert logged == pytest.approx(losses, rel=1e-6)
    assert config["optim.lr"] == 2.0e-3 and config["train.max_steps"] == 4 and config["objective.name"] == "clip"
    assert tensorboard_scalars(run_dir, "loss") == pytest.approx(losses, rel=1e-6)


@pytest.mark.parametrize("log_with,message", [
    (["bogus"], "train.log_with[0]: unknown tracker 'bogus' (Accelerate has: aim, "),
    (["tensorboard", "tensorboard"], "train.log_with: a tracker is named twice"),
])
def test_bad_trackers_are_refused_before_any_work(tiny_recipe, tmp_path, log_with, message):
    from mmcl.config import ConfigError, load_recipe

    with pytest.raises(ConfigError) as err:
        load_recipe(str(tiny_recipe({"train.log_with": log_with})))
    assert str(err.value).startswith(message)
    assert not (tmp_path / "run").exists()


def test_an_uninstalled_tracker_is_refused_naming_the_package(tiny_recipe):
    import accelerate.utils

    from mmcl.config import ConfigError, load_recipe
    from mmcl.trainer.trackers import known_trackers

    missing = [n for n in known_trackers() if not getattr(accelerate.utils, f"is_{n}_available")()]
    assert missing, "every tracker Accelerate knows is installed here"
    with pytest.raises(ConfigError, match=rf"train.log_with\[0\]: tracker {missing[0]} is not installed \(pip install"):
        load_recipe(str(tiny_recipe({"train.log_with": [missing[0]]})))


def test_tracker_kwargs_must_name_a_tracker_in_use(tiny_recipe):
    from mmcl.config import ConfigError, load_recipe

    with pytest.raises(ConfigError, match="train.tracker_kwargs.wandb: wandb is not in train.log_with"):
        load_recipe(str(tiny_recipe({"train.tracker_kwargs": {"wandb": {"entity": "x"}}})))


def test_no_tracker_writes_only_the_jsonl(tiny_recipe, tmp_path):
    from mmcl.config import load_recipe
    from mmcl.trainer import train

    train(load_recipe(str(tiny_recipe({"train.max_steps": 2, "train.log_with": []}))))
    assert read_metrics(tmp_path / "run") and not (tmp_path / "run" / "tb").exists()
