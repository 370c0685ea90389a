"""Faults injected into real runs: kills at random steps and mid-checkpoint, a full disk, NaN losses and
gradients, a dead or hung process. Each test asserts what docs/reliability.md promises."""
from __future__ import annotations

import json
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import CPU_ONLY, REPO, set_dotted, subprocess_env, tiny_tree, torchrun
from mmcl import objectives, runs
from mmcl.config import ConfigError, load_recipe
from mmcl.objectives.clip import ClipObjective
from mmcl.trainer import TrainingError, checkpoint, train
from mmcl.trainer.finish import summary_table
from mmcl.trainer.logs import read_metrics

STEPS, SAVE_EVERY = 24, 4
# Three epochs of 10 steps, so kills and resumes land mid-epoch and across epoch boundaries.
KILL_RUN = {"train.max_steps": STEPS, "train.save_every": SAVE_EVERY, "train.keep_last": 2, "train.log_every": 1,
            "train.batch_size": 16, "data.samples_per_epoch": 160, "train.epochs": 3}
KILL_WINDOWS = ((5, 9), (11, 15), (17, 20))  # one kill drawn in each; the first after the first checkpoint


def write_recipe(path: Path, digits_root: str, output_dir: Path, changes: Dict) -> Path:
    tree = tiny_tree(digits_root, output_dir)
    for dotted, value in changes.items():
        set_dotted(tree, dotted, value)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def start_mmcl(args: list, log: Path, env: Optional[Dict[str, str]] = None, launcher: Optional[list] = None,
               preexec: Optional[Callable] = None) -> subprocess.Popen:
    command = [sys.executable] + (launcher or []) + ["-m", "mmcl"] + [str(a) for a in args]
    with open(log, "w") as sink:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, cwd=REPO, env=subprocess_env(**(env or {})), stdout=sink,
                                stderr=subprocess.STDOUT, preexec_fn=preexec)


def finish(process: subprocess.Popen, timeout: float = 300) -> int:
    try:
        return process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def wait_until(condition: Callable[[], bool], process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, "the run ended before the fault could be injected"
        assert time.time() < deadline, "timed out waiting for the run"
        time.sleep(0.02)


def latest_step(run_dir: Path) -> int:
    latest = runs.latest_checkpoint(run_dir)
    return runs.read_meta(latest)["step"] if latest else 0


def logged_step(run_dir: Path) -> int:
    return max((r["step"] for r in read_metrics(run_dir)), default=0)


def final_weights(run_dir: Path, step: int = STEPS) -> dict:
    return load_file(str(run_dir / runs.CHECKPOINTS / runs.checkpoint_name(step) / runs.WEIGHTS))


def assert_same_weights(expected: dict, got: dict) -> None:
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), f"{key}: max diff {(expected[key] - got[key]).abs().max()}"


def assert_loadable(ckpt: Path) -> dict:
    """The checkpoint's files read back (tensors only, pickles refused) and agree on the step."""
    tensors = load_file(str(ckpt / runs.WEIGHTS))
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    state = torch.load(ckpt / runs.STATE, map_location="cpu", weights_only=True)
    assert state["train_state"]["step"] == runs.read_meta(ckpt)["step"]
    return tensors


def assert_run_dir_holds_its_files(run_dir: Path) -> None:
    """What a kill after the first save interval must leave: resolved config, logs, a loadable checkpoint."""
    assert load_recipe(str(run_dir / runs.CONFIG)).train.output_dir == str(run_dir)
    assert json.loads((run_dir / runs.MODEL_CONFIG).read_text())["model_cfg"]
    assert read_metrics(run_dir), "no metrics logged"
    assert runs.latest_checkpoint(run_dir) is not None
    assert_loadable(runs.latest_checkpoint(run_dir))


@pytest.fixture(scope="module")
def kill_recipe(tmp_path_factory, digits_root) -> Path:
    folder = tmp_path_factory.mktemp("kills")
    return write_recipe(folder / "recipe.yaml", digits_root, folder / "unused", KILL_RUN)


@pytest.fixture(scope="module")
def reference(kill_recipe, tmp_path_factory) -> Path:
    """The uninterrupted run that every killed-and-resumed run must end up equal to (in this process: the
    subprocess runs use one thread too, so the arithmetic is the same, and a start-up is saved)."""
    from accelerate.state import AcceleratorState

    run_dir = tmp_path_factory.mktemp("reference") / "run"
    try:
        train(load_recipe(str(kill_recipe), [f"train.output_dir={run_dir}"]))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    return run_dir


