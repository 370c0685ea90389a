"""Evaluation data: a CLIP_benchmark-layout split read once, in order, decoded safely, preprocessed, batched.

Layout (see mmcl.data_pipelines.shards): `ROOT/SPLIT/{0..N-1}.tar` + `nshards.txt`, `ROOT/classnames.txt`,
`ROOT/zeroshot_classification_templates.txt`, `ROOT/dataset_type.txt`.

Speed comes from three things that leave every number unchanged:
- shards are read with mmcl.data_pipelines.tarstream (6x faster than `tarfile` on small images);
- an open_clip / torchvision eval transform is split in two: its PIL steps (resize, crop, RGB) run per sample,
  its ToTensor + Normalize tail runs once per batch on uint8 pixels (bit-identical, 4x less to send
  between processes);
- loading overlaps the model: batches come from DataLoader workers (batches dealt to the workers in turn,
  so they are the same for any number of workers; captions are tokenized there too) or, with no workers,
  from a background thread (PIL releases the GIL while it decodes). Tokenizing is pure Python and holds
  the GIL, so without workers it stays in the main thread: in the background thread it would make the
  model wait for the GIL between every two ops.
Every process reads the whole split (no split by node): evaluation runs where it is called.
"""
from __future__ import annotations

import os
import queue
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision import transforms as T

from mmcl.data_pipelines import decode, shards
from mmcl.data_pipelines.decode import BadSample
from mmcl.data_pipelines.tarstream import shard_samples
from mmcl.data_pipelines.transforms import pixels_to_input

CLASSIFICATION, RETRIEVAL = "classification", "retrieval"


@dataclass
class SplitInfo:
    """What is known about one split before reading it."""

    root: str
    split: str
    task: str
    urls: List[str]
    size: Optional[int] = None  # from sizes.json, for progress bars
    classnames: Optional[List[str]] = None
    templates: Optional[List[str]] = None

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.root))


