"""Pretrained weights named the open_clip way (tags, hf-hub:ORG/REPO), through open_clip's loader and the
Hugging Face cache: loaded offline from a cache the test fills with a tiny model it makes; refused on one line
when neither cached nor fetchable."""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from conftest import TINY_MODEL
from mmcl.config import ModelConfig
from mmcl.models import build_model, load_model

REPO_ID = "mmcl-test/tiny-clip"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
PREPROCESS = {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear",
              "resize_mode": "shortest"}


def fill_hub_cache(cache: Path) -> dict:
    """A Hugging Face cache holding REPO_ID at COMMIT: a tiny open_clip model's weights and config."""
    torch.manual_seed(7)
    model = open_clip.CLIP(**TINY_MODEL)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    snapshot = cache / f"models--{REPO_ID.replace('/', '--')}" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    save_file(state, str(snapshot / "open_clip_model.safetensors"))
    config = {"model_cfg": TINY_MODEL, "preprocess_cfg": PREPROCESS}
    (snapshot / "open_clip_config.json").write_text(json.dumps(config))
    refs = snapshot.parents[1] / "refs"
    refs.mkdir()
    (refs / "main").write_text(COMMIT)
    return state


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """HF_HUB_CACHE pointed at a fresh folder, HF_HUB_OFFLINE on (huggingface_hub reads both at import, so the
    already-imported constants are set too)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hf_hub_weights_load_from_the_cache_offline(offline_cache):
    state = fill_hub_cache(offline_cache)
    model, model_cfg = build_model(ModelConfig(config=TINY_MODEL, pretrained=f"hf-hub:{REPO_ID}",
                                               packed_attention=False))
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    pp = open_clip.get_model_preprocess_cfg(model)  # the repository's preprocess config is the model's
    assert list(pp["mean"]) == PREPROCESS["mean"] and pp["interpolation"] == "bilinear"


def test_a_whole_hf_hub_model_evaluates_from_the_cache(offline_cache, digits_root):
    import mmcl.eval as mmcl_eval

    state = fill_hub_cache(offline_cache)
    model, preprocess, tokenizer = load_model(f"hf-hub:{REPO_ID}")
    assert torch.equal(model.state_dict()["visual.conv1.weight"], state["visual.conv1.weight"])
    result = mmcl_eval.evaluate_dataset(model, preprocess, tokenizer, digits_root, max_samples=64, batch_size=32)
    assert result["samples"] == 64 and 0.0 <= result["metrics"]["acc1"] <= 1.0


def test_hub_weights_for_an_architecture_in_eval(offline_cache, tmp_path):
    state = fill_hub_cache(offline_cache)
    arch = tmp_path / "mmcl-tiny-hub-test.json"  # an architecture of one's own, registered the open_clip way
    arch.write_text(json.dumps(TINY_MODEL))
    open_clip.add_model_config(str(arch))
    model, _, _ = load_model(f"{arch.stem}:hf-hub:{REPO_ID}")
    assert torch.equal(model.state_dict()["text_projection"], state["text_projection"])


def hub_env(tmp_path) -> dict:
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    return {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_CACHE": str(empty)}


def test_an_uncached_tag_offline_is_one_line_before_any_work(tiny_recipe, run_mmcl, tmp_path):
    recipe = tiny_recipe({"model.config": None, "model.arch": "ViT-B-32", "model.pretrained": "laion2b_s34b_b79k"})
    done = run_mmcl(["train", recipe], env=hub_env(tmp_path))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("mmcl: error: model.pretrained: laion2b_s34b_b79k is not in the Hugging Face cache")
    assert "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in lines[0] and "HF_HUB_OFFLINE is set" in lines[0]
    assert not (tmp_path / "run").exists()


def test_an_uncached_model_in_eval_is_one_line(run_mmcl, tmp_path, digits_root):
    done = run_mmcl(["eval", "zeroshot", "--model", "ViT-B-32:laion2b_s34b_b79k", "--data", digits_root],
                    env=hub_env(tmp_path))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmcl: error: --model: laion2b_s34b_b79k is not in the")


@pytest.mark.parametrize("arch,pretrained,message", [
    ("ViT-B-32", "no_such_tag", "model.pretrained: 'no_such_tag' is neither a file nor a pretrained tag of ViT-B-32 "
                                "(its tags: openai, laion400m_e31"),
    (None, "laion2b_s34b_b79k", "model.pretrained: 'laion2b_s34b_b79k' is not a file, and a pretrained tag needs "
                                "model.arch"),
    ("ViT-B-32", "weights/missing.safetensors", "model.pretrained: weights file not found: weights/missing"),
    ("ViT-B-32", "hf-hub:no-repo-name", "model.pretrained: 'hf-hub:no-repo-name' is not hf-hub:ORG/REPO"),
])
def test_bad_pretrained_names_are_refused_naming_the_problem(arch, pretrained, message):
    from mmcl.models.hub import PretrainedNotFound, resolve

    with pytest.raises(PretrainedNotFound) as err:
        resolve(arch, pretrained)
    assert str(err.value).startswith(message)
