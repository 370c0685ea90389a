"""`mmcl embed`: image embeddings and one embedding per caption line of a set of shards, written part by part.

The samples go through the evaluation reader (mmcl.eval.datasets.SplitStream -> mmcl.eval.features.embed_batches): the
same tar parser, safe decoding, split preprocess, loader workers and background prefetch as `mmcl eval`, so
the two run at the same speed and skip the same bad samples. Instead of keeping every embedding in memory,
a part's embeddings go to disk when the part ends: memory is bounded by one part (`part_shards` shards).

A part is a fixed group of consecutive shards; its files are written to temporary names and renamed, and its
marker (`parts/part_NNNNN.json`) last. Running the same command again skips the finished parts, so an
interrupted run resumes part by part. See mmcl/search/store.py for the layout.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import torch

from mmcl.data_pipelines import decode, shards
from mmcl.eval.datasets import BatchPreprocess, SplitStream, batch_iterator, prefetch
from mmcl.eval.features import _prepare_fn, embed_batches, eval_mode
from mmcl.eval.threads import ThreadPolicy
from mmcl.progress import progress_bar
from mmcl.search import store

DTYPES = ("float32", "float16")


@dataclass
class EmbedOptions:
    split: str = "test"  # read ROOT/SPLIT when --data is a dataset folder
    batch_size: int = 128
    workers: int = 2  # DataLoader processes (at most one per shard of a part)
    part_shards: int = 4  # shards per part: the unit of memory and of resuming
    dtype: str = "float32"  # float16 halves the files; the index is built in float32 either way
    device: Optional[str] = None
    progress: bool = True
    max_pixels: int = decode.DEFAULT_MAX_PIXELS


def resolve_model_spec(spec: str) -> str:
    """The model spec with its paths made absolute, so the index can load the model from anywhere."""
    if spec.startswith("local-dir:"):
        return "local-dir:" + os.path.abspath(spec[len("local-dir:"):])
    if os.path.isdir(spec):
        return os.path.abspath(spec)
    if ":" in spec:
        name, weights = spec.split(":", 1)
        return f"{name}:{os.path.abspath(weights)}"
    return spec


def resolve_shards(data: List[str], split: str) -> List[str]:
    """Absolute local shard paths from dataset folders, split folders, brace patterns or tar paths."""
    urls = []
    for spec in data:
        if not os.path.exists(spec) and "{" not in spec and "::" not in spec:
            raise FileNotFoundError(f"no such dataset folder or shard: {spec}")
        urls.extend(shards.expand_urls(spec, split))
    if not urls:
        raise ValueError(f"no shards in {' '.join(data)}")
    return [os.path.abspath(url) for url in shards.check_local(urls)]


class PartCollector:
    """Receives one part's batches from embed_batches; keeps arrays and metadata rows until the part ends."""

    def __init__(self):
        self.image: List[np.ndarray] = []
        self.text: List[np.ndarray] = []
        self.rows = {"key": [], "caption": [], "captions": [], "shard": [], "offset": []}
        self.text_rows = {"image": [], "caption": []}
        self.skipped, self.images, self.seconds = Counter(), 0, 0.0

    @property
    def samples(self) -> int:
        return self.images

    def add(self, batch: dict, image: torch.Tensor, text: Optional[torch.Tensor]) -> None:
        captions = batch.get("captions") or [[] for _ in batch["keys"]]
        for i, (key, url, offset, lines) in enumerate(zip(batch["keys"], batch["urls"], batch["offsets"], captions)):
            self.rows["key"].append(key)
            self.rows["caption"].append(lines[0] if lines else "")
            self.rows["captions"].append(len(lines))
            self.rows["shard"].append(url)
            self.rows["offset"].append(int(offset))
            self.text_rows["image"].extend([self.images + i] * len(lines))
            self.text_rows["caption"].extend(lines)
        self.image.append(image.numpy())
        if text is not None:
            self.text.append(text.numpy())
        self.images += len(image)

    def features(self, seconds: float) -> "PartCollector":
        self.seconds = seconds
        return self

    def write(self, emb: Path, part: int, dtype: str, urls: List[str]) -> dict:
        """The part's arrays and tables, then its marker; returns the marker's content."""
        dim = self.image[0].shape[1] if self.image else 0
        join = (lambda blocks: np.concatenate(blocks) if blocks else np.zeros((0, dim), np.float32))
        name = store.part_name(part)
        store.write_array(emb / store.IMAGE_EMB / f"{name}.npy", join(self.image).astype(dtype))
        store.write_array(emb / store.TEXT_EMB / f"{name}.npy", join(self.text).astype(dtype))
        store.write_table(emb / store.IMAGE_META / f"{name}.parquet", self.rows)
        store.write_table(emb / store.TEXT_META / f"{name}.parquet", self.text_rows)
        mark = {"format": store.FORMAT, "part": part, "shards": urls, "images": self.images,
                "captions": len(self.text_rows["caption"]), "dim": int(dim), "skipped": dict(self.skipped),
                "seconds": round(self.seconds, 3)}
        store.write_json(emb / store.PART_MARKS / f"{name}.json", mark)
        return mark


