"""Two real processes (torchrun, gloo) train exactly like one process on the global batch.

One worker run covers every case (tests/dist_workers/train_worker.py CASES): CLIP (global and local loss,
gradient clipping), SigLIP, SimCLR and MoCo v2, each without and with feature-cache accumulation; gradients
sent bucket by bucket during backward (the default), after backward, in tiny buckets, and towers sharded with
FSDP2. Each must end with the weights of one process on the doubled batch.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import CPU_ONLY, REPO, load_worker, subprocess_env, tiny_tree, torchrun
from mmcl import runs
from mmcl.trainer.logs import read_metrics

WORKER = REPO / "tests" / "dist_workers" / "train_worker.py"
worker = load_worker("train_worker")
WEIGHT_ATOL = 1e-6  # float32 sums in another order (two batches of b against one of 2b) differ by ~1e-7


@pytest.fixture(scope="module")
def worker_recipe(tmp_path_factory, digits_root):
    path = tmp_path_factory.mktemp("recipe") / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_tree(digits_root, path.parent / "run")))
    return path


@pytest.fixture(scope="module")
def two_process_out(tmp_path_factory, worker_recipe):
    out = tmp_path_factory.mktemp("two_processes")
    command = [sys.executable] + torchrun(2) + [str(WORKER), str(worker_recipe), str(out)]
    done = subprocess.run(command, cwd=REPO, env=subprocess_env(**CPU_ONLY), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def single_process(worker_recipe, tmp_path_factory):
    """The one-process run of each reference on the whole batches, computed once."""
    from accelerate.state import AcceleratorState

    cache = {}

    def get(name: str):
        if name not in cache:
            out = tmp_path_factory.mktemp(f"single_{name}")
            overrides = worker.COMMON + worker.REFERENCES[name] + [f"train.output_dir={out / 'run'}"]
            _, losses, moved, final = worker.train_steps(str(worker_recipe), overrides)
            AcceleratorState._reset_state(reset_partial_state=True)
            cache[name] = (losses, moved, final)
        return cache[name]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("case", list(worker.CASES))
def test_two_processes_train_like_one_process_on_the_global_batch(case, two_process_out, single_process):
    report = json.loads((two_process_out / f"{case}.json").read_text())
    assert report["world"] == 2 and report["backend"] == "gloo"
    losses, moved, single = single_process(worker.CASES[case][0])
    assert moved > 1e-3 and report["moved"] > 1e-3  # the steps changed the weights: the comparison is not vacuous
    torch.testing.assert_close(torch.tensor(report["losses"]), torch.tensor(losses), atol=1e-5, rtol=0)
    distributed = load_file(str(two_process_out / f"{case}.safetensors"))
    assert distributed.keys() == single.keys()
    for key, value in single.items():
        torch.testing.assert_close(distributed[key], value, atol=WEIGHT_ATOL, rtol=0, msg=f"{case}: {key}")


@pytest.mark.slow
@pytest.mark.parametrize("overlap, after", [("clip", "clip_after_backward"),
                                            ("clip_accum", "clip_accum_after_backward")])
def test_overlapped_sync_gives_the_same_bits_as_the_sync_after_backward(overlap, after, two_process_out):
    reports = [json.loads((two_process_out / f"{name}.json").read_text()) for name in (overlap, after)]
    assert reports[0]["sent_in_backward"] >= 1 and reports[1]["sent_in_backward"] == 0
    a, b = (load_file(str(two_process_out / f"{name}.safetensors")) for name in (overlap, after))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.slow
def test_small_buckets_are_sent_one_by_one_during_the_backward_pass(two_process_out):
    report = json.loads((two_process_out / "clip_small_buckets.json").read_text())
    assert report["buckets"] >= 8  # 0.05 MB buckets: a few parameters each
    assert report["sent_in_backward"] == report["buckets"]  # no accumulation: every gradient is ready in time


@pytest.mark.slow
def test_fsdp_checkpoint_is_full_and_resumes_into_shards_exactly(two_process_out):
    report = json.loads((two_process_out / "fsdp_resume.json").read_text())
    assert report["max_difference"] == 0.0  # weights and AdamW moments cut back into the same shards
    from mmcl import load_model

    model, _, _ = load_model(report["run_dir"])  # what eval and export read: full tensors, no FSDP
    saved = load_file(str(runs.latest_checkpoint(Path(report["run_dir"])) / runs.WEIGHTS))
    assert model.visual.conv1.weight.shape == saved["model.visual.conv1.weight"].shape == (64, 3, 8, 8)
    assert torch.equal(model.visual.conv1.weight, saved["model.visual.conv1.weight"])


@pytest.mark.slow
def test_two_process_fsdp_run_on_the_digits_stream(tiny_recipe, run_mmcl, tmp_path, digits_root):
    """`accelerate launch --use_fsdp` sets ACCELERATE_USE_FSDP (on a CPU it starts one process, so torchrun
    starts the two here): stream, sharded towers, full checkpoint, and the final evaluation of the gathered
    towers, which scores exactly what the saved checkpoint scores in one process."""
    recipe = tiny_recipe({"train.max_steps": 4, "data.workers": 1, "eval.datasets": [digits_root],
                          "eval.max_samples": 200, "eval.batch_size": 100})
    done = run_mmcl(["train", recipe], launcher=torchrun(2), env={**CPU_ONLY, "ACCELERATE_USE_FSDP": "true"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = tmp_path / "run"
    assert [p.name for p in (run_dir / runs.CHECKPOINTS).iterdir()] == ["step_00000004"]
    assert runs.read_meta(run_dir / runs.CHECKPOINTS / "step_00000004")["samples"] == 4 * 32 * 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["samples"] == 4 * 32 * 2
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [2, 4]  # only the main process logs
    import mmcl.eval as mmcl_eval
    from mmcl import load_model
    from mmcl.models import eval_preprocess

    model, _, tokenizer = load_model(str(run_dir))
    alone = mmcl_eval.evaluate_dataset(model, eval_preprocess(model), tokenizer, digits_root, split="test",
                                       batch_size=100, max_samples=200)
    assert summary["eval"][0]["metrics"]["acc1"] == alone["metrics"]["acc1"]
    assert summary["eval"][0]["samples"] == 200
