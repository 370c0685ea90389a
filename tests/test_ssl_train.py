"""End to end: SSL objectives through the real trainer, two real processes, and the shipped recipes.

- two processes with batch b each equal one process with batch 2b (losses, averaged gradients, queues, EMA
  copies) for SimCLR, MoCo v2/v3, SLIP and CLIP with cross-modal queues (tests/dist_workers/ssl_worker.py);
- a short SimCLR run on the embedded digits raises kNN accuracy above the untrained tower's;
- MoCo's queue and key encoder survive checkpoint/resume: 2 steps + resume to 4 equals 4 steps straight;
- every SSL recipe loads and builds its objective offline.
"""
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_worker, run_worker

import mmcl.eval as mmcl_eval
from mmcl.data_pipelines.digits import build_digits
from mmcl import runs
from mmcl.config import load_recipe
from mmcl.models import build_model, eval_preprocess, load_model, weights
from mmcl.objectives import build_objective
from mmcl.trainer import train

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
TINY_RECIPES = ("cifar10_simclr_tiny", "cifar10_moco_tiny", "flickr8k_slip_tiny")
GPU_RECIPES = ("simclr_resnet50", "moco_v2_resnet50", "slip_vit_b16")


worker = load_worker("ssl_worker")


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ssl_digits") / "digits"
    build_digits(str(root))
    return str(root)


def digits_recipe(tmp_path: Path, root: str, name: str, overrides=()):
    """A tiny image-only recipe on the digits (ViT at 32 px), written to YAML and loaded like a user's."""
    tree = {"model": {"config": {"embed_dim": 64,
                                 "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2,
                                                "head_width": 32, "mlp_ratio": 2.0},
                                 "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32,
                                              "heads": 2, "layers": 1}},
                      "ssl_head": [128, 64]},
            "data": {"train": [root], "workers": 0, "shuffle_buffer": 200, "view_crop_scale": [0.5, 1.0]},
            "objective": {"name": name, "temperature": 0.2},
            "optim": {"lr": 2.0e-3, "weight_decay": 0.05, "warmup_steps": 5},
            "train": {"output_dir": str(tmp_path / name), "batch_size": 64, "progress": False, "log_every": 5,
                      "save_every": 0},
            "eval": {"datasets": []}}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return load_recipe(str(path), list(overrides))


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ssl_dist") / "ssl.json"
    return run_worker("ssl_worker", out, worker.WORLD)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(worker.CASES))
def test_two_processes_equal_one_process_with_doubled_batch(two_process_results, name):
    assert two_process_results["world"] == 2 and two_process_results["backend"] == "gloo"
    distributed = {k: torch.tensor(v) for k, v in two_process_results["cases"][name].items()}
    single = worker.run_case(name, slice(None))
    assert set(distributed) == set(single)
    assert any(k.startswith("grad/model.visual.") for k in single)
    for key, value in single.items():
        torch.testing.assert_close(distributed[key], value.float(), atol=2e-5, rtol=1e-4, msg=key)
    queues = [k for k in single if k.endswith("queue")]
    assert len(queues) == {"moco_v2": 1, "clip_xqueue": 2, "swav": 1}.get(name, 0)


def knn_acc1(model, root: str) -> float:
    result = mmcl_eval.evaluate_dataset(model, eval_preprocess(model), None, root, split="test", task="knn",
                                        batch_size=500)
    return result["metrics"]["knn_acc1"]


@pytest.mark.slow
def test_short_simclr_run_improves_knn_over_the_untrained_tower(tmp_path, digits_root):
    recipe = digits_recipe(tmp_path, digits_root, "simclr", ["train.max_steps=60"])
    torch.manual_seed(recipe.train.seed)  # the trainer builds the towers from this seed too
    untrained, _ = build_model(recipe.model)
    before = knn_acc1(untrained, digits_root)
    summary = train(recipe)
    assert summary["steps"] == 60 and summary["final_loss"] < summary["first_loss"]
    trained, _, _ = load_model(recipe.train.output_dir)
    after = knn_acc1(trained, digits_root)
    assert after > before + 0.03, (before, after)  # seen: 0.571 -> 0.644


def final_state(run_dir: str) -> dict:
    return weights.read_state_dict(str(runs.latest_checkpoint(Path(run_dir)) / runs.WEIGHTS))


@pytest.mark.slow
def test_moco_queue_and_key_encoder_survive_resume(tmp_path, digits_root):
    common = ["objective.moco.queue_size=96", "optim.schedule=constant", "optim.warmup_steps=0",
              "train.batch_size=32", "train.save_every=2"]
    straight = digits_recipe(tmp_path / "a", digits_root, "moco", common + ["train.max_steps=4"])
    train(straight)
    resumed = digits_recipe(tmp_path / "b", digits_root, "moco", common + ["train.max_steps=2"])
    train(resumed)
    resumed = digits_recipe(tmp_path / "b", digits_root, "moco", common + ["train.max_steps=4"])
    summary = train(resumed)
    assert summary["steps"] == 4
    a, b = final_state(straight.train.output_dir), final_state(resumed.train.output_dir)
    assert int(a["loss_fn.queue_ptr"]) == 4 * 32 % 96
    assert {"loss_fn.queue", "key_visual.conv1.weight", "key_head.0.weight"} <= set(a)
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5, msg=key)


@pytest.mark.parametrize("name", TINY_RECIPES + GPU_RECIPES)
def test_recipes_load_and_build_offline(name, tmp_path, digits_root, monkeypatch):
    monkeypatch.chdir(REPO)  # tiny recipes name ../shared/data relative to the repository
    overrides = [f"train.output_dir={tmp_path / name}"]
    if name in GPU_RECIPES:  # their data paths are cluster paths: point them at a tiny local shard set
        overrides += [f"data.train=[{digits_root}]", "eval.datasets=[]", "eval.retrieval=[]"]
    elif not SHARED.is_dir():
        pytest.skip("../shared/data is not here")
    recipe = load_recipe(str(REPO / "recipes" / f"{name}.yaml"), overrides)
    assert recipe.objective.name in ("simclr", "moco", "slip")
    torch.manual_seed(0)
    model, _ = build_model(recipe.model)
    objective = build_objective(recipe, model)
    assert objective.uses_views and objective.uses_text == (recipe.objective.name == "slip")