def run_to_end_in(recipe: Path, run_dir: Path, log: Path, env: Optional[Dict[str, str]] = None) -> int:
    return finish(start_mmcl(["train", recipe, f"train.output_dir={run_dir}"], log, env))


# ---- 1 and 6: SIGKILL at three random moments; the run directory is always usable ------------------------

def kill_once(recipe: Path, run_dir: Path, target: int, delay: float, log: Path) -> None:
    """Start (or resume) the run; once it wrote a new checkpoint, so this attempt made progress, and logged
    step `target`, wait `delay` seconds and SIGKILL it: mid-step, mid-log-write or mid-save, wherever it falls."""
    resumed_from = latest_step(run_dir)
    process = start_mmcl(["train", recipe, f"train.output_dir={run_dir}"], log)
    try:
        wait_until(lambda: latest_step(run_dir) > resumed_from and logged_step(run_dir) >= target, process)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
    finally:
        finish(process, timeout=60)
    assert process.returncode == -signal.SIGKILL, log.read_text()[-3000:]


@pytest.mark.slow
def test_three_random_kills_then_resume_equal_an_uninterrupted_run(kill_recipe, reference, tmp_path):
    rng, run_dir = random.Random(7), tmp_path / "run"
    for lo, hi in KILL_WINDOWS:
        target = rng.randint(lo, hi)
        kill_once(kill_recipe, run_dir, target, rng.uniform(0.0, 0.2), tmp_path / f"killed_at_{target}.log")
        assert_run_dir_holds_its_files(run_dir)

    log = tmp_path / "final.log"
    assert run_to_end_in(kill_recipe, run_dir, log) == 0, log.read_text()[-3000:]
    assert_same_weights(final_weights(reference), final_weights(run_dir))
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in read_metrics(run_dir)] == [r["loss"] for r in read_metrics(reference)]


# ---- 2: SIGKILL while a checkpoint is being written -----------------------------------------------------

@pytest.mark.slow
def test_kill_during_checkpoint_write_keeps_the_previous_one(kill_recipe, reference, tmp_path):
    run_dir, doomed = tmp_path / "run", 2 * SAVE_EVERY
    log = tmp_path / "killed.log"
    code = run_to_end_in(kill_recipe, run_dir, log, env={"MMCL_FAULT": f"kill-during-save:{doomed}"})
    assert code == -signal.SIGKILL, log.read_text()[-3000:]

    partial = run_dir / runs.CHECKPOINTS / (runs.checkpoint_name(doomed) + ".tmp")
    assert (partial / runs.WEIGHTS).is_file() and not (partial / runs.META).exists()  # died mid-write
    assert not (run_dir / runs.CHECKPOINTS / runs.checkpoint_name(doomed)).exists()
    assert latest_step(run_dir) == SAVE_EVERY  # the previous checkpoint is still the newest complete one
    assert_loadable(runs.latest_checkpoint(run_dir))

    log = tmp_path / "resumed.log"
    assert run_to_end_in(kill_recipe, run_dir, log) == 0, log.read_text()[-3000:]
    assert_same_weights(final_weights(reference), final_weights(run_dir))
    assert not partial.exists()  # swept at the next save


# ---- 3: the disk fills up at a checkpoint ---------------------------------------------------------------

