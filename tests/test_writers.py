"""Shard writers and source resolution: round trips, skipped samples, atomic shards, URL specs."""
import io
import json
import os

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from mmcl.data_pipelines import shards
from mmcl.data_pipelines.decode import sample_captions, sample_image, sample_label
from mmcl.data_pipelines.writers import (ShardWriter, resized_size, write_from_csv, write_from_folder,
                                    write_from_jsonl)


def image_bytes(size, fmt, seed=0, mode="RGB"):
    """A random-noise image of `size` encoded as `fmt` (PIL format name)."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode).save(buf, format=fmt)
    return buf.getvalue()


def put(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def read_split(root, split="train"):
    """All samples of a split, in order, through webdataset itself."""
    urls = shards.split_urls(str(root), split)
    return list(wds.WebDataset(urls, shardshuffle=False))


def rgb_array(data):
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture
def image_folder(tmp_path):
    """Three good images (jpg, png with alpha, bmp in a subfolder) and four bad ones, with sidecars."""
    folder = tmp_path / "images"
    files = {
        "a.jpg": image_bytes((40, 30), "JPEG", 1),
        "b.png": image_bytes((20, 50), "PNG", 2, "RGBA"),
        "sub/c.bmp": image_bytes((16, 16), "BMP", 3),
        "d.jpg": b"\xff\xd8\xff not really a jpeg",
        "e.jpg": b"",
        "f.png": image_bytes((8, 8), "PNG", 4),  # no sidecar
        "g.png": image_bytes((8, 8), "PNG", 5),
        ".hidden.jpg": b"junk",  # hidden files are not data
    }
    for name, data in files.items():
        put(str(folder / name), data)
    captions = {"a": "a red square\na noisy picture", "b": "a tall image", "sub/c": "a bitmap",
                "d": "broken", "e": "empty", "g": "  \n\n"}
    for stem, text in captions.items():
        put(str(folder / (stem + ".txt")), text)
    return folder, files


def test_folder_round_trip_keeps_bytes_pixels_and_captions(image_folder, tmp_path):
    folder, files = image_folder
    summary = write_from_folder(str(folder), str(tmp_path / "out"), "train")
    assert (summary["shards"], summary["samples"]) == (1, 3)
    assert summary["skipped"] == {"corrupt_image": 1, "empty_caption": 1, "empty_image": 1,
                                  "missing_caption": 1}
    assert summary["skipped_total"] == 4 and len(summary["skipped_examples"]) == 4
    samples = read_split(tmp_path / "out")
    assert [s["__key__"] for s in samples] == ["000000000", "000000001", "000000002"]
    assert [json.loads(s["json"])["source"] for s in samples] == ["a.jpg", "b.png", os.path.join("sub", "c.bmp")]
    assert samples[0]["jpg"] == files["a.jpg"]  # valid JPEG: copied as it is
    assert samples[1]["png"] == files["b.png"]
    assert "png" in samples[2] and "bmp" not in samples[2]  # BMP re-encoded losslessly
    assert np.array_equal(rgb_array(samples[2]["png"]), rgb_array(files["sub/c.bmp"]))
    assert [sample_captions(s) for s in samples] == [["a red square", "a noisy picture"], ["a tall image"],
                                                     ["a bitmap"]]
    assert sample_image(samples[1]).size == (20, 50) and sample_image(samples[1]).mode == "RGB"
    assert "cls" not in samples[0]


def test_csv_round_trip_with_labels_and_relative_paths(tmp_path):
    put(str(tmp_path / "data/imgs/x.png"), image_bytes((12, 10), "PNG", 7))
    put(str(tmp_path / "data/imgs/y.jpg"), image_bytes((10, 12), "JPEG", 8))
    put(str(tmp_path / "data/list.csv"),
        'path;text;label\nimgs/x.png;"first caption\nsecond caption";3\n'
        "imgs/y.jpg;one caption;0\nimgs/missing.jpg;lost;1\nimgs/x.png;bad label;three\n")
    summary = write_from_csv(str(tmp_path / "data/list.csv"), str(tmp_path / "out"), "val",
                             image_col="path", caption_col="text", label_col="label", sep=";")
    assert summary["samples"] == 2
    assert summary["skipped"] == {"bad_label": 1, "missing_image": 1}
    assert any("list.csv line 5" in e and "missing_image" in e for e in summary["skipped_examples"])
    samples = read_split(tmp_path / "out", "val")
    assert [sample_captions(s) for s in samples] == [["first caption", "second caption"], ["one caption"]]
    assert [sample_label(s) for s in samples] == [3, 0]
    assert json.loads(samples[0]["json"]) == {"source": "imgs/x.png"}
    assert shards.split_size(str(tmp_path / "out"), "val") == 2


def test_jsonl_round_trip_with_caption_lists(tmp_path):
    put(str(tmp_path / "a.webp"), image_bytes((30, 20), "WEBP", 9))
    put(str(tmp_path / "b.png"), image_bytes((9, 9), "PNG", 10))
    lines = [{"img": "a.webp", "caps": ["one", "two", "three"], "y": 1},
             {"img": str(tmp_path / "b.png"), "caps": "just one", "y": 2},
             {"caps": "no image"},
             {"img": "b.png", "caps": [], "y": 0}]
    put(str(tmp_path / "meta.jsonl"), "\n".join(json.dumps(line) for line in lines) + "\n\n")
    summary = write_from_jsonl(str(tmp_path / "meta.jsonl"), str(tmp_path / "out"), image_key="img",
                               caption_key="caps", label_key="y")
    assert summary["samples"] == 2 and summary["skipped"] == {"empty_caption": 1, "missing_image": 1}
    samples = read_split(tmp_path / "out")
    assert "webp" in samples[0]
    assert [sample_captions(s) for s in samples] == [["one", "two", "three"], ["just one"]]
    assert [sample_label(s) for s in samples] == [1, 2]


def test_resize_scales_the_shorter_side_and_never_up(tmp_path):
    big = image_bytes((300, 200), "PNG", 11)
    small = image_bytes((50, 40), "PNG", 12)
    put(str(tmp_path / "in/big.png"), big)
    put(str(tmp_path / "in/small.png"), small)
    put(str(tmp_path / "in/big.txt"), "big")
    put(str(tmp_path / "in/small.txt"), "small")
    write_from_folder(str(tmp_path / "in"), str(tmp_path / "out"), resize=64)
    big_sample, small_sample = read_split(tmp_path / "out")
    assert "jpg" in big_sample and sample_image(big_sample).size == (96, 64)
    assert small_sample["png"] == small  # already small: stored as it was
    assert resized_size((200, 300), 64) == (64, 96)
    assert resized_size((64, 1000), 64) == (64, 1000)


def test_shards_roll_every_shard_size_samples(tmp_path):
    split_dir = tmp_path / "ds" / "train"
    with ShardWriter(str(split_dir), shard_size=2) as writer:
        for i in range(5):
            writer.write({"__key__": f"k{i}", "txt": f"caption {i}", "cls": i})
    assert (writer.shards, writer.samples) == (3, 5)
    assert sorted(os.listdir(split_dir)) == ["0.tar", "1.tar", "2.tar", "nshards.txt", "sizes.json"]
    assert (split_dir / "nshards.txt").read_text().strip() == "3"
    assert json.loads((split_dir / "sizes.json").read_text()) == {"samples": 5}
    per_shard = [len(list(wds.WebDataset([u], shardshuffle=False)))
                 for u in shards.split_urls(str(tmp_path / "ds"), "train")]
    assert per_shard == [2, 2, 1]
    assert [sample_label(s) for s in read_split(tmp_path / "ds")] == [0, 1, 2, 3, 4]


def test_a_shard_gets_its_final_name_only_when_complete(tmp_path):
    split_dir = tmp_path / "train"
    with pytest.raises(RuntimeError):
        with ShardWriter(str(split_dir), shard_size=2) as writer:
            for i in range(3):
                writer.write({"__key__": f"k{i}", "txt": "x"})
                if i == 2:
                    assert sorted(os.listdir(split_dir)) == ["0.tar", "1.tar.tmp"]
            raise RuntimeError("disk full")
    # The complete shard stays; the open one is gone; no count file vouches for a finished split.
    assert sorted(os.listdir(split_dir)) == ["0.tar"]


def test_existing_shards_are_refused_unless_overwrite(image_folder, tmp_path):
    folder, _ = image_folder
    out = str(tmp_path / "out")
    write_from_folder(str(folder), out, shard_size=1)
    assert shards.split_urls(out, "train")[-1].endswith("2.tar")
    with pytest.raises(ValueError, match="already holds shards"):
        write_from_folder(str(folder), out)
    write_from_folder(str(folder), out, overwrite=True)
    assert sorted(os.listdir(os.path.join(out, "train"))) == ["0.tar", "nshards.txt", "sizes.json"]


def test_same_input_gives_identical_shards(image_folder, tmp_path):
    folder, _ = image_folder
    for name in ("one", "two"):
        write_from_folder(str(folder), str(tmp_path / name), shard_size=2)
    for shard in ("0.tar", "1.tar"):
        assert (tmp_path / "one/train" / shard).read_bytes() == (tmp_path / "two/train" / shard).read_bytes()


def test_bad_sources_raise_one_line_errors(tmp_path):
    put(str(tmp_path / "bad.jsonl"), '{"image": "a.jpg", "caption": "x"}\n{not json\n')
    put(str(tmp_path / "t.csv"), "file,caption\na.jpg,x\n")
    put(str(tmp_path / "only_bad/x.jpg"), b"garbage")
    put(str(tmp_path / "only_bad/x.txt"), "caption")
    cases = [
        (lambda: write_from_jsonl(str(tmp_path / "bad.jsonl"), str(tmp_path / "o")), ValueError, "line 2"),
        (lambda: write_from_csv(str(tmp_path / "t.csv"), str(tmp_path / "o")), ValueError, "no column 'image'"),
        (lambda: write_from_csv(str(tmp_path / "nope.csv"), str(tmp_path / "o")), FileNotFoundError, "nope.csv"),
        (lambda: write_from_folder(str(tmp_path / "nope"), str(tmp_path / "o")), FileNotFoundError, "nope"),
        (lambda: write_from_folder(str(tmp_path / "only_bad"), str(tmp_path / "o")), ValueError,
         r"no usable samples: 1 skipped \(corrupt_image: 1\)"),
        (lambda: write_from_folder(str(tmp_path / "only_bad"), str(tmp_path / "o"), resize=0), ValueError,
         "resize"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message) as info:
            call()
        assert "\n" not in str(info.value)
    assert not os.path.exists(tmp_path / "o/train/nshards.txt")


def make_dataset(root, split_shards):
    """A dataset folder with empty placeholder shards: {split: number of shards} (None: no nshards.txt)."""
    for split, count in split_shards.items():
        os.makedirs(root / split)
        for i in range(count if count is not None else 12):
            (root / split / f"{i}.tar").write_bytes(b"")
        if count is not None:
            (root / split / "nshards.txt").write_text(f"{count}\n")


def test_split_urls_reads_nshards_or_globs_in_numeric_order(tmp_path):
    make_dataset(tmp_path, {"train": 3, "test": None})
    assert shards.split_urls(str(tmp_path), "train") == [str(tmp_path / f"train/{i}.tar") for i in range(3)]
    names = [os.path.basename(u) for u in shards.split_urls(str(tmp_path), "test")]
    assert names[:3] == ["0.tar", "1.tar", "2.tar"] and names[-2:] == ["10.tar", "11.tar"]
    os.makedirs(tmp_path / "extra")
    (tmp_path / "extra" / "0.tar").write_bytes(b"")
    assert shards.list_splits(str(tmp_path)) == ["train", "test", "extra"]
    with pytest.raises(FileNotFoundError, match="dev"):
        shards.split_urls(str(tmp_path), "dev")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no shards in .*empty"):
        shards.split_urls(str(tmp_path), "empty")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        shards.split_urls(str(tmp_path / "nowhere"), "train")


def test_expand_urls_accepts_patterns_lists_and_folders(tmp_path):
    make_dataset(tmp_path, {"train": 2})
    assert shards.expand_urls("/d/{000..002}.tar") == ["/d/000.tar", "/d/001.tar", "/d/002.tar"]
    assert shards.expand_urls("/a/{0..1}.tar::/b/x.tar") == ["/a/0.tar", "/a/1.tar", "/b/x.tar"]
    assert shards.expand_urls(["/a/{0..1}.tar", "/b/x.tar"]) == ["/a/0.tar", "/a/1.tar", "/b/x.tar"]
    expected = [str(tmp_path / "train/0.tar"), str(tmp_path / "train/1.tar")]
    assert shards.expand_urls(str(tmp_path), split="train") == expected
    assert shards.expand_urls(str(tmp_path / "train")) == expected
    with pytest.raises(FileNotFoundError, match="name a split"):
        shards.expand_urls(str(tmp_path))


def test_remote_urls_are_refused_unless_allowed_and_missing_shards_named(tmp_path):
    make_dataset(tmp_path, {"train": 1})
    local = str(tmp_path / "train/0.tar")
    for url in ("pipe:curl -s http://x/0.tar", "https://x/0.tar", "s3://b/0.tar", "gs://b/0.tar"):
        assert shards.is_remote(url)
    assert not shards.is_remote(local) and not shards.is_remote("file://" + local)
    assert shards.check_local([local, "file://" + local]) == [local, "file://" + local]
    with pytest.raises(ValueError, match="pipe:cat"):
        shards.check_local([local, "pipe:cat x.tar"])
    assert shards.check_local(["pipe:cat x.tar"], allow_remote=True) == ["pipe:cat x.tar"]
    with pytest.raises(FileNotFoundError, match="missing shard: .*1.tar"):
        shards.check_local([local, str(tmp_path / "train/1.tar"), str(tmp_path / "train/2.tar")])


def test_split_size_and_dataset_task(tmp_path):
    make_dataset(tmp_path, {"train": 1})
    assert shards.split_size(str(tmp_path), "train") is None
    (tmp_path / "train/sizes.json").write_text('{"samples": 7}')
    assert shards.split_size(str(tmp_path), "train") == 7
    assert shards.dataset_task(str(tmp_path)) == "retrieval"
    (tmp_path / "classnames.txt").write_text("cat\ndog\n")
    assert shards.dataset_task(str(tmp_path)) == "classification"
    assert shards.read_classnames(str(tmp_path)) == ["cat", "dog"]
    (tmp_path / "dataset_type.txt").write_text("retrieval\n")
    assert shards.dataset_task(str(tmp_path)) == "retrieval"
