"""Training: a tiny CLIP learns the digits end to end; feature-cache accumulation is exact."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mmcl.eval as mmcl_eval
from conftest import E2E_KEEP, E2E_SAVE_EVERY, E2E_STEPS
from mmcl import runs
from mmcl.config import load_recipe
from mmcl import load_model
from mmcl.trainer import loop
from mmcl.trainer import setup as S
from mmcl.trainer import step as T
from mmcl.trainer.logs import read_metrics


@pytest.fixture(scope="module")
def e2e_run(trained_digits_run) -> Path:
    """`mmcl train` on the digits (conftest: shared with the search tests)."""
    return trained_digits_run


@pytest.mark.slow
def test_zero_shot_accuracy_far_above_chance(e2e_run, digits_root):
    model, preprocess, tokenizer = load_model(str(e2e_run))
    result = mmcl_eval.evaluate_dataset(model, preprocess, tokenizer, digits_root, split="test")
    assert result["task"] == "zeroshot_classification" and result["samples"] == 1000
    acc1 = result["metrics"]["acc1"]
    assert acc1 >= 0.5, f"zero-shot top-1 {acc1:.3f} (chance 0.1)"
    # The trainer's own final evaluation saw the same weights.
    summary = json.loads((e2e_run / "summary.json").read_text())
    assert summary["eval"][0]["metrics"]["acc1"] == pytest.approx(acc1, abs=1e-3)


@pytest.mark.slow
def test_loss_decreased(e2e_run):
    records = [r for r in read_metrics(e2e_run) if "loss" in r]
    assert [r["step"] for r in records] == list(range(10, E2E_STEPS + 1, 10))
    first, last = records[0]["loss"], records[-1]["loss"]
    assert last < first - 1.0, (first, last)
    summary = json.loads((e2e_run / "summary.json").read_text())
    assert summary["first_loss"] == first and summary["final_loss"] == last
    assert summary["steps"] == E2E_STEPS and summary["samples"] == E2E_STEPS * 64 and summary["skipped_steps"] == 0


@pytest.mark.slow
def test_run_directory(e2e_run):
    for name in (runs.CONFIG, runs.MODEL_CONFIG, "metrics.jsonl", "summary.json", "plots/loss.png"):
        assert (e2e_run / name).is_file(), name
    assert any((e2e_run / "tb").iterdir())
    kept = [p.name for p in runs.complete_checkpoints(e2e_run)]
    assert kept == [runs.checkpoint_name(s) for s in range(E2E_STEPS - (E2E_KEEP - 1) * E2E_SAVE_EVERY, E2E_STEPS + 1,
                                                           E2E_SAVE_EVERY)]
    assert sorted(p.name for p in (e2e_run / runs.CHECKPOINTS).iterdir()) == kept  # no temporaries left
    assert runs.read_meta(e2e_run / runs.CHECKPOINTS / kept[-1])["step"] == E2E_STEPS
    resolved = load_recipe(str(e2e_run / runs.CONFIG))  # the resolved recipe, overrides applied, loads again
    assert resolved.train.batch_size == 64 and resolved.optim.lr == 2e-3 and resolved.train.max_steps == E2E_STEPS
    config = json.loads((e2e_run / runs.MODEL_CONFIG).read_text())
    assert config["model_cfg"]["embed_dim"] == 32 and config["preprocess_cfg"]["size"] == 32


# ---- feature-cache accumulation -------------------------------------------------------------------------

def start_run(tiny_recipe, folder: Path, accum_steps: int):
    # Adam's first update is lr * g / (|g| + eps): a large eps keeps rounding-level gradient differences
    # (summation order) from being amplified where a gradient is nearly zero.
    recipe = tiny_recipe({"train.accum_steps": accum_steps, "train.output_dir": str(folder), "optim.eps": 1e-3},
                         name=f"{folder.name}.yaml")
    run, _ = loop.start(load_recipe(str(recipe)))
    return run


def digits_batch(run) -> dict:
    return next(S.epoch_batches(run.recipe, run.plan, run.spec, epoch=0, skip=0))


def gradients(objective) -> dict:
    return {name: p.grad.clone() for name, p in objective.named_parameters() if p.grad is not None}


def test_feature_cache_gives_the_gradients_of_the_whole_batch(tiny_recipe, tmp_path, fresh_accelerate_state):
    plain, cached = start_run(tiny_recipe, tmp_path / "plain", 1), start_run(tiny_recipe, tmp_path / "cached", 4)
    batch = digits_batch(plain)
    assert T.batch_size_of(batch) == 32
    plain_losses = T.plain_backward(plain.objective, batch, plain.accelerator)
    cached_losses = T.cached_backward(cached.objective, T.split_batch(batch, 4), cached.accelerator)
    torch.testing.assert_close(cached_losses["loss"], plain_losses["loss"], atol=1e-6, rtol=0)
    expected, got = gradients(plain.objective), gradients(cached.objective)
    assert expected.keys() == got.keys() and len(expected) > 20
    for name, grad in expected.items():
        scale = grad.abs().max().clamp_min(1e-8)
        torch.testing.assert_close(got[name] / scale, grad / scale, atol=1e-5, rtol=0, msg=name)
    # Micro-batches of 8 contrasted only within themselves would give a different, lower loss.
    separate = torch.stack([plain.objective(mb)["loss"].detach() for mb in T.split_batch(batch, 4)]).mean()
    assert separate < plain_losses["loss"] - 0.5


def test_feature_cache_step_gives_the_weights_of_a_whole_batch_step(tiny_recipe, tmp_path, fresh_accelerate_state):
    plain, cached = start_run(tiny_recipe, tmp_path / "plain", 1), start_run(tiny_recipe, tmp_path / "cached", 4)
    batch = digits_batch(plain)
    before = {k: v.clone() for k, v in plain.objective.state_dict().items()}
    for run in (plain, cached):
        losses, finite = loop.optimizer_step(run, dict(batch))
        assert finite and run.state.step == 1 and run.state.samples == 32
    after_plain, after_cached = plain.objective.state_dict(), cached.objective.state_dict()
    assert max(float((after_plain[k] - before[k]).abs().max()) for k in before) > 1e-4  # the step moved weights
    for key in before:
        torch.testing.assert_close(after_cached[key], after_plain[key], atol=1e-6, rtol=0, msg=key)
