"""Reading evaluation splits: the tar reader, the batch preprocess, bad samples, workers, clear errors."""
import io
import tarfile

import numpy as np
import open_clip
import pytest
import torch
import webdataset as wds
from PIL import Image

from mmcl.data_pipelines.writers import ShardWriter
from mmcl.eval.datasets import BatchPreprocess, Limit, SplitStream, batch_iterator, describe_split, prefetch
from mmcl.data_pipelines.tarstream import shard_samples


def jpeg(color, size=(20, 14), mode="RGB", fmt="JPEG"):
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path, members, fmt=tarfile.GNU_FORMAT):
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_split(root, split, samples, shard_size=4, classes=None, retrieval=False):
    with ShardWriter(str(root / split), shard_size=shard_size) as writer:
        for sample in samples:
            writer.write(sample)
    if classes:
        (root / "classnames.txt").write_text("\n".join(classes) + "\n")
        (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    if retrieval:
        (root / "dataset_type.txt").write_text("retrieval\n")
    return root


# ---- tar reader --------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_reader_matches_webdataset(tmp_path, fmt):
    long_dir = "d" * 120 if fmt != tarfile.USTAR_FORMAT else "d" * 60  # beyond 100 chars: long-name records
    members = [(f"{long_dir}/a.jpg", b"1"), (f"{long_dir}/a.cls", b"3"), (f"{long_dir}/a.TXT", b"x\ny"),
               ("b.jpg", b""), ("b.json", b"{}"), ("noext", b"skip"), ("c.seg.png", b"\0" * 1000)]
    path = str(tmp_path / "0.tar")
    write_tar(path, members, fmt)
    ours = list(shard_samples(path, pytest.fail))
    theirs = [{k: v for k, v in s.items() if k != "__local_path__"}
              for s in wds.WebDataset(path, shardshuffle=False, empty_check=False)]
    assert ours == theirs
    assert ours[0]["txt"] == b"x\ny" and ours[2]["__key__"] == "c" and ours[2]["seg.png"] == b"\0" * 1000


def test_truncated_tar_reports_an_error(tmp_path):
    path = tmp_path / "0.tar"
    write_tar(str(path), [("a.jpg", b"x" * 3000), ("b.jpg", b"y" * 3000)])
    path.write_bytes(path.read_bytes()[:4000])  # cut inside b.jpg
    errors = []
    samples = list(shard_samples(str(path), errors.append))
    assert [s["__key__"] for s in samples] == ["a"] and len(errors) == 1


def test_damaged_header_is_a_read_error(tmp_path):
    path = tmp_path / "0.tar"
    write_tar(str(path), [("a.jpg", b"x"), ("b.jpg", b"y")])
    data = bytearray(path.read_bytes())
    data[1024] ^= 0xFF  # first byte of b.jpg's header: its checksum no longer matches
    path.write_bytes(bytes(data))
    errors = []
    assert [s["__key__"] for s in shard_samples(str(path), errors.append)] == ["a"]
    assert "checksum" in str(errors[0])


# ---- preprocess --------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, size", [("RGB", (40, 30)), ("L", (16, 16)), ("RGBA", (9, 50)), ("P", (33, 33))])
def test_batch_preprocess_is_bit_identical(mode, size):
    preprocess = open_clip.image_transform(24, is_train=False)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
              for _ in range(3)]
    pixels = BatchPreprocess(preprocess)
    assert pixels.head is not None
    ours = pixels.finish(pixels.stack([pixels.sample(im) for im in images]))
    assert torch.equal(ours, torch.stack([preprocess(im) for im in images]))


def test_other_preprocess_runs_whole():
    preprocess = lambda im: torch.full((3, 2, 2), float(im.size[0]))  # noqa: E731
    pixels = BatchPreprocess(preprocess)
    assert pixels.head is None
    out = pixels.finish(pixels.stack([pixels.sample(Image.new("RGB", (5, 5)))]))
    assert out.shape == (1, 3, 2, 2) and out[0, 0, 0, 0] == 5.0


# ---- split streams -----------------------------------------------------------------------------

