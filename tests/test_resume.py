"""Kill and resume: a run killed with SIGKILL and started again ends with exactly the weights of an uninterrupted run."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, subprocess_env
from mmcl import runs
from mmcl.trainer.logs import read_metrics

STEPS = 20
# Randomness everywhere it can hide: worker-process augmentation, a shuffle buffer, patch dropout in the model
# (it draws from the global torch RNG), and feature-cache accumulation (it replays that RNG per micro-batch).
RESUME_RECIPE = {"train.max_steps": STEPS, "train.save_every": 5, "train.keep_last": 2, "train.log_every": 1,
                 "train.deterministic": True, "train.accum_steps": 2, "data.workers": 1,
                 "data.samples_per_epoch": 256,  # 8 steps an epoch: the kill and the resume fall mid-epoch
                 "train.epochs": 3, "model.config.vision_cfg.patch_dropout": 0.25}


def train_command(recipe: Path, output_dir: Path) -> list:
    return [sys.executable, "-m", "mmcl", "train", str(recipe), f"train.output_dir={output_dir}"]


def run_to_end(recipe: Path, output_dir: Path) -> None:
    done = subprocess.run(train_command(recipe, output_dir), cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def kill_after_checkpoint(recipe: Path, output_dir: Path, step: int, log: Path) -> None:
    """Start a run and SIGKILL it as soon as the checkpoint of `step` is complete."""
    with open(log, "w") as sink:
        process = subprocess.Popen(train_command(recipe, output_dir), cwd=REPO, env=subprocess_env(),
                                   stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 240
            while process.poll() is None and time.time() < deadline:
                latest = runs.latest_checkpoint(output_dir)
                if latest is not None and runs.read_meta(latest)["step"] >= step:
                    break
                time.sleep(0.02)
            process.send_signal(signal.SIGKILL)
        finally:
            process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, log.read_text()[-3000:]


def final_weights(output_dir: Path) -> dict:
    return load_file(str(output_dir / runs.CHECKPOINTS / runs.checkpoint_name(STEPS) / runs.WEIGHTS))


def losses_by_step(output_dir: Path) -> list:
    return [(r["step"], r["loss"]) for r in read_metrics(output_dir) if "loss" in r]


@pytest.mark.slow
def test_killed_and_resumed_run_matches_uninterrupted_run(tiny_recipe, tmp_path):
    recipe = tiny_recipe(RESUME_RECIPE)
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run_to_end(recipe, reference)

    kill_after_checkpoint(recipe, resumed, step=10, log=tmp_path / "killed.log")
    killed_at = runs.read_meta(runs.latest_checkpoint(resumed))["step"]
    assert 10 <= killed_at < STEPS
    # What a kill can leave behind must be ignored: a checkpoint being written, and one without meta.json.
    junk_tmp = resumed / runs.CHECKPOINTS / (runs.checkpoint_name(killed_at + 5) + ".tmp")
    junk_tmp.mkdir(exist_ok=True)
    (junk_tmp / runs.WEIGHTS).write_bytes(b"half a file")
    junk_incomplete = resumed / runs.CHECKPOINTS / runs.checkpoint_name(killed_at + 1)
    junk_incomplete.mkdir()
    (junk_incomplete / runs.WEIGHTS).write_bytes(b"no meta.json next to me")

    run_to_end(recipe, resumed)  # train.resume defaults to auto

    expected, got = final_weights(reference), final_weights(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), f"{key}: max diff {(expected[key] - got[key]).abs().max()}"
    assert losses_by_step(resumed) == losses_by_step(reference)  # the log, too, reads as one run
    assert [r["step"] for r in read_metrics(resumed)] == list(range(1, STEPS + 1))
    assert [p.name for p in runs.complete_checkpoints(resumed)] == [runs.checkpoint_name(STEPS - 5),
                                                                   runs.checkpoint_name(STEPS)]
    assert not junk_tmp.exists()  # stale temporaries are swept at the next save


def test_resume_point_skips_temporary_and_incomplete_checkpoints(tmp_path):
    root = tmp_path / runs.CHECKPOINTS
    for name, complete in (("step_00000005", True), ("step_00000020", True), ("step_00000030.tmp", True),
                           ("step_00000040", False), ("step_00000100", False)):
        (root / name).mkdir(parents=True)
        (root / name / runs.WEIGHTS).write_bytes(b"")
        if complete:
            (root / name / runs.META).write_text('{"step": 0}')
    (root / "step_00000050").write_text("a file, not a folder")
    assert [p.name for p in runs.complete_checkpoints(tmp_path)] == ["step_00000005", "step_00000020"]
    assert runs.latest_checkpoint(tmp_path).name == "step_00000020"  # numeric order, .tmp and meta-less ignored
    assert runs.latest_checkpoint(tmp_path / "elsewhere") is None


def test_resume_none_starts_over(tiny_recipe, tmp_path, fresh_accelerate_state):
    """`train.resume: none` trains from step 0 again in the same folder and rewrites its log."""
    from mmcl.config import load_recipe
    from mmcl.trainer import train

    recipe = tiny_recipe({"train.max_steps": 2, "train.log_every": 1})
    train(load_recipe(str(recipe)))
    first = losses_by_step(tmp_path / "run")
    train(load_recipe(str(recipe), ["train.resume=none"]))
    assert losses_by_step(tmp_path / "run") == first
    assert [p.name for p in runs.complete_checkpoints(tmp_path / "run")] == ["step_00000002"]