def read_lines(path: str, what: str) -> List[str]:
    """Non-empty stripped lines of a text file; FileNotFoundError / ValueError naming the path."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {what} file: {path}")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        raise ValueError(f"{what} file is empty: {path}")
    return lines


def describe_split(root: str, split: str = "test", task: Optional[str] = None, prompts: bool = True,
                   classnames_file: Optional[str] = None, templates_file: Optional[str] = None) -> SplitInfo:
    """Shards and task of `root/split`; for classification also class names and (if `prompts`) templates.

    Missing folders or shards raise FileNotFoundError naming the path. Without `prompts`, class names are
    optional (a probe only needs labels).
    """
    root = os.fspath(root)
    urls = shards.split_urls(root, split)
    task = task or shards.dataset_task(root)
    if task not in (CLASSIFICATION, RETRIEVAL):
        raise ValueError(f"unknown task {task!r}: use {CLASSIFICATION} or {RETRIEVAL}")
    info = SplitInfo(root, split, task, urls, shards.split_size(root, split))
    if task == CLASSIFICATION and (prompts or classnames_file
                                   or os.path.isfile(os.path.join(root, shards.CLASSNAMES_FILE))):
        info.classnames = (read_lines(classnames_file, "class names") if classnames_file
                           else shards.read_classnames(root))
    if task == CLASSIFICATION and prompts:
        info.templates = (read_lines(templates_file, "templates") if templates_file
                          else shards.read_templates(root))
    return info


def _tensor_tail(preprocess: Callable):
    """(PIL part, mean, std) when `preprocess` ends in ToTensor + Normalize, else None."""
    steps = getattr(preprocess, "transforms", None)
    if not isinstance(preprocess, T.Compose) or not steps or len(steps) < 2:
        return None
    to_tensor, normalize = steps[-2], steps[-1]
    if not isinstance(to_tensor, T.ToTensor) or not isinstance(normalize, T.Normalize) or normalize.inplace:
        return None
    dtype = torch.get_default_dtype()
    mean = torch.as_tensor(normalize.mean, dtype=dtype).view(1, -1, 1, 1)
    std = torch.as_tensor(normalize.std, dtype=dtype).view(1, -1, 1, 1)
    return T.Compose(steps[:-2]), mean, std


class BatchPreprocess:
    """A preprocess applied per sample (`sample`) and finished per batch (`finish`) with identical results.

    For ToTensor + Normalize tails, `sample` returns HxWx3 uint8 pixels and `finish` converts the batch
    exactly as ToTensor (float, / 255) and Normalize ((x - mean) / std) would; otherwise `sample` runs the
    whole preprocess and `finish` only stacks.
    """

    def __init__(self, preprocess: Callable):
        self.preprocess = preprocess
        split = _tensor_tail(preprocess)
        self.head, self.mean, self.std = split if split else (None, None, None)

    def sample(self, image: Image.Image) -> torch.Tensor:
        if self.head is None:
            return self.preprocess(image)
        out = self.head(image)
        if isinstance(out, Image.Image) and out.mode == "RGB":
            return torch.from_numpy(np.array(out, dtype=np.uint8))  # HxWx3, the pixels ToTensor would read
        return self.preprocess.transforms[-1](self.preprocess.transforms[-2](out))

    def _to_float(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels_to_input(pixels, self.mean, self.std)

    def stack(self, items: Sequence[torch.Tensor]) -> torch.Tensor:
        """One batch tensor: uint8 NHWC when every item is uint8 pixels, else float NCHW."""
        if self.head is None or all(item.dtype == torch.uint8 for item in items):
            return torch.stack(items)
        return torch.stack([self._to_float(item[None])[0] if item.dtype == torch.uint8 else item
                            for item in items])

    def finish(self, batch: torch.Tensor) -> torch.Tensor:
        """The float NCHW batch the model takes."""
        return self._to_float(batch) if self.head is not None and batch.dtype == torch.uint8 else batch


class SplitStream(IterableDataset):
    """Batches of one pass over `urls`: {"pixels", "labels" | "captions" (+ "tokens"), "count", "skipped"}.

    `pixels` are BatchPreprocess.sample's outputs stacked (BatchPreprocess.finish makes the model input).
    With `meta`, batches also carry each sample's "keys", "urls" (its shard) and "offsets" (of its first tar
    header); with `optional_captions`, a sample without `txt` keeps its image and gets no captions.
    Bad samples are skipped and counted by kind (mmcl.data_pipelines.decode.KINDS); each batch carries the counts
    of its own window, so a window of only bad samples is a batch with count 0.
    """

    def __init__(self, urls: Sequence[str], pixels: BatchPreprocess, batch_size: int, labels: bool = False,
                 captions: bool = False, tokenizer: Optional[Callable] = None,
                 max_pixels: int = decode.DEFAULT_MAX_PIXELS, meta: bool = False,
                 optional_captions: bool = False):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.urls, self.pixels, self.batch_size = list(urls), pixels, batch_size
        self.labels, self.captions, self.max_pixels = labels, captions, max_pixels
        self.tokenizer = tokenizer  # when set, batches also carry "tokens" (all captions, in order)
        self.meta, self.optional_captions = meta, optional_captions

    def make_item(self, raw: dict) -> dict:
        item = {}
        if self.labels:
            item["label"] = decode.sample_label(raw)
        if self.captions:
            optional = self.optional_captions and "txt" not in raw
            item["captions"] = [] if optional else decode.sample_captions(raw)
        if self.meta:
            item["key"], item["url"], item["offset"] = raw["__key__"], raw["__url__"], raw["__offset__"]
        item["pixels"] = self.pixels.sample(decode.sample_image(raw, self.max_pixels))
        return item

    def collate(self, items: List[dict], skipped: Counter) -> dict:
        batch = {"count": len(items), "skipped": dict(skipped)}
        skipped.clear()
        if items:
            batch["pixels"] = self.pixels.stack([item["pixels"] for item in items])
        if self.labels:
            batch["labels"] = torch.tensor([item["label"] for item in items], dtype=torch.long)
        if self.captions:
            batch["captions"] = [item["captions"] for item in items]
            if self.tokenizer is not None and any(batch["captions"]):
                batch["tokens"] = self.tokenizer([c for captions in batch["captions"] for c in captions])
        if self.meta:
            for name in ("key", "url", "offset"):
                batch[name + "s"] = [item[name] for item in items]
        return batch

    def __iter__(self) -> Iterator[dict]:
        """Batch j holds the good samples among samples [j * batch_size, (j + 1) * batch_size) of the split.

        With W DataLoader workers, worker w makes batches w, w + W, ...: every worker walks the whole split
        (tar parsing is cheap) and decodes only its own samples. The DataLoader takes batches from the workers
        in turn, so the batches, and every metric, are the same for any number of workers, and any number of
        workers can share a single shard.
        """
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        position, skipped, items = 0, Counter(), []
        owns = lambda pos: (pos // self.batch_size) % workers == worker  # noqa: E731 - pos's window is ours
        for url in self.urls:
            for raw in shard_samples(url, lambda damage: skipped.update([damage.kind] if owns(position) else []),
                                    offsets=self.meta):
                if owns(position):
                    try:
                        items.append(self.make_item(raw))
                    except BadSample as bad:
                        skipped[bad.kind] += 1
                    if (position + 1) % self.batch_size == 0:  # the window's last sample: a batch, even empty
                        yield self.collate(items, skipped)
                        items = []
                position += 1
        if position % self.batch_size and owns(position):  # the last, partial window
            yield self.collate(items, skipped)


def batch_iterator(stream: SplitStream, workers: int = 0) -> Iterator[dict]:
    """The stream's batches, from `workers` DataLoader processes or in-process (the same batches either way)."""
    if workers <= 0:
        return iter(stream)
    loader = DataLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=4,
                        persistent_workers=False)
    return iter(loader)


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def prefetch(source: Iterator, prepare: Callable = lambda x: x, depth: int = 2) -> Iterator:
    """`prepare(item)` for each item of `source`, produced in a background thread, `depth` items ahead.

    Decoding (PIL releases the GIL while it works) and the model's kernels then run at the same time.
    Errors are raised in the consumer; stopping early stops the thread.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce():
        try:
            for item in source:
                if not _put(q, ("item", prepare(item)), stop):
                    return
            _put(q, ("end", None), stop)
        except BaseException as err:  # handed to the consumer, which raises it
            _put(q, ("error", err), stop)

    thread = threading.Thread(target=produce, name="mmcl-eval-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


@dataclass
class Limit:
    """Stops a batch stream after `max_samples` good samples (None: no limit), cutting the last batch."""

    max_samples: Optional[int] = None
    seen: int = field(default=0)

    def __call__(self, batches: Iterator[dict]) -> Iterator[dict]:
        for batch in batches:
            left = None if self.max_samples is None else self.max_samples - self.seen
            if left is not None and batch["count"] > left:
                batch = cut_batch(batch, left)
            self.seen += batch["count"]
            yield batch
            if left is not None and self.seen >= self.max_samples:
                return


def cut_batch(batch: dict, n: int) -> dict:
    """The first `n` samples of a batch."""
    out = dict(batch, count=n)
    if "tokens" in batch:
        out["tokens"] = batch["tokens"][:sum(len(c) for c in batch["captions"][:n])]
    for key in ("pixels", "labels", "captions", "keys", "urls", "offsets"):
        if key in batch:
            out[key] = batch[key][:n]
    return out
