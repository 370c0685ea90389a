"""BYOL, SimSiam, VICReg, SwAV and PCL through the real trainer on the embedded digits.

- each trains end to end from a YAML recipe: the loss falls, the collapse metrics are logged and show no
  collapse, and kNN accuracy on the held-out digits is well above chance (10%);
- a run killed with SIGKILL while writing a checkpoint and resumed ends bit-identical to an uninterrupted
  run, for BYOL (its EMA target) and SwAV (prototypes, frozen at first, and a queue);
- a collapsing run is warned about, once, on stderr.
"""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import mmcl.eval as mmcl_eval
from conftest import REPO, subprocess_env
from mmcl import runs
from mmcl.config import load_recipe
from mmcl.models import eval_preprocess, load_model
from mmcl.trainer import train
from mmcl.trainer.logs import read_metrics

TOWER = {"embed_dim": 64,
         "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32,
                        "mlp_ratio": 2.0},
         "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
# name -> objective section; every run: 20 steps of 32 digits, lr 5e-4
OBJECTIVES = {
    "byol": {"byol": {"momentum": 0.99}},
    "simsiam": {"simsiam": {"predictor": [32, 64]}},
    "vicreg": {"vicreg": {}},
    "swav": {"swav": {"prototypes": 30, "freeze_prototypes_steps": 5}},
    # ten steps an epoch: InfoNCE alone in epoch 0, then k-means (scikit-learn) of the 4,000 digits before epoch 1
    "pcl": {"moco": {"queue_size": 256}, "pcl": {"num_clusters": [10, 20], "warmup_epochs": 1}},
}
EXTRA = {"swav": {"data": {"small_views": 2, "small_view_size": 16}},
         "pcl": {"data": {"samples_per_epoch": 320}, "train": {"epochs": 2}}}


def write_recipe(folder: Path, root: str, name: str, changes: dict = None) -> Path:
    tree = {"model": {"config": TOWER, "ssl_head": [128, 64]},
            "data": {"train": [root], "workers": 0, "shuffle_buffer": 200, "view_crop_scale": [0.5, 1.0]},
            "objective": {"name": name, **OBJECTIVES[name]},
            "optim": {"lr": 5.0e-4, "weight_decay": 0.05, "warmup_steps": 5},
            "train": {"output_dir": str(folder / "run"), "batch_size": 32, "max_steps": 20, "progress": False,
                      "log_every": 5, "save_every": 0},
            "eval": {"datasets": []}}
    for section, values in {**EXTRA.get(name, {}), **(changes or {})}.items():
        tree[section].update(values)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def knn_acc1(run_dir: Path, root: str) -> float:
    model, _, _ = load_model(str(run_dir))
    result = mmcl_eval.evaluate_dataset(model, eval_preprocess(model), None, root, split="test", task="knn",
                                        batch_size=500)
    return result["metrics"]["knn_acc1"]


def final_state(run_dir: Path, step: int) -> dict:
    return load_file(str(run_dir / runs.CHECKPOINTS / runs.checkpoint_name(step) / runs.WEIGHTS))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_trains_from_a_recipe_well_above_chance(name, tmp_path, digits_root, fresh_accelerate_state):
    recipe = load_recipe(str(write_recipe(tmp_path, digits_root, name)))
    summary = train(recipe)
    assert summary["steps"] == 20
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    if name == "pcl":  # ProtoNCE joins after the warm-up epoch, over clusters of the whole training set
        assert records[0]["loss/proto_nce"] == 0 and records[-1]["loss/proto_nce"] > 0
        state = final_state(tmp_path / "run", 20)
        assert len(state["clusters.key_ids"]) == 4000 and len(torch.unique(state["clusters.assignment_1"])) == 20
        assert state["clusters.centroids_0"].shape == (10, 64)
    else:  # the loss falls and the collapse watch shows spread outputs (1 / sqrt(64) = 0.125 at most)
        assert summary["final_loss"] < summary["first_loss"]
        assert all(r["collapse/std"] > 0.02 and r["collapse/effective_rank"] > 2 for r in records)
    assert knn_acc1(tmp_path / "run", digits_root) > 0.4  # chance: 0.1


