"""The streaming pipelines over real webdataset tars written in the test."""
from __future__ import annotations

import io
import random
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import webdataset as wds
from PIL import Image

from mmcl.data_pipelines import shards
from mmcl.data_pipelines.stream import PAD, EpochStream, SampleSpec, ShardStream, assign_shards, make_loader, shuffled
from mmcl.data_pipelines.transforms import clip_transform, view_transform


def png_bytes(value: int, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(folder: Path, n_shards: int, per_shard: int, extra=None) -> list:
    """Shards of distinct solid-colour images, each with three caption lines and a class index."""
    folder.mkdir(parents=True, exist_ok=True)
    urls = []
    for s in range(n_shards):
        path = folder / f"{s}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(per_shard):
                n = s * per_shard + i
                sink.write({"__key__": f"s{n:05d}", "png": png_bytes(n % 256),
                            "txt": f"caption a {n}\ncaption b {n}\ncaption c {n}", "cls": str(n % 10)})
            for sample in (extra or {}).get(s, []):
                sink.write(sample)
        urls.append(str(path))
    return urls


SPEC = SampleSpec(image_transform=clip_transform(16, train=False), tokenizer=open_clip.tokenizer.SimpleTokenizer(context_length=16),
                  label=True)


def keys_of(stream, workers=0) -> list:
    return [k for batch in make_loader(stream, workers) for k in batch["key"]]


def test_batches_carry_every_field(tmp_path):
    urls = write_shards(tmp_path, 2, 8)
    batch = next(iter(ShardStream(urls, SPEC, batch_size=4, repeat=False, rank=0, world=1)))
    assert batch["image"].shape == (4, 3, 16, 16)
    assert batch["text"].shape == (4, 16) and batch["text"].dtype == torch.long
    assert batch["label"].tolist() == [int(k[1:]) % 10 for k in batch["key"]]
    assert all(c.startswith("caption") for c in batch["caption"])


def test_one_pass_yields_each_sample_once(tmp_path):
    urls = write_shards(tmp_path, 4, 10)
    keys = keys_of(ShardStream(urls, SPEC, batch_size=5, repeat=False, shuffle_buffer=7, rank=0, world=1))
    assert sorted(keys) == [f"s{n:05d}" for n in range(40)]


def test_two_nodes_two_workers_disjoint_and_complete(tmp_path):
    urls = write_shards(tmp_path, 8, 6)
    seen = [keys_of(ShardStream(urls, SPEC, batch_size=3, repeat=False, rank=r, world=2), workers=2) for r in (0, 1)]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == [f"s{n:05d}" for n in range(48)]


def test_shard_assignment_changes_per_epoch_but_stays_a_partition():
    urls = [f"{i}.tar" for i in range(12)]
    for epoch in (0, 1):
        parts = [assign_shards(urls, 0, epoch, r, 2, w, 2) for r in (0, 1) for w in (0, 1)]
        assert sorted(sum(parts, [])) == sorted(urls)
    assert assign_shards(urls, 0, 0, 0, 2, 0, 2) != assign_shards(urls, 0, 1, 0, 2, 0, 2)


def test_too_few_shards_for_the_slots_is_a_clear_error():
    with pytest.raises(ValueError, match="3 shards cannot feed 2 processes x 2 workers"):
        assign_shards(["a", "b", "c"], 0, 0, 0, 2, 0, 2)


@pytest.mark.parametrize("resampled", [False, True])
def test_repeating_stream_gives_any_number_of_batches(tmp_path, resampled):
    urls = write_shards(tmp_path, 2, 5)
    stream = ShardStream(urls, SPEC, batch_size=4, resampled=resampled, rank=0, world=1, shuffle_buffer=3)
    it = iter(stream)
    batches = [next(it) for _ in range(12)]  # 48 samples from a 10-sample set
    assert all(len(b["key"]) == 4 for b in batches)


def test_stream_is_deterministic_for_a_seed_and_epoch(tmp_path):
    urls = write_shards(tmp_path, 3, 6)
    make = lambda epoch: ShardStream(urls, SPEC, batch_size=3, seed=5, epoch=epoch, rank=0, world=1, shuffle_buffer=4)
    first = [next(iter(make(0)))["key"] for _ in range(2)]
    assert first[0] == first[1]
    it0, it1 = iter(make(0)), iter(make(1))
    assert [next(it0)["key"] for _ in range(4)] != [next(it1)["key"] for _ in range(4)]


def test_captions_cover_every_line(tmp_path):
    urls = write_shards(tmp_path, 1, 1)
    spec = SampleSpec(tokenizer=open_clip.tokenizer.SimpleTokenizer(context_length=16))
    stream = ShardStream(urls, spec, batch_size=1, rank=0, world=1, shuffle_buffer=0)
    it = iter(stream)
    drawn = Counter(next(it)["caption"][0] for _ in range(60))
    assert set(drawn) == {"caption a 0", "caption b 0", "caption c 0"}
    assert min(drawn.values()) >= 8  # roughly uniform: 20 expected each


def test_multi_view_stream_needs_no_caption(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    with wds.TarWriter(str(folder / "0.tar")) as sink:
        for i in range(6):
            sink.write({"__key__": f"k{i}", "jpg": png_bytes(i * 40, 24)})
    spec = SampleSpec(view_transform=view_transform(16), num_views=3)
    batch = next(iter(ShardStream([str(folder / "0.tar")], spec, batch_size=6, repeat=False, rank=0, world=1)))
    assert len(batch["views"]) == 3 and batch["views"][0].shape == (6, 3, 16, 16)
    assert not torch.equal(batch["views"][0], batch["views"][1])  # independent augmentations


def bad_samples() -> list:
    good = png_bytes(7)
    bomb = io.BytesIO()
    Image.new("L", (3000, 3000)).save(bomb, format="PNG")  # 9 Mpx, a few kB on disk
    return [
        {"__key__": "trunc", "png": good[: len(good) // 2], "txt": "x"},
        {"__key__": "zero", "png": b"", "txt": "x"},
        {"__key__": "notimg", "jpg": b"this is not an image", "txt": "x"},
        {"__key__": "nocap", "png": good},
        {"__key__": "emptycap", "png": good, "txt": "  \n \n"},
        {"__key__": "latin1", "png": good, "txt": "caf\xe9".encode("latin-1")},
        {"__key__": "bomb", "png": bomb.getvalue(), "txt": "x"},
        {"__key__": "noimage", "txt": "only text"},
    ]


def test_each_kind_of_corrupt_sample_is_skipped_and_counted(tmp_path):
    urls = write_shards(tmp_path, 2, 5, extra={0: bad_samples()})
    spec = SampleSpec(image_transform=clip_transform(16, train=False), tokenizer=open_clip.tokenizer.SimpleTokenizer(context_length=16),
                      max_pixels=1_000_000)
    skipped, keys = Counter(), []
    for batch in make_loader(ShardStream(urls, spec, batch_size=2, repeat=False, partial=True, rank=0, world=1), 0):
        skipped.update(batch["skipped"])
        keys += batch["key"]
    assert sorted(keys) == [f"s{n:05d}" for n in range(10)]
    assert skipped == {"corrupt_image": 2, "empty_image": 1, "missing_caption": 1, "empty_caption": 1,
                       "bad_caption_encoding": 1, "too_many_pixels": 1, "missing_image": 1}


def test_truncated_tar_keeps_the_rest_and_is_counted(tmp_path):
    urls = write_shards(tmp_path, 2, 20)
    data = Path(urls[0]).read_bytes()
    Path(urls[0]).write_bytes(data[: len(data) // 2])
    skipped, keys = Counter(), []
    for batch in make_loader(ShardStream(urls, SPEC, batch_size=1, repeat=False, rank=0, world=1, shuffle_buffer=0), 0):
        skipped.update(batch["skipped"])
        keys += batch["key"]
    assert set(f"s{n:05d}" for n in range(20, 40)) <= set(keys)  # the intact shard is read whole
    assert 20 < len(keys) < 40  # part of the cut shard too
    assert skipped["truncated_tar"] == 1


def test_damaged_tar_header_is_counted_and_the_stream_goes_on(tmp_path):
    """Training streams read local tars with mmcl's parser: a header whose checksum fails ends that shard
    (one read_error), the other shard is read whole."""
    urls = write_shards(tmp_path, 2, 10)
    with tarfile.open(urls[0]) as tar:
        header = tar.getmembers()[15].offset  # the 16th member: sample 5's first file
    data = bytearray(Path(urls[0]).read_bytes())
    data[header] ^= 0xFF  # its checksum no longer matches
    Path(urls[0]).write_bytes(bytes(data))
    skipped, keys = Counter(), []
    for batch in make_loader(ShardStream(urls, SPEC, batch_size=1, repeat=False, rank=0, world=1, shuffle_buffer=0), 0):
        skipped.update(batch["skipped"])
        keys += batch["key"]
    assert sorted(keys) == [f"s{n:05d}" for n in range(5)] + [f"s{n:05d}" for n in range(10, 20)]
    assert skipped == {"read_error": 1}


def test_a_stream_with_no_usable_sample_stops_instead_of_hanging(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    with wds.TarWriter(str(folder / "0.tar")) as sink:
        sink.write({"__key__": "a", "png": b"", "txt": "x"})
    stream = ShardStream([str(folder / "0.tar")], SPEC, batch_size=1, rank=0, world=1)
    with pytest.raises(RuntimeError, match="no usable sample"):
        next(iter(stream))


def test_missing_shard_and_empty_pattern_are_clear_errors(tmp_path):
    urls = write_shards(tmp_path, 1, 2)
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        shards.check_local(urls + [str(tmp_path / "missing.tar")])
    with pytest.raises(FileNotFoundError, match="nothing-0.tar"):
        shards.check_local(shards.expand_urls(str(tmp_path / "nothing-{0..3}.tar")))
    with pytest.raises(FileNotFoundError, match="no shards"):
        shards.expand_urls("")
    with pytest.raises(ValueError):
        shards.check_local(["pipe:cat x.tar"])


def test_reservoir_shuffle_keeps_every_sample():
    rng = random.Random(0)
    out = list(shuffled(iter(range(100)), 10, rng))
    assert sorted(out) == list(range(100)) and out != list(range(100))


@pytest.mark.parametrize("workers", [0, 2])
def test_epoch_stream_gives_the_batches_of_a_fresh_loader_per_epoch(tmp_path, workers):
    """Workers that live across epochs yield, epoch by epoch, what a new loader per epoch would (7 batches per
    epoch over 2 workers: the fillers keep every epoch starting at worker 0)."""
    urls = write_shards(tmp_path, 4, 9)
    base = ShardStream(urls, SPEC, batch_size=4, seed=3, rank=0, world=1, shuffle_buffer=5)
    per_epoch = []
    for epoch in range(3):
        stream = ShardStream(urls, SPEC, batch_size=4, seed=3, epoch=epoch, rank=0, world=1, shuffle_buffer=5)
        loader = iter(make_loader(stream, workers))
        per_epoch.append([next(loader)["key"] for _ in range(7)])
    epochs = EpochStream(base, batches_per_epoch=7, first_epoch=0, epochs=3)
    items = list(make_loader(epochs, workers))
    assert len(items) == 3 * epochs.items_per_epoch(workers)
    real = [item["key"] for item in items if not item.get(PAD)]
    assert real == [keys for epoch in per_epoch for keys in epoch]
    assert sum(1 for item in items if item.get(PAD)) == (3 if workers == 2 else 0)
