"""mmcl's public API end to end: build_shards, train, export, load_model, evaluate, as a user calls them."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import yaml
from PIL import Image

import mmcl
from conftest import REPO, subprocess_env, tiny_tree


def test_build_shards_from_a_folder_a_csv_and_a_jsonl_give_the_same_samples(tmp_path):
    pictures = tmp_path / "pictures"  # NAME.jpg with its caption in NAME.txt
    pictures.mkdir()
    rows = []
    for i, colour in enumerate(["red", "green", "blue", "white", "black"]):
        Image.new("RGB", (24, 24), colour).save(pictures / f"{i}.jpg")
        (pictures / f"{i}.txt").write_text(f"a {colour} square")
        rows.append({"image": str(pictures / f"{i}.jpg"), "caption": f"a {colour} square"})
    with open(tmp_path / "list.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["image", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    written = {name: mmcl.build_shards(tmp_path / source, tmp_path / name, split="train")
               for name, source in (("from_folder", "pictures"), ("from_csv", "list.csv"),
                                    ("from_jsonl", "list.jsonl"))}
    assert {name: summary["samples"] for name, summary in written.items()} == dict.fromkeys(written, 5)
    captions = {name: sorted(s["txt"] for s in samples(tmp_path / name / "train")) for name in written}
    assert list(captions.values()) == [sorted(r["caption"].encode() for r in rows)] * 3
    with pytest.raises(ValueError, match="not 'digits', a folder, a .csv or a .jsonl file"):
        mmcl.build_shards(tmp_path / "list.txt", tmp_path / "nowhere")


def samples(split_dir):
    from mmcl.data_pipelines.tarstream import shard_samples

    return [s for tar in sorted(split_dir.glob("*.tar")) for s in shard_samples(str(tar), pytest.fail)]


@pytest.mark.slow
def test_train_export_load_and_evaluate_through_the_public_api(trained_digits_run, digits_root, tmp_path,
                                                                fresh_accelerate_state):
    # train: a recipe file with overrides, the way `mmcl train` takes them
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_tree(digits_root, tmp_path / "short")))
    summary = mmcl.train(str(recipe), overrides=["train.max_steps=4"])
    assert summary["steps"] == 4 and (tmp_path / "short" / "summary.json").is_file()

    # export the session's trained run, load it with plain open_clip naming, evaluate it on the digits
    folder = mmcl.export(trained_digits_run, tmp_path / "exported")
    model, preprocess, tokenizer = mmcl.load_model(f"local-dir:{folder}")
    result = mmcl.evaluate((model, preprocess, tokenizer), digits_root, batch_size=250)
    assert result["task"] == "zeroshot_classification" and result["samples"] == 1000
    assert result["metrics"]["acc1"] >= 0.5, result["metrics"]  # chance is 0.1
    from_run = mmcl.evaluate(str(trained_digits_run), digits_root, batch_size=250)  # a spec string works too
    assert from_run["metrics"]["acc1"] == pytest.approx(result["metrics"]["acc1"], abs=1e-3)
    trainers_own = json.loads((trained_digits_run / "summary.json").read_text())["eval"][0]["metrics"]["acc1"]
    assert result["metrics"]["acc1"] == pytest.approx(trainers_own, abs=1e-3)


@pytest.mark.slow
def test_quickstart_builds_trains_evaluates_and_plots(tmp_path):
    """`mmcl quickstart` (the README's first command) on a short budget: it goes through mmcl.build_shards and
    mmcl.train, evaluates during and after training, and draws the plots."""
    done = subprocess.run([sys.executable, "-m", "mmcl", "quickstart", "--out", str(tmp_path), "--steps", "40"],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 40
    zero_shot = [entry["metrics"]["acc1"] for entry in summary["eval"] if "acc1" in entry["metrics"]]
    retrieval = [entry["metrics"] for entry in summary["eval"] if "image_retrieval_recall@5" in entry["metrics"]]
    assert len(zero_shot) == 1 and zero_shot[0] > 0.2, summary["eval"]  # chance: 0.1, after 40 steps
    assert len(retrieval) == 1
    assert (tmp_path / "run" / "plots" / "eval.png").is_file() and (tmp_path / "data" / "digits" / "test").is_dir()
