"""Threads and workers change the speed of an evaluation, never its numbers; the thread policy's choices."""
from __future__ import annotations

import io
import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from conftest import export_open_clip, write_shards
from mmcl.eval import evaluate_dataset
from mmcl import load_model
from mmcl.eval.cli import main
from mmcl.eval.datasets import describe_split
from mmcl.eval.features import split_features
from mmcl.eval.threads import MODEL_BOUND_FLOPS_PER_PIXEL, ThreadPolicy

MODEL_CFG = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
WORDS = ["red", "green", "blue", "dark", "bright", "small", "round", "square"]


def jpeg(rng, size=24) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(export folder, (model, preprocess, tokenizer)) of the seeded test model."""
    folder = export_open_clip(tmp_path_factory.mktemp("model"), MODEL_CFG)
    return folder, load_model(f"local-dir:{folder}", "cpu")


@pytest.fixture(scope="module")
def loaded(exported):
    return exported[1]


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    """Retrieval: 45 images with 1 to 3 captions, 4 shards, one corrupt image, the last shard cut short."""
    root, rng = tmp_path_factory.mktemp("captions"), np.random.default_rng(0)
    samples = [{"__key__": f"k{i:03d}", "jpg": jpeg(rng) if i != 7 else b"broken",
                "txt": "\n".join(" ".join(rng.choice(WORDS, 4)) for _ in range(1 + i % 3))} for i in range(45)]
    write_shards(root / "test", samples, shard_size=12)
    last = root / "test" / "3.tar"
    last.write_bytes(last.read_bytes()[:5000])  # a cut shard: truncated_tar, the rest of it skipped
    (root / "dataset_type.txt").write_text("retrieval\n")
    return root


@pytest.fixture(scope="module")
def classes(tmp_path_factory):
    root, rng = tmp_path_factory.mktemp("classes"), np.random.default_rng(1)
    write_shards(root / "test", [{"__key__": f"c{i:03d}", "jpg": jpeg(rng), "cls": str(i % 5)} for i in range(40)],
                 shard_size=10)
    (root / "classnames.txt").write_text("\n".join(WORDS[:5]) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a {c} thing.\na photo of {c}.\n")
    return root


SETTINGS = [(0, 1), (0, 2), (1, 2), (2, 1), (3, 2)]  # (workers, threads)


@pytest.mark.parametrize("max_samples", [None, 21])
def test_retrieval_is_bit_identical_for_any_threads_and_workers(captions, loaded, max_samples):
    model, preprocess, tokenizer = loaded
    results = [evaluate_dataset(model, preprocess, tokenizer, captions, batch_size=8, workers=workers,
                                threads=threads, geometry=True, max_samples=max_samples)
               for workers, threads in SETTINGS]
    first = results[0]
    assert first["skipped"]["corrupt_image"] == 1
    if max_samples:
        assert first["samples"] == max_samples and "truncated_tar" not in first["skipped"]
    else:  # 3 whole shards of 12 but one corrupt image, and what the cut shard kept before its damage
        assert 35 <= first["samples"] < 44 and first["skipped"]["truncated_tar"] == 1
    for result, (workers, threads) in zip(results, SETTINGS):
        assert result["metrics"] == first["metrics"], (workers, threads)  # exact: floats compared with ==
        assert result["skipped"] == first["skipped"] and result["samples"] == first["samples"]
        assert result["threads"]["threads"] == threads


def test_features_arrive_in_the_same_order_for_any_workers(captions, loaded):
    model, preprocess, tokenizer = loaded
    info = describe_split(str(captions))
    serial = split_features(model, preprocess, tokenizer, info, batch_size=5, workers=0)
    parallel = split_features(model, preprocess, tokenizer, info, batch_size=5, workers=3, threads=2)
    assert torch.equal(serial.image, parallel.image) and torch.equal(serial.text, parallel.text)
    assert torch.equal(serial.text_to_image, parallel.text_to_image)


def test_zeroshot_is_bit_identical_for_any_threads_and_workers(classes, loaded):
    model, preprocess, tokenizer = loaded
    results = [evaluate_dataset(model, preprocess, tokenizer, classes, batch_size=6, workers=workers,
                                threads=threads) for workers, threads in SETTINGS]
    assert all(r["metrics"] == results[0]["metrics"] for r in results) and results[0]["samples"] == 40
    assert all(r["details"]["per_class_recall"] == results[0]["details"]["per_class_recall"] for r in results)


# ---- the policy ------------------------------------------------------------------------------------

@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


SMALL64 = {"embed_dim": 192, "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 192, "layers": 4,
                                            "head_width": 64},
           "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 192, "heads": 3, "layers": 4}}


@pytest.mark.parametrize("cfg, model_bound", [(MODEL_CFG, False), (SMALL64, True)])
def test_policy_follows_the_model_flops_per_pixel(cfg, model_bound, restore_threads):
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg).eval()
    size = cfg["vision_cfg"]["image_size"]
    torch.set_num_threads(2)
    policy = ThreadPolicy.for_pass("cpu", workers=1)
    with policy.applied():
        policy.choose(model, torch.zeros(4, 3, size, size))
        assert torch.get_num_threads() == (2 if model_bound else 1)
        policy.choose(model, torch.zeros(4, 3, size, size))  # chosen once
    assert torch.get_num_threads() == 2  # restored after the pass
    flops = policy.summary()["flops_per_pixel"]
    assert (flops >= MODEL_BOUND_FLOPS_PER_PIXEL) == model_bound
    assert 1_000 < flops < 5_000 if not model_bound else 40_000 < flops < 80_000


def test_policy_rule():
    assert ThreadPolicy(cores=2, loaders=1).threads_for(MODEL_BOUND_FLOPS_PER_PIXEL) == 2
    assert ThreadPolicy(cores=2, loaders=1).threads_for(MODEL_BOUND_FLOPS_PER_PIXEL - 1) == 1
    assert ThreadPolicy(cores=16, loaders=6).threads_for(500) == 10
    assert ThreadPolicy(cores=2, loaders=3).threads_for(500) == 1  # never below 1


def test_given_threads_and_gpus_are_not_chosen(loaded, restore_threads):
    torch.set_num_threads(1)
    fixed = ThreadPolicy.for_pass("cpu", workers=2, threads=2)
    with fixed.applied():
        fixed.choose(loaded[0], torch.zeros(2, 3, 32, 32))
        assert torch.get_num_threads() == 2
    assert fixed.summary() == {"threads": 2, "flops_per_pixel": None} and torch.get_num_threads() == 1
    assert not ThreadPolicy.for_pass("cuda", workers=2).adaptive


def test_a_pass_reports_its_threads(classes, loaded, restore_threads):
    torch.set_num_threads(2)
    model, preprocess, tokenizer = loaded
    result = evaluate_dataset(model, preprocess, tokenizer, classes, batch_size=5, workers=1)
    assert result["threads"]["threads"] == 1 and result["threads"]["flops_per_pixel"] < MODEL_BOUND_FLOPS_PER_PIXEL
    assert torch.get_num_threads() == 2


def test_cli_threads_option(classes, exported, tmp_path, capsys):
    model_dir = exported[0]
    out = tmp_path / "out"
    assert main(["eval", "zeroshot", "--model", f"local-dir:{model_dir}", "--data", str(classes), "--threads", "1",
                 "--workers", "0", "--no-progress", "--out", str(out)]) == 0
    record = json.loads((out / f"{classes.name}_zeroshot_classification.json").read_text())
    assert record["mmcl"]["threads"] == {"threads": 1, "flops_per_pixel": None}
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "zeroshot", "--model", f"local-dir:{model_dir}", "--data", str(classes), "--threads", "0"])
    assert exit_info.value.code == 2 and "--threads: must be at least 1" in capsys.readouterr().err