def file_size_limit(limit: int) -> Callable[[], None]:
    """Run in the child before exec: writes past `limit` bytes fail with EFBIG, as on a full disk."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow
def test_disk_full_at_a_checkpoint_is_a_one_line_error_and_keeps_the_last_one(tiny_recipe, tmp_path,
                                                                               fresh_accelerate_state):
    run_dir = tmp_path / "run"
    train(load_recipe(str(tiny_recipe({"train.max_steps": 2}))))  # leaves the complete checkpoint of step 2
    good = runs.latest_checkpoint(run_dir)
    weights_size, state_size = ((good / name).stat().st_size for name in (runs.WEIGHTS, runs.STATE))
    limit = (weights_size + state_size) // 2  # the weights of the next checkpoint fit, the optimizer state not
    assert weights_size < limit < state_size

    recipe = tiny_recipe({"train.max_steps": 4, "train.save_every": 2}, name="longer.yaml")
    log = tmp_path / "full.log"
    code = finish(start_mmcl(["train", recipe], log, preexec=file_size_limit(limit)))
    errors = [line for line in log.read_text().splitlines() if line.startswith("mmcl: error:")]
    assert code == 1 and len(errors) == 1, log.read_text()[-3000:]
    failed = run_dir / runs.CHECKPOINTS / runs.checkpoint_name(4)
    assert str(failed) in errors[0] and "[Errno 27] File too large" in errors[0]
    assert f"the last good checkpoint is {good}" in errors[0]
    assert "Traceback" not in log.read_text()
    assert sorted(p.name for p in (run_dir / runs.CHECKPOINTS).iterdir()) == [good.name]  # no partial folder
    assert_loadable(good)
    assert runs.is_run_dir(run_dir) and read_metrics(run_dir)


# ---- 4: NaN / inf losses and gradients ------------------------------------------------------------------

def faulty_clip(nan_at=(), inf_grad_at=(), snapshot_at=()) -> type:
    """CLIP whose loss is NaN at the steps `nan_at`, and finite with an infinite gradient at `inf_grad_at`.

    It records the weights before the steps `snapshot_at`, and the instance the trainer built."""

    class FaultyClip(ClipObjective):
        snapshots: Dict[int, dict] = {}
        instances: list = []

        def __init__(self, model, recipe):
            super().__init__(model, recipe)
            self.step = 0
            FaultyClip.instances.append(self)

        def before_step(self, step: int, total_steps: int) -> None:
            self.step = step
            if step in snapshot_at:
                FaultyClip.snapshots[step] = {k: v.clone() for k, v in self.state_dict().items()}

        def losses(self, features):
            out = super().losses(features)
            if self.step in nan_at:
                out["loss"] = out["loss"] * float("nan")
            if self.step in inf_grad_at:  # adds exactly 0, but d/dt sqrt(t - t) is infinite at 0
                t = self.model.logit_scale
                out["loss"] = out["loss"] + torch.sqrt(t - t.detach())
            return out

    return FaultyClip


def test_non_finite_steps_are_skipped_counted_and_leave_the_weights_alone(tiny_recipe, tmp_path, monkeypatch,
                                                                            fresh_accelerate_state):
    faulty = faulty_clip(nan_at={2}, inf_grad_at={5}, snapshot_at={1, 2, 3, 5, 6})
    monkeypatch.setitem(objectives.REGISTRY, "clip", faulty)
    recipe = tiny_recipe({"train.max_steps": 8, "train.max_bad_steps": 2, "train.log_every": 1})
    summary = train(load_recipe(str(recipe)))

    assert summary["skipped_steps"] == 2 and summary["steps"] == 8  # not two in a row: the run goes on
    logged = read_metrics(tmp_path / "run")
    assert [r["skipped_steps"] for r in logged] == [0, 0, 1, 1, 1, 2, 2, 2]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["skipped_steps"] == 2
    snap = faulty.snapshots
    for bad in (2, 5):
        assert_same_weights(snap[bad], snap[bad + 1])  # the skipped step changed nothing
    assert not torch.equal(snap[1]["model.logit_scale"], snap[2]["model.logit_scale"])  # a good step does
    assert all(torch.isfinite(p).all() for p in faulty.instances[-1].parameters())


@pytest.mark.parametrize("save_every, first_bad, names_checkpoint", [(2, 5, True), (0, 0, False)],
                         ids=["after-checkpoints", "before-any-checkpoint"])
def test_too_many_non_finite_steps_in_a_row_stop_the_run_without_saving(save_every, first_bad, names_checkpoint,
                                                                        tiny_recipe, tmp_path, monkeypatch,
                                                                        fresh_accelerate_state):
    faulty = faulty_clip(nan_at=set(range(first_bad, 100)))
    monkeypatch.setitem(objectives.REGISTRY, "clip", faulty)
    recipe = tiny_recipe({"train.max_steps": 20, "train.save_every": save_every, "train.max_bad_steps": 3})
    with pytest.raises(TrainingError) as stopped:
        train(load_recipe(str(recipe)))

    message, run_dir = str(stopped.value), tmp_path / "run"
    assert f"3 non-finite steps (loss or gradients) in a row at step {first_bad + 3}" in message
    if not names_checkpoint:
        assert "no checkpoint was written" in message and runs.latest_checkpoint(run_dir) is None
        return
    good = run_dir / runs.CHECKPOINTS / runs.checkpoint_name(4)
    assert message.endswith(f"the last good checkpoint is {good}")
    assert runs.complete_checkpoints(run_dir) == [run_dir / runs.CHECKPOINTS / runs.checkpoint_name(2), good]
    assert_loadable(good)
    objective = faulty.instances[-1]
    state = checkpoint.load(good, objective)  # strict: every weight and buffer of the run
    assert state["train_state"]["step"] == 4
    assert all(torch.isfinite(p).all() for p in objective.parameters())


# ---- 5: a process of two dies, or hangs ------------------------------------------------------------------

def start_two_processes(tiny_recipe, tmp_path: Path, changes: Dict) -> tuple:
    """A long two-process run; returns (torchrun process, log, {rank: worker}) once step 1 is logged."""
    recipe = tiny_recipe({"train.max_steps": 2000, "train.epochs": 20, "train.batch_size": 16,
                          "train.log_every": 1, **changes})
    log = tmp_path / "torchrun.log"
    process = start_mmcl(["train", recipe], log, env=CPU_ONLY, launcher=torchrun(2))
    wait_until(lambda: logged_step(tmp_path / "run") >= 1, process)
    workers = {}
    for child in psutil.Process(process.pid).children(recursive=True):
        rank = child.environ().get("RANK")
        if rank is not None:
            workers[int(rank)] = child
    assert sorted(workers) == [0, 1], log.read_text()[-3000:]
    return process, log, workers


def wait_gone(process: psutil.Process, timeout: float) -> float:
    """Seconds until `process` exits (a zombie waiting for its parent counts as gone)."""
    start = time.time()
    while time.time() - start < timeout:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    return time.time() - start


def stop_all(process: subprocess.Popen, workers: Dict[int, psutil.Process]) -> None:
    for worker in workers.values():
        try:
            worker.kill()
        except psutil.NoSuchProcess:
            pass
    if process.poll() is None:
        process.kill()
    process.wait(timeout=60)


@pytest.mark.slow
def test_dead_process_makes_the_other_exit_with_an_error(tiny_recipe, tmp_path):
    process, log, workers = start_two_processes(tiny_recipe, tmp_path, {"train.dist_timeout_s": 60})
    try:
        workers[1].send_signal(signal.SIGKILL)
        start = time.time()
        code = process.wait(timeout=90)
        assert time.time() - start < 90 and code != 0, log.read_text()[-3000:]
        assert wait_gone(workers[0], timeout=10) < 10  # the survivor does not linger
    finally:
        stop_all(process, workers)


@pytest.mark.slow
def test_hung_process_fails_the_run_after_the_process_group_timeout(tiny_recipe, tmp_path):
    timeout = 20  # long enough for a slow, shared box's start-up skew; far below torch's 30-minute default
    process, log, workers = start_two_processes(tiny_recipe, tmp_path, {"train.dist_timeout_s": timeout})
    try:
        workers[1].send_signal(signal.SIGSTOP)  # alive but silent: nothing but a timeout can notice
        waited = wait_gone(workers[0], timeout=timeout + 60)
        assert waited < timeout + 60, "the waiting process hung past its process-group timeout"
        workers[1].send_signal(signal.SIGCONT)  # let the launcher's SIGTERM through
        assert process.wait(timeout=60) != 0
        assert "timed out" in log.read_text().lower(), log.read_text()[-3000:]
    finally:
        stop_all(process, workers)


# ---- configuration and console summary ------------------------------------------------------------------

def test_dist_timeout_must_be_positive(tiny_recipe):
    with pytest.raises(ConfigError, match=r"^train\.dist_timeout_s: must be > 0"):
        load_recipe(str(tiny_recipe()), ["train.dist_timeout_s=0"])
    assert load_recipe(str(tiny_recipe())).train.dist_timeout_s == 600


def test_console_summary_lists_skipped_samples_by_kind():
    table = summary_table({"steps": 8, "samples": 256, "final_loss": 1.5, "skipped_steps": 1, "eval": [],
                           "skipped_samples": {"corrupt_image": 2, "empty_caption": 1, "read_error": 0}})
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in table.splitlines()[2:]}
    assert rows["skipped samples"] == "3"
    assert rows["skipped: corrupt_image"] == "2" and rows["skipped: empty_caption"] == "1"
    assert "skipped: read_error" not in rows
    assert rows["skipped steps (non-finite)"] == "1"
