"""evaluate_dataset and `mmcl eval` on a tiny real open_clip model and tiny dataset folders.

The model is built in-process with a fixed seed and saved as an open_clip `local-dir:` export; the folders
are written in CLIP_benchmark's layout. Metrics are compared with clip_benchmark reading the same folder.
"""
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import export_open_clip, write_shards
from mmcl.eval import evaluate_dataset
from mmcl import load_model
from mmcl.eval.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:WebDataset\\(shardshuffle")  # clip_benchmark's loader

MODEL_CFG = {"embed_dim": 16,
             "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
CLASSES = ["red", "green", "blue", "white", "black", "gray"]
COLOURS = [(220, 20, 20), (20, 220, 20), (20, 20, 220), (240, 240, 240), (10, 10, 10), (128, 128, 128)]


def jpeg(rgb, rng, size=24):
    noise = rng.integers(-30, 30, (size, size, 3))
    pixels = np.clip(np.array(rgb)[None, None, :] + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return export_open_clip(tmp_path_factory.mktemp("model"), MODEL_CFG)


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model(f"local-dir:{model_dir}", "cpu")


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """Classification: 6 colour classes, 2 shards per split."""
    root, rng = tmp_path_factory.mktemp("colours"), np.random.default_rng(0)
    for split, n in (("train", 36), ("test", 30)):
        write_shards(root / split, [{"__key__": f"{split}{i:03d}", "jpg": jpeg(COLOURS[i % 6], rng),
                                    "cls": str(i % 6)} for i in range(n)], shard_size=n // 2)
    (root / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a {c} photo.\na photo of something {c}.\n")
    return root


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    """Retrieval: 12 images with 1 to 3 captions each."""
    root, rng = tmp_path_factory.mktemp("captions"), np.random.default_rng(1)
    samples = []
    for i in range(12):
        lines = [f"a {CLASSES[i % 6]} square", f"something {CLASSES[i % 6]} number {i}", "a picture"][:1 + i % 3]
        samples.append({"__key__": f"img{i:03d}", "jpg": jpeg(COLOURS[i % 6], rng), "txt": "\n".join(lines)})
    write_shards(root / "test", samples, shard_size=12)
    (root / "dataset_type.txt").write_text("retrieval\n")
    return root


def numpy2_accuracy(output, target, topk=(1,)):
    """clip_benchmark's accuracy() with the numpy 2 fix (float of a 1-element array)."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].reshape(-1).float().sum(0, keepdim=True).cpu().numpy()[0]) / len(target)
            for k in topk]


def clip_benchmark_metrics(root, task, loaded, monkeypatch):
    builder = pytest.importorskip("clip_benchmark.datasets.builder")
    from clip_benchmark.metrics import zeroshot_classification as zc
    from clip_benchmark.metrics import zeroshot_retrieval as zr

    monkeypatch.setattr(zc, "accuracy", numpy2_accuracy)
    model, preprocess, tokenizer = loaded
    ds = builder.build_dataset(f"wds/{root.name}", root=str(root), transform=preprocess, split="test", task=task)
    loader = torch.utils.data.DataLoader(ds.batched(8), batch_size=None, shuffle=False, num_workers=0)
    if task == "zeroshot_classification":
        return zc.evaluate(model, loader, tokenizer, ds.classes, ds.templates, "cpu", amp=False)
    return zr.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])


@pytest.mark.parametrize("workers", [0, 2])
def test_zeroshot_equals_clip_benchmark(colours, loaded, monkeypatch, workers):
    model, preprocess, tokenizer = loaded
    ours = evaluate_dataset(model, preprocess, tokenizer, colours, batch_size=8, workers=workers)
    theirs = clip_benchmark_metrics(colours, "zeroshot_classification", loaded, monkeypatch)
    assert ours["task"] == "zeroshot_classification" and ours["samples"] == 30 and ours["skipped"] == {}
    assert ours["metrics"] == pytest.approx(theirs, abs=1e-6)
    assert len(ours["details"]["per_class_recall"]) == 6


def test_retrieval_equals_clip_benchmark(captions, loaded, monkeypatch):
    model, preprocess, tokenizer = loaded
    ours = evaluate_dataset(model, preprocess, tokenizer, captions, batch_size=5)
    theirs = clip_benchmark_metrics(captions, "zeroshot_retrieval", loaded, monkeypatch)
    assert ours["task"] == "zeroshot_retrieval" and ours["samples"] == 12 and ours["details"]["captions"] == 24
    for key, value in theirs.items():
        assert ours["metrics"][key] == pytest.approx(value, abs=1e-6)
    assert 1 <= ours["metrics"]["image_retrieval_median_rank"] <= 12


def test_probe_geometry_and_max_samples(colours, captions, loaded):
    model, preprocess, tokenizer = loaded
    model.train()  # the trainer evaluates mid-training: the mode must come back
    probe = evaluate_dataset(model, preprocess, None, colours, task="linear_probe", knn_k=5, probe_c=100.0)
    assert model.training
    assert probe["metrics"]["knn_acc1"] == 1.0 and probe["metrics"]["linear_probe_acc1"] == 1.0
    assert probe["details"]["train_samples"] == 36
    geometry = evaluate_dataset(model, preprocess, tokenizer, captions, task="geometry")
    assert set(geometry["metrics"]) == {"alignment", "uniformity_image", "uniformity_text", "modality_gap",
                                        "mean_pair_cosine"}
    few = evaluate_dataset(model, preprocess, tokenizer, colours, classnames_file=None, max_samples=9)
    assert few["samples"] == 9


def test_fewer_than_five_classes(tmp_path, model_dir, loaded):
    rng = np.random.default_rng(2)
    write_shards(tmp_path / "test", [{"__key__": f"k{i}", "jpg": jpeg(COLOURS[i % 3], rng), "cls": str(i % 3)}
                                    for i in range(9)], shard_size=9)
    (tmp_path / "classnames.txt").write_text("red\ngreen\nblue\n")
    (tmp_path / "zeroshot_classification_templates.txt").write_text("a {c} photo.\n")
    model, preprocess, tokenizer = loaded
    result = evaluate_dataset(model, preprocess, tokenizer, tmp_path)
    assert math.isnan(result["metrics"]["acc5"]) and 0 <= result["metrics"]["acc1"] <= 1
    out = tmp_path / "out"
    assert main(["eval", "zeroshot", "--model", f"local-dir:{model_dir}", "--data", str(tmp_path),
                 "--out", str(out), "--no-progress", "--workers", "0"]) == 0
    record = json.loads((out / f"{tmp_path.name}_zeroshot_classification.json").read_text())
    assert record["metrics"]["acc5"] is None  # NaN is written as null: JSON has no NaN
    assert record["metrics"]["acc1"] == pytest.approx(result["metrics"]["acc1"])


def test_labels_beyond_class_names(tmp_path, colours, loaded):
    (tmp_path / "test").symlink_to(colours / "test")
    (tmp_path / "classnames.txt").write_text("red\ngreen\nblue\n")
    (tmp_path / "zeroshot_classification_templates.txt").write_text("a {c} photo.\n")
    model, preprocess, tokenizer = loaded
    with pytest.raises(ValueError, match="out of range for 3 classes"):  # labels 3..5 have no names
        evaluate_dataset(model, preprocess, tokenizer, tmp_path)


def test_only_bad_samples_is_a_clear_error(tmp_path, loaded):
    write_shards(tmp_path / "test", [{"__key__": "a", "jpg": b"broken", "cls": "0"}], shard_size=5)
    (tmp_path / "classnames.txt").write_text("x\n")
    (tmp_path / "zeroshot_classification_templates.txt").write_text("{c}\n")
    model, preprocess, tokenizer = loaded
    with pytest.raises(ValueError, match=r"no usable samples in .*test \(skipped: \{'corrupt_image': 1\}\)"):
        evaluate_dataset(model, preprocess, tokenizer, tmp_path)


def test_cli_all_writes_reports(tmp_path, model_dir, colours, captions, capsys):
    out = tmp_path / "out"
    code = main(["eval", "all", "--model", f"local-dir:{model_dir}", "--data", str(colours), str(captions),
                 "--out", str(out), "--workers", "0", "--no-progress", "--batch-size", "16"])
    assert code == 0
    assert "| wds/" in capsys.readouterr().out
    record = json.loads((out / f"{colours.name}_zeroshot_classification.json").read_text())
    assert set(record) == {"dataset", "model", "pretrained", "task", "metrics", "language", "mmcl"}
    assert record["model"] == f"local-dir:{model_dir}" and record["mmcl"]["samples"] == 30
    retrieval = json.loads((out / f"{captions.name}_zeroshot_retrieval.json").read_text())
    assert "modality_gap" in retrieval["metrics"] and "image_retrieval_recall@10" in retrieval["metrics"]
    for png in (f"{colours.name}_zeroshot_classification.png", f"{captions.name}_zeroshot_retrieval.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "image_retrieval_recall@1" in (out / "results.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--data", "/nowhere/at/all"], "no such dataset folder: /nowhere/at/all"),
    (["--data", "{colours}", "--split", "valid"], "valid"),
    (["--data", "{colours}", "--templates", "/no/templates.txt"], "/no/templates.txt"),
])
def test_cli_bad_input_is_one_line_exit_2(argv, message, model_dir, colours, capsys):
    argv = [a.format(colours=colours) for a in argv]
    code = main(["eval", "zeroshot", "--model", f"local-dir:{model_dir}", "--no-progress", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("mmcl: error: ") and message in err and "\n" not in err


def test_cli_missing_export(tmp_path, colours, capsys):
    assert main(["eval", "zeroshot", "--model", f"local-dir:{tmp_path}", "--data", str(colours)]) == 2
    assert "open_clip_config.json" in capsys.readouterr().err
