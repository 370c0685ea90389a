"""Streaming pipelines over webdataset shards: image-text pairs, multi-view images, or both.

One pipeline serves every objective: a `SampleSpec` says which fields a batch carries
(`image`, `text`, `views`, `label`). The stream splits shards by process (node) and by DataLoader worker
itself, because handing a webdataset loader to `accelerator.prepare` would dispatch batches from rank 0.

Epochs are fixed-length: `batches_per_epoch` batches per process whatever the shard sizes, so every
process takes the same number of steps (no hang at the end of an uneven epoch). Within an epoch each
worker cycles over its shards in a seeded order; a stream is a pure function of (seed, epoch, rank, worker),
which is what makes resume exact.
"""
from __future__ import annotations

import copy
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
from webdataset.tariterators import tarfile_samples
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmcl.data_pipelines import decode, tarstream
from mmcl.data_pipelines.decode import BadSample


@dataclass
class SampleSpec:
    """What one sample turns into. `image` uses `image_transform`; `views` applies `view_transform` n times
    (then `small_view_transform` m times: SwAV's multi-crop).
    An image transform with a `finish` method is applied in two halves: per sample, then `finish` per batch."""

    image_transform: Optional[Callable] = None
    tokenizer: Optional[Callable] = None
    view_transform: Optional[Callable] = None
    num_views: int = 2
    label: bool = False
    max_pixels: int = decode.DEFAULT_MAX_PIXELS
    small_view_transform: Optional[Callable] = None  # multi-crop: `num_small_views` more views after the others
    num_small_views: int = 0

    def view_count(self) -> int:
        return self.num_views + (self.num_small_views if self.small_view_transform is not None else 0)

    def fields(self) -> List[str]:
        names = []
        if self.image_transform is not None:
            names.append("image")
        if self.tokenizer is not None:
            names.append("text")
        if self.view_transform is not None:
            names.append("views")
        if self.label:
            names.append("label")
        return names


@dataclass
class SkipCounter:
    """Bad samples skipped, by kind (see mmcl.data_pipelines.decode.KINDS). Deltas travel with each batch."""

    counts: Counter = field(default_factory=Counter)

    def add(self, kind: str, n: int = 1) -> None:
        self.counts[kind] += n

    def pop(self) -> Dict[str, int]:
        out, self.counts = dict(self.counts), Counter()
        return out


class NoUsableSamples(RuntimeError):
    """A whole pass over every shard of a training stream found no usable sample."""