def labelled(n, bad=()):
    samples = []
    for i in range(n):
        sample = {"__key__": f"s{i:03d}", "jpg": jpeg((i * 20 % 255, 0, 0)), "cls": str(i % 3)}
        if i in bad:
            sample = dict(sample, **bad[i])
        samples.append(sample)
    return samples


def read_all(root, split="test", workers=0, batch_size=3, captions=False, max_samples=None):
    info = describe_split(str(root), split, prompts=False)
    stream = SplitStream(info.urls, BatchPreprocess(open_clip.image_transform(8, is_train=False)), batch_size,
                         labels=not captions, captions=captions)
    batches = list(prefetch(Limit(max_samples)(batch_iterator(stream, workers))))
    skipped = {}
    for b in batches:
        for kind, count in b["skipped"].items():
            skipped[kind] = skipped.get(kind, 0) + count
    return batches, skipped


def test_bad_samples_are_skipped_and_counted(tmp_path):
    bad = {2: {"jpg": b"not a jpeg"}, 5: {"cls": b"three"}, 7: {"jpg": b""}}
    samples = labelled(10, bad)
    del samples[8]["jpg"]
    root = write_split(tmp_path / "ds", "test", samples, classes=["a", "b", "c"])
    batches, skipped = read_all(root)
    labels = torch.cat([b["labels"] for b in batches if b["count"]]).tolist()
    assert labels == [i % 3 for i in (0, 1, 3, 4, 6, 9)]
    assert skipped == {"corrupt_image": 1, "bad_label": 1, "empty_image": 1, "missing_image": 1}


def test_workers_read_every_sample_once(tmp_path):
    root = write_split(tmp_path / "ds", "test", labelled(11), shard_size=3, classes=["a", "b", "c"])
    serial, _ = read_all(root)
    parallel, _ = read_all(root, workers=2)
    key = lambda batches: sorted(torch.cat([b["pixels"].flatten(1) for b in batches]).sum(1).tolist())  # noqa
    assert sum(b["count"] for b in parallel) == 11 and key(parallel) == key(serial)


def test_max_samples_cuts_the_stream(tmp_path):
    samples = [{"__key__": f"s{i}", "jpg": jpeg((i, i, i)), "txt": "\n".join(["c"] * (i + 1))} for i in range(6)]
    root = write_split(tmp_path / "ds", "test", samples, retrieval=True)
    batches, _ = read_all(root, captions=True, batch_size=4, max_samples=5)
    assert [b["count"] for b in batches] == [4, 1]
    assert [len(c) for c in batches[1]["captions"]] == [5]


def test_prefetch_raises_loader_errors():
    def broken():
        yield 1
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        list(prefetch(broken()))


# ---- folders and errors ------------------------------------------------------------------------

def test_task_detection(tmp_path):
    cls = write_split(tmp_path / "cls", "test", labelled(2), classes=["a", "b", "c"])
    ret = write_split(tmp_path / "ret", "test", [{"__key__": "k", "jpg": jpeg(1), "txt": "x"}], retrieval=True)
    info = describe_split(str(cls))
    assert info.task == "classification" and info.classnames == ["a", "b", "c"] and info.size == 2
    assert info.templates == ["a photo of a {c}."]
    assert describe_split(str(ret)).task == "retrieval"


def test_missing_folder_and_split(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        describe_split(str(tmp_path / "nowhere"))
    root = write_split(tmp_path / "ds", "test", labelled(2), classes=["a", "b", "c"])
    with pytest.raises(FileNotFoundError, match="train"):
        describe_split(str(root), "train")


def test_empty_split_folder(tmp_path):
    (tmp_path / "ds" / "test").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no shards"):
        describe_split(str(tmp_path / "ds"), prompts=False)


def test_missing_templates(tmp_path):
    root = write_split(tmp_path / "ds", "test", labelled(2), classes=["a", "b", "c"])
    (root / "zeroshot_classification_templates.txt").unlink()
    with pytest.raises(FileNotFoundError, match="zeroshot_classification_templates.txt"):
        describe_split(str(root))
    assert describe_split(str(root), prompts=False).classnames == ["a", "b", "c"]
