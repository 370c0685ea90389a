"""Image and text embeddings of a split, computed once, batched, without autograd (`inference`).

Features are L2-normalised (the model's `encode_image(x, normalize=True)`), float32, on the CPU, in the
order the batches arrive. For retrieval, every caption line of a sample is embedded and
`text_to_image[t]` is the index of caption t's image.
"""
from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, Optional

import torch

from mmcl import memory
from mmcl.models.text import text_encoder
from mmcl.progress import progress_bar
from mmcl.eval.datasets import BatchPreprocess, Limit, SplitInfo, SplitStream, batch_iterator, prefetch
from mmcl.eval.threads import ThreadPolicy


@dataclass
class Features:
    """Embeddings of one split, with what was read."""

    image: torch.Tensor  # [N, D]
    labels: Optional[torch.Tensor] = None  # [N] class indices (classification)
    text: Optional[torch.Tensor] = None  # [T, D] caption embeddings (retrieval)
    text_to_image: Optional[torch.Tensor] = None  # [T] image index of each caption
    skipped: Dict[str, int] = field(default_factory=dict)  # bad samples by kind
    seconds: float = 0.0  # reading, decoding and embedding
    threads: Dict[str, object] = field(default_factory=dict)  # the model's CPU threads (mmcl.eval.threads)

    @property
    def samples(self) -> int:
        return int(self.image.shape[0])