def default_rank_world() -> tuple:
    """This process's (rank, world size), from torch.distributed as set up by Accelerate."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def worker_slot() -> tuple:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def assign_shards(urls: Sequence[str], seed: int, epoch: int, rank: int, world: int,
                  worker: int, workers: int, shuffle: bool = True) -> List[str]:
    """This (rank, worker)'s shards for one pass: a seeded shuffle, then every n-th shard.

    Every process computes the same shuffled order (same seed and epoch), so the slices are disjoint
    and together cover all shards exactly once.
    """
    order = list(urls)
    if shuffle:
        random.Random(hash((seed, epoch))).shuffle(order)
    slots = world * workers
    if len(order) < slots:
        raise ValueError(f"{len(order)} shards cannot feed {world} processes x {workers} workers; "
                         f"write more, smaller shards or use resampled: true")
    return order[rank * workers + worker::slots]


def resampled_shards(urls: Sequence[str], weights: Optional[Sequence[float]], rng: random.Random) -> Iterator[str]:
    """An endless draw of shards with replacement, weighted (e.g. to mix several sources)."""
    while True:
        yield rng.choices(urls, weights=weights, k=1)[0]


class ShardStream(IterableDataset):
    """Samples from shards, decoded and transformed, in fixed-size batches.

    Args:
        urls: local shard paths (resolve patterns and dataset folders with mmcl.data_pipelines.shards).
        spec: which fields each sample carries.
        batch_size: samples per batch on this process.
        seed, epoch: the stream is a deterministic function of these (and of rank and worker).
        resampled: draw shards with replacement (weights per shard) instead of passes over a shuffled list.
        repeat: cycle over the shards forever (training); False gives one pass (evaluation, tests).
        shuffle_buffer: samples held for shuffling; 0 keeps shard order.
        partial: (one pass) end with a batch of the samples left over, possibly none, and the last skips.
        rank, world: process index and count; default from torch.distributed.
    """

    def __init__(self, urls: Sequence[str], spec: SampleSpec, batch_size: int, seed: int = 0,
                 epoch: int = 0, resampled: bool = False, weights: Optional[Sequence[float]] = None,
                 repeat: bool = True, shuffle_buffer: int = 1000, partial: bool = False,
                 rank: Optional[int] = None, world: Optional[int] = None):
        super().__init__()
        if not urls:
            raise ValueError("no shards given")
        self.urls, self.spec, self.batch_size = list(urls), spec, batch_size
        self.seed, self.epoch, self.resampled, self.weights = seed, epoch, resampled, weights
        self.repeat, self.shuffle_buffer, self.partial = repeat, shuffle_buffer, partial
        self.rank, self.world = (rank, world) if rank is not None else default_rank_world()

    def shard_urls(self, rng: random.Random) -> Iterator[str]:
        worker, workers = worker_slot()
        if self.resampled:
            yield from self.resampled_urls(rng)
            return
        passes, self.good_in_pass, everything = 0, 0, False
        while True:
            order = self.seed, self.epoch * 100_003 + passes
            mine = (assign_shards(self.urls, *order, 0, 1, 0, 1) if everything else
                    assign_shards(self.urls, *order, self.rank, self.world, worker, workers, shuffle=self.repeat))
            yield from mine
            if not self.repeat:
                return
            if self.good_in_pass == 0:  # cycling forever over shards that hold nothing usable would hang
                if everything:
                    raise NoUsableSamples(f"no usable sample in a whole pass over all {len(mine)} shards "
                                          f"(first: {mine[0]}); see the skip counts")
                # this slot's shards hold nothing usable: read all of them rather than fail a run that
                # has good data in other slots (deterministic, so a resumed run reads the same)
                everything = True
            passes, self.good_in_pass = passes + 1, 0

    def resampled_urls(self, rng: random.Random) -> Iterator[str]:
        dry = 0  # draws in a row that gave no usable sample
        for url in resampled_shards(self.urls, self.weights, rng):
            self.good_in_pass = 0
            yield url  # the consumer reads the whole shard before it asks for the next one
            dry = 0 if self.good_in_pass else dry + 1
            if dry >= 16 * len(self.urls):
                raise NoUsableSamples(f"no usable sample in {dry} draws from {len(self.urls)} shards "
                                      f"(first: {self.urls[0]}); see the skip counts")

    def raw_samples(self, counter: SkipCounter, rng: random.Random) -> Iterator[dict]:
        """Raw samples of this worker's shards: local tars through mmcl's fast reader, URLs through webdataset."""
        for url in self.shard_urls(rng):
            if not os.path.isfile(url):
                yield from tarfile_samples([{"url": url}], handler=lambda err: counter.add("read_error") or True)
                continue
            yield from tarstream.shard_samples(url, lambda damage: counter.add(damage.kind))

    def make_sample(self, raw: dict, rng: random.Random) -> dict:
        spec, out = self.spec, {"key": raw.get("__key__", "")}
        if spec.label:  # label, caption, image: the order evaluation checks them in (one kind per sample)
            out["label"] = decode.sample_label(raw)
        if spec.tokenizer is not None:
            out["caption"] = decode.pick_caption(decode.sample_captions(raw), rng)
        image = decode.sample_image(raw, spec.max_pixels)
        if spec.image_transform is not None:
            out["image"] = spec.image_transform(image)
        if spec.view_transform is not None:
            out["views"] = [spec.view_transform(image) for _ in range(spec.num_views)]
            if spec.small_view_transform is not None:
                out["views"] += [spec.small_view_transform(image) for _ in range(spec.num_small_views)]
        return out

    def collate(self, samples: List[dict], counter: SkipCounter) -> dict:
        batch = {"skipped": counter.pop(), "key": [s["key"] for s in samples]}
        if not samples:  # the end of a one-pass stream: only the skips since the last batch
            return batch
        if "image" in samples[0]:
            batch["image"] = torch.stack([s["image"] for s in samples])
            finish = getattr(self.spec.image_transform, "finish", None)
            if finish is not None:  # the batch half of a two-part transform (transforms.ClipTrainTransform)
                batch["image"] = finish(batch["image"])
        if "caption" in samples[0]:
            batch["caption"] = [s["caption"] for s in samples]
            batch["text"] = self.spec.tokenizer(batch["caption"])
        if "views" in samples[0]:
            batch["views"] = [torch.stack([s["views"][v] for s in samples]) for v in range(self.spec.view_count())]
        if "label" in samples[0]:
            batch["label"] = torch.tensor([s["label"] for s in samples])
        return batch

    def __iter__(self) -> Iterator[dict]:
        worker, _ = worker_slot()
        rng = random.Random(hash((self.seed, self.epoch, self.rank, worker)))
        torch.manual_seed(hash((self.seed, self.epoch, self.rank, worker)) & 0xFFFFFFFF)  # augmentations
        counter, buffer, self.good_in_pass = SkipCounter(), [], 0
        for sample in shuffled(self.good_samples(counter, rng), self.shuffle_buffer, rng):
            buffer.append(sample)
            if len(buffer) == self.batch_size:
                yield self.collate(buffer, counter)
                buffer = []
        if self.partial and (buffer or counter.counts):  # the rest, and the skips after the last full batch
            yield self.collate(buffer, counter)

    def good_samples(self, counter: SkipCounter, rng: random.Random) -> Iterator[dict]:
        for raw in self.raw_samples(counter, rng):
            try:
                sample = self.make_sample(raw, rng)
            except BadSample as bad:
                counter.add(bad.kind)
                continue
            self.good_in_pass += 1
            yield sample


PAD = "__pad__"  # key of the filler items EpochStream's workers yield to keep epochs aligned


class EpochStream(IterableDataset):
    """Fixed-length epochs of a ShardStream one after another, for DataLoader workers that live across epochs.

    Batch j of an epoch is worker (j % workers)'s next batch of its stream for that epoch: the same batches
    as a fresh loader per epoch gives, without its cost (new processes, and each worker's shuffle buffer and
    prefetched batches thrown away at every epoch end). Workers pad their share of an epoch to the same
    length with `{PAD: True}` items, which the consumer drops, so that every epoch starts again at worker 0
    of the loader's round-robin.
    """

    def __init__(self, stream: ShardStream, batches_per_epoch: int, first_epoch: int, epochs: int):
        super().__init__()
        self.stream, self.batches_per_epoch = stream, batches_per_epoch
        self.first_epoch, self.epochs = first_epoch, epochs

    def items_per_epoch(self, workers: int) -> int:
        """Loader items per epoch, fillers included."""
        slots = max(1, workers)
        return -(-self.batches_per_epoch // slots) * slots

    def for_epoch(self, epoch: int) -> ShardStream:
        stream = copy.copy(self.stream)
        stream.epoch = epoch
        return stream

    def __iter__(self) -> Iterator[dict]:
        worker, workers = worker_slot()
        share = -(-self.batches_per_epoch // workers)
        for epoch in range(self.first_epoch, self.first_epoch + self.epochs):
            mine = len(range(worker, self.batches_per_epoch, workers))
            batches = iter(self.for_epoch(epoch))
            for _ in range(mine):
                yield next(batches)
            batches.close()
            for _ in range(share - mine):
                yield {PAD: True}


def shuffled(samples: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """A reservoir shuffle: keep `size` samples, emit a random one as each new one arrives."""
    if size <= 1:
        yield from samples
        return
    pool: List[dict] = []
    for sample in samples:
        if len(pool) < size:
            pool.append(sample)
            continue
        index = rng.randrange(size)
        yield pool[index]
        pool[index] = sample
    rng.shuffle(pool)
    yield from pool


def make_loader(stream: IterableDataset, workers: int = 2) -> DataLoader:
    """A DataLoader over a batching stream (the stream batches; the loader only parallelises)."""
    return DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=False,
                      prefetch_factor=4 if workers > 0 else None)


def merge_skips(total: Counter, batch: dict) -> None:
    """Add a batch's skip counts to a running total (kept in the main process)."""
    total.update(batch.get("skipped", {}))
