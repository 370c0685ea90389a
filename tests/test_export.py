"""`mmcl export RUN --out DIR` writes an open_clip `local-dir:` model that embeds exactly like the run itself."""
from __future__ import annotations

import io
import json
from pathlib import Path

import open_clip
import pytest
import torch
import webdataset as wds
from PIL import Image

from mmcl.data_pipelines import shards
from mmcl import runs
from mmcl.cli import main
from mmcl.config import load_recipe
from mmcl import load_model
from mmcl.trainer import train

CAPTIONS = ["a handwritten seven", "the digit 3 written by hand", "a photo of the number zero", "nine"]


@pytest.fixture
def trained_run(tiny_recipe, tmp_path, fresh_accelerate_state) -> Path:
    """Four steps with a checkpoint every two: the export must take the newest complete one."""
    train(load_recipe(str(tiny_recipe({"train.max_steps": 4, "train.save_every": 2}))))
    return tmp_path / "run"


def digit_images(root: str, count: int = 8) -> list:
    samples = wds.WebDataset(shards.split_urls(root, "test"), shardshuffle=False)
    return [Image.open(io.BytesIO(sample["png"])).convert("RGB") for _, sample in zip(range(count), samples)]


def embed(model, preprocess, tokenizer, images) -> tuple:
    model.eval()
    with torch.no_grad():
        pixels = torch.stack([preprocess(image) for image in images])
        tokens = tokenizer(CAPTIONS)
        return pixels, tokens, model.encode_image(pixels, normalize=True), model.encode_text(tokens, normalize=True)


def test_export_loads_in_open_clip_and_embeds_like_the_run(trained_run, tmp_path, digits_root, run_mmcl):
    out = tmp_path / "export"
    done = run_mmcl(["export", trained_run, "--out", out], timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"local-dir:{out}" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    exported = embed(model, preprocess, open_clip.get_tokenizer(f"local-dir:{out}"), digit_images(digits_root))
    original = embed(*load_model(str(trained_run)), digit_images(digits_root))
    names = ("preprocessed pixels", "tokens", "image embeddings", "text embeddings")
    for name, a, b in zip(names, exported, original):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    assert exported[2].shape == (8, 32) and exported[3].shape == (len(CAPTIONS), 32)
    assert json.loads((out / "open_clip_config.json").read_text())["model_cfg"]["embed_dim"] == 32


def test_export_of_a_chosen_checkpoint(trained_run, tmp_path):
    older = trained_run / runs.CHECKPOINTS / runs.checkpoint_name(2)
    out = tmp_path / "export_step2"
    assert main(["export", str(trained_run), "--out", str(out), "--checkpoint", str(older)]) == 0
    from_older = open_clip.create_model_and_transforms(f"local-dir:{out}")[0].state_dict()
    newest = load_model(str(trained_run))[0].state_dict()
    assert from_older.keys() == newest.keys()
    assert any(not torch.equal(from_older[k], newest[k]) for k in newest)  # step 2 is not step 4
    assert load_model(f"local-dir:{out}")[0].state_dict()["logit_scale"] == from_older["logit_scale"]


def test_export_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "export")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("mmcl: error: ") and "not an mmcl run directory" in err[0]
    assert not (tmp_path / "export").exists()