# Ten steps of 32 in epochs of five: the kill falls at step 6, the resume starts from step 3 and crosses an
# epoch boundary. SwAV: prototypes frozen for 2 steps, a queue of 64 filled from step 1 and used once full.
RESUME = {"train": {"batch_size": 32, "max_steps": 10, "epochs": 2, "save_every": 3, "keep_last": 5,
                    "log_every": 1},
          "data": {"samples_per_epoch": 160}}
RESUME_OBJECTIVES = {"byol": {}, "swav": {"objective": {"name": "swav", "swav": {
    "prototypes": 30, "freeze_prototypes_steps": 2, "queue_size": 64, "queue_start": 1}}}}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RESUME_OBJECTIVES))
def test_killed_and_resumed_run_is_bit_identical(name, tmp_path, digits_root, fresh_accelerate_state):
    changes = {**RESUME, **RESUME_OBJECTIVES[name]}
    if name == "swav":
        changes["data"] = {**RESUME["data"], "small_views": 2, "small_view_size": 16}
    recipe = write_recipe(tmp_path, digits_root, name, changes)
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    train(load_recipe(str(recipe), [f"train.output_dir={reference}"]))

    killed = subprocess.run([sys.executable, "-m", "mmcl", "train", str(recipe), f"train.output_dir={resumed}"],
                            cwd=REPO, env=subprocess_env(MMCL_FAULT="kill-during-save:6"), capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert runs.read_meta(runs.latest_checkpoint(resumed))["step"] == 3
    train(load_recipe(str(recipe), [f"train.output_dir={resumed}"]))  # train.resume: auto

    expected, got = final_state(reference, 10), final_state(resumed, 10)
    state = {"byol": ("target_visual.conv1.weight", "target_head.0.weight"),
             "swav": ("prototypes.layer.weight", "queue", "queue_ptr", "queue_count")}[name]
    assert set(state) <= set(expected) and expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), f"{key}: max diff {(expected[key] - got[key]).abs().max()}"
    losses = [(r["step"], r["loss"]) for r in read_metrics(resumed) if "loss" in r]
    assert losses == [(r["step"], r["loss"]) for r in read_metrics(reference) if "loss" in r]


def test_a_collapsing_run_is_warned_about_once(tmp_path, digits_root, capfd, fresh_accelerate_state):
    """VICReg with its invariance term alone and a strong weight decay: nothing keeps the embeddings apart, the
    expander's weights shrink to nothing within a few steps, every image maps to its last bias, and the trainer
    says so, once."""
    recipe = load_recipe(str(write_recipe(tmp_path, digits_root, "vicreg")),
                         ["train.max_steps=8", "train.log_every=2", "objective.vicreg.variance_weight=0",
                          "objective.vicreg.covariance_weight=0", "optim.lr=1e-3", "optim.warmup_steps=0",
                          "optim.weight_decay=500", "optim.schedule=constant"])  # weights x 0.5 per step
    train(recipe)
    warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("mmcl: warning: step ")]
    std = [r["collapse/std"] for r in read_metrics(tmp_path / "run") if "collapse/std" in r]
    assert len(warnings) == 1 and "collapsing" in warnings[0], (warnings, std)
    assert std[-1] < 0.1 / 8  # below a tenth of 1 / sqrt(64)


SHARED = REPO.parent / "shared" / "data"
TINY_RECIPES = tuple(f"cifar10_{name}_tiny" for name in sorted(OBJECTIVES))
GPU_RECIPES = ("byol_resnet50", "swav_resnet50", "vicreg_resnet50")


@pytest.mark.parametrize("name", TINY_RECIPES + GPU_RECIPES)
def test_recipes_load_and_build_offline(name, tmp_path, digits_root, monkeypatch):
    from mmcl.models import build_model
    from mmcl.objectives import build_objective

    monkeypatch.chdir(REPO)  # tiny recipes name ../shared/data relative to the repository
    overrides = [f"train.output_dir={tmp_path / name}"]
    if name in GPU_RECIPES:  # their data paths are cluster paths: point them at a tiny local shard set
        overrides += [f"data.train=[{digits_root}]"]
    elif not SHARED.is_dir():
        pytest.skip("../shared/data is not here")
    recipe = load_recipe(str(REPO / "recipes" / f"{name}.yaml"), overrides)
    torch.manual_seed(0)
    objective = build_objective(recipe, build_model(recipe.model)[0])
    assert objective.uses_views and not objective.uses_text and type(objective).__name__.lower().startswith(
        recipe.objective.name)
