"""Two real processes (torchrun, gloo) train exactly like one process on the global batch."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import CPU_ONLY, REPO, subprocess_env, tiny_tree, torchrun
from mmcl import runs
from mmcl.train.logs import read_metrics

WORKER = REPO / "tests" / "dist_workers" / "train_worker.py"


def _load_worker():
    spec = importlib.util.spec_from_file_location("train_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _load_worker()


@pytest.fixture(scope="module")
def worker_recipe(tmp_path_factory, digits_root):
    path = tmp_path_factory.mktemp("recipe") / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_tree(digits_root, path.parent / "run")))
    return path


@pytest.fixture(scope="module")
def two_process_out(tmp_path_factory, worker_recipe):
    out = tmp_path_factory.mktemp("two_processes")
    command = [sys.executable] + torchrun(2) + [str(WORKER), str(worker_recipe), str(out)]
    done = subprocess.run(command, cwd=REPO, env=subprocess_env(**CPU_ONLY), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(worker.CASES))
def test_two_processes_train_like_one_process_on_the_global_batch(case, two_process_out, worker_recipe, tmp_path,
                                                                   fresh_accelerate_state):
    report = json.loads((two_process_out / f"{case}.json").read_text())
    assert report["world"] == 2 and report["backend"] == "gloo"
    run, losses, moved = worker.train_steps(str(worker_recipe), worker.CASES[case] + [f"train.output_dir={tmp_path / 'run'}"])
    assert run.accelerator.num_processes == 1
    assert moved > 1e-3 and report["moved"] > 1e-3  # the steps changed the weights: the comparison is not vacuous
    torch.testing.assert_close(torch.tensor(report["losses"]), torch.tensor(losses), atol=1e-5, rtol=0)
    distributed, single = load_file(str(two_process_out / f"{case}.safetensors")), run.objective.state_dict()
    assert distributed.keys() == single.keys()
    for key, value in single.items():
        torch.testing.assert_close(distributed[key], value, atol=1e-4, rtol=0, msg=f"{case}: {key}")


@pytest.mark.slow
def test_two_process_run_on_the_digits_stream(tiny_recipe, run_mmcl, tmp_path):
    recipe = tiny_recipe({"train.max_steps": 4, "data.workers": 1})
    done = run_mmcl(["train", recipe], launcher=torchrun(2), env=CPU_ONLY)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = tmp_path / "run"
    assert [p.name for p in (run_dir / runs.CHECKPOINTS).iterdir()] == ["step_00000004"]
    assert runs.read_meta(run_dir / runs.CHECKPOINTS / "step_00000004")["samples"] == 4 * 32 * 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["samples"] == 4 * 32 * 2
    assert [r["step"] for r in read_metrics(run_dir)] == [2, 4]  # only the main process logs