def embed_part(model, preprocess: Callable, tokenizer: Optional[Callable], urls: List[str], opts: EmbedOptions,
               device: torch.device, bar, threads: ThreadPolicy) -> PartCollector:
    """One pass of the evaluation reader over a part's shards, into a PartCollector."""
    pixels = BatchPreprocess(preprocess)
    workers = min(max(opts.workers, 0), len(urls))
    texts = tokenizer is not None
    # Worker processes tokenize (no GIL shared with the model); without workers the main thread does.
    stream = SplitStream(urls, pixels, opts.batch_size, captions=texts, max_pixels=opts.max_pixels, meta=True,
                         tokenizer=tokenizer if texts and workers else None, optional_captions=True)
    batches = prefetch(batch_iterator(stream, workers), _prepare_fn(pixels, False))
    return embed_batches(model, batches, device, tokenizer, progress=bar, collector=PartCollector(),
                         threads=threads)


def _plan(model: str, urls: List[str], opts: EmbedOptions) -> dict:
    return {"format": store.FORMAT, "model": model, "shards": urls, "part_shards": opts.part_shards,
            "dtype": opts.dtype, "parts": (len(urls) + opts.part_shards - 1) // opts.part_shards}


def start_or_resume(emb: Path, plan: dict) -> List[int]:
    """The parts already done. A folder holding another embedding (other model, shards, part size or dtype)
    or anything else is refused, so nothing is mixed or overwritten."""
    if (emb / store.EMBED_FILE).exists():
        old = store.read_json(emb / store.EMBED_FILE, "embedding folder")
        for key, what in (("model", "model"), ("shards", "set of shards"), ("part_shards", "--part-shards"),
                          ("dtype", "--dtype")):
            if old.get(key) != plan[key]:
                raise ValueError(f"{emb} already holds embeddings with a different {what} "
                                 f"({str(old.get(key))[:80]}); use a new --out folder")
        return store.done_parts(emb, plan["parts"])
    if emb.exists() and any(emb.iterdir()):
        raise ValueError(f"--out {emb} is not empty and holds no mmcl embeddings; use a new folder")
    store.write_json(emb / store.EMBED_FILE, plan)
    return []


def embed(model_spec: str, data: List[str], out: str, opts: EmbedOptions) -> dict:
    """Embed the shards of `data` into `out` (resuming finished parts); returns the summary in embed.json."""
    if opts.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {opts.dtype!r}")
    if opts.part_shards < 1 or opts.batch_size < 1:
        raise ValueError("--part-shards and --batch-size must be at least 1")
    urls = resolve_shards(data, opts.split)
    emb, plan = Path(out), _plan(resolve_model_spec(model_spec), urls, opts)
    done = start_or_resume(emb, plan)
    todo = [p for p in range(plan["parts"]) if p not in done]
    if todo:
        _embed_parts(plan, emb, todo, opts, total=_split_total(data, opts.split))
    return finish(emb, plan, resumed=len(done))


def _split_total(data: List[str], split: str) -> Optional[int]:
    sizes = [shards.split_size(spec, split) if os.path.isdir(os.path.join(spec, split)) else None for spec in data]
    return sum(sizes) if sizes and None not in sizes else None


def _embed_parts(plan: dict, emb: Path, todo: List[int], opts: EmbedOptions, total: Optional[int]) -> None:
    from mmcl.eval.cli import default_device, load_model

    device = torch.device(opts.device or default_device())
    model, preprocess, tokenizer = load_model(plan["model"], str(device))
    size = plan["part_shards"]
    bar = progress_bar(total, "embed", "img", enabled=opts.progress)
    policy = ThreadPolicy.for_pass(device, opts.workers)  # the evaluation's thread policy (eval/threads.py)
    with bar, eval_mode(model), policy.applied():
        for part in todo:
            urls = plan["shards"][part * size:(part + 1) * size]
            bar.set_postfix({"part": f"{part + 1}/{plan['parts']}"})
            embed_part(model, preprocess, tokenizer, urls, opts, device, bar, policy).write(emb, part, opts.dtype, urls)


def finish(emb: Path, plan: dict, resumed: int = 0) -> dict:
    """Totals over all parts, written into embed.json."""
    marks = [store.read_json(emb / store.PART_MARKS / f"{store.part_name(p)}.json", "part marker")
             for p in range(plan["parts"])]
    images, seconds = sum(m["images"] for m in marks), sum(m["seconds"] for m in marks)
    if images == 0:
        raise ValueError(f"no usable samples in {len(plan['shards'])} shards (skipped: "
                         f"{dict(sum((Counter(m['skipped']) for m in marks), Counter()))})")
    skipped = sum((Counter(m["skipped"]) for m in marks), Counter())
    summary = dict(plan, complete=True, images=images, captions=sum(m["captions"] for m in marks),
                   dim=max(m["dim"] for m in marks), skipped=dict(skipped), seconds=round(seconds, 3),
                   images_per_s=round(images / seconds, 1) if seconds > 0 else None, resumed_parts=resumed)
    store.write_json(emb / store.EMBED_FILE, summary)
    return summary


def options_from_args(args) -> EmbedOptions:
    return EmbedOptions(**{name: getattr(args, name) for name in asdict(EmbedOptions()) if hasattr(args, name)})


def run_embed(args) -> int:
    """`mmcl embed` handler."""
    started = time.perf_counter()
    summary = embed(args.model, args.data, args.out, options_from_args(args))
    skipped = sum(summary["skipped"].values())
    print(f"embedded {summary['images']} images and {summary['captions']} captions ({summary['dim']}-d, "
          f"{summary['dtype']}) into {args.out} in {summary['parts']} parts"
          + (f", {summary['resumed_parts']} resumed" if summary["resumed_parts"] else "")
          + f"; {summary['images_per_s']} images/s; {time.perf_counter() - started:.1f} s")
    if skipped:
        print(f"skipped {skipped} bad samples {summary['skipped']}")
    return 0