def model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """model.eval() for the block, then the previous mode back (the trainer evaluates mid-training)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def autocast(device: torch.device, amp: bool):
    """torch.autocast when `amp`: bfloat16 on a CPU, float16 on a GPU (torch's defaults)."""
    return torch.autocast(device.type) if amp else contextlib.nullcontext()


@contextlib.contextmanager
def inference(device: torch.device, amp: bool):
    """No autograd for the block; autocast with `amp`. Without amp: torch.inference_mode(). With amp:
    torch.no_grad(), because torch skips autocast's cache of cast weights under inference_mode (pytorch
    #165068) and then casts every weight again on every call: ViT-B/32 in bf16 ran 15-20% slower."""
    grad_off = torch.no_grad() if amp else torch.inference_mode()
    with grad_off, autocast(device, amp):
        yield


MIN_ROWS = 12


def encode_rows(encode: Callable, x: torch.Tensor) -> torch.Tensor:
    """`encode(x, normalize=True)`, given at least MIN_ROWS rows on a CPU (copies of the first row, dropped
    after). MKL's float32 matmul, torch's on a CPU, rounds matrices of 5-7 and 9-11 rows differently with
    different thread counts (12 or more it does not): a last batch of 6 images or a class with 6 prompts
    would make the features, and the metrics, depend on the number of threads."""
    rows = len(x)
    if rows >= MIN_ROWS or x.device.type != "cpu":
        return encode(x, normalize=True)
    padded = torch.cat([x, x[:1].expand(MIN_ROWS - rows, *x.shape[1:])])
    return encode(padded, normalize=True)[:rows]


def _prepare_fn(pixels: BatchPreprocess, channels_last: bool) -> Callable[[dict], dict]:
    """What the prefetch thread does to each batch: the float images the model takes."""
    def prepare(batch: dict) -> dict:
        if batch["count"]:
            images = pixels.finish(batch["pixels"])
            batch["images"] = images.to(memory_format=torch.channels_last) if channels_last else images
        return batch
    return prepare


def _tokens(batch: dict, tokenizer: Optional[Callable]) -> Optional[torch.Tensor]:
    """The batch's caption tokens (made here when the loader did not make them); None without captions."""
    if not any(batch.get("captions", ())):
        return None
    if "tokens" in batch:
        return batch["tokens"]
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to embed captions")
    return tokenizer([caption for captions in batch["captions"] for caption in captions])


class _Collector:
    """Accumulates per-batch outputs on the CPU."""

    def __init__(self):
        self.image, self.labels, self.text, self.owner = [], [], [], []
        self.skipped, self.images = Counter(), 0

    def add(self, batch: dict, image: torch.Tensor, text: Optional[torch.Tensor]) -> None:
        if "labels" in batch:
            self.labels.append(batch["labels"])
        if text is not None:
            self.text.append(text)
            index = torch.arange(self.images, self.images + len(image))
            counts = torch.tensor([len(captions) for captions in batch["captions"]])
            self.owner.append(index.repeat_interleave(counts))
        self.image.append(image)
        self.images += len(image)

    def features(self, seconds: float) -> Features:
        cat = (lambda parts: torch.cat(parts) if parts else None)
        image = cat(self.image)
        if image is None:
            image = torch.zeros(0, 0)
        return Features(image, cat(self.labels), cat(self.text), cat(self.owner), dict(self.skipped), seconds)


def embed_batches(model: torch.nn.Module, batches: Iterator[dict], device: torch.device,
                  tokenizer: Optional[Callable] = None, amp: bool = False, progress=None, collector=None,
                  threads: Optional[ThreadPolicy] = None) -> Features:
    """Run the model over prepared batches ("images", optional "labels", "captions" / "tokens"); `threads`
    sets torch's threads from the first images (mmcl.eval.threads).

    `collector` receives each batch's embeddings (`add(batch, image, text)`, `skipped`, `features(seconds)`);
    the default keeps them all in memory. A collector that writes them out bounds the memory.
    """
    memory.keep_freed_memory()  # each batch's activations reuse the last one's memory (mmcl/memory.py)
    collector, start = collector if collector is not None else _Collector(), time.perf_counter()
    encode_text = text_encoder(model)  # captions cut after their last end-of-text token (mmcl.models.text)
    with inference(device, amp):
        for batch in batches:
            collector.skipped.update(batch.get("skipped", {}))
            if not batch["count"]:
                continue
            images = batch["images"].to(device, non_blocking=True)
            if threads is not None:
                threads.choose(model, images)
            image = encode_rows(model.encode_image, images)
            text, tokens = None, _tokens(batch, tokenizer)
            if tokens is not None:
                text = encode_rows(encode_text, tokens.to(device, non_blocking=True)).float().cpu()
            collector.add(batch, image.float().cpu(), text)
            if progress is not None:
                progress.update(batch["count"])
    return collector.features(time.perf_counter() - start)


def split_features(model: torch.nn.Module, preprocess: Callable, tokenizer: Optional[Callable], info: SplitInfo,
                   batch_size: int = 128, device=None, workers: int = 0, max_samples: Optional[int] = None,
                   labels: Optional[bool] = None, texts: Optional[bool] = None, amp: bool = False,
                   channels_last: bool = False, progress: bool = False, threads: Optional[int] = None) -> Features:
    """Embeddings of a split: images always, plus `labels` (default: for classification splits) and the
    embeddings of every caption (`texts`, default: for retrieval splits, with `tokenizer`). On a CPU the
    model's threads follow mmcl.eval.threads.ThreadPolicy (`threads` fixes them); `Features.threads` says what
    was used.

    Raises ValueError naming the split when it holds no usable sample.
    """
    labels = info.task == "classification" if labels is None else labels
    texts = info.task == "retrieval" if texts is None else texts
    if texts and tokenizer is None:
        raise ValueError("a tokenizer is needed to embed captions")
    pixels = BatchPreprocess(preprocess)
    total = min(filter(None, (info.size, max_samples)), default=None)
    workers = max(workers, 0) if total is None else min(max(workers, 0), -(-total // batch_size))
    # Worker processes tokenize (no GIL shared with the model); without workers the main thread does.
    stream = SplitStream(info.urls, pixels, batch_size, labels=labels, captions=texts,
                         tokenizer=tokenizer if texts and workers > 0 else None)
    device = torch.device(device) if device is not None else model_device(model)
    prepare = _prepare_fn(pixels, channels_last)
    policy = ThreadPolicy.for_pass(device, workers, threads)
    bar = progress_bar(total, f"{info.name}/{info.split}", "img", enabled=progress)
    with bar, policy.applied():
        batches = prefetch(Limit(max_samples)(batch_iterator(stream, workers)), prepare)
        features = embed_batches(model, batches, device, tokenizer if texts else None, amp, bar, threads=policy)
    features.threads = policy.summary()
    if features.samples == 0:
        where = f"{info.root}/{info.split}"
        raise ValueError(f"no usable samples in {where}" + (f" (skipped: {features.skipped})"
                                                              if features.skipped else ""))
    return features
