"""The locked-feature cache: outputs of locked towers computed once (`model.cache_locked: true`).

A locked tower (or the locked part of one, mmcl.models.frozen) computes the same output for the same input
for the whole run, as long as its input is deterministic: the caption string for text, the eval transform
(`data.augment: false`) for images. The trainer computes those outputs once, before the first step, stores
them under `RUN/locked_features/{image,text}/` as raw float32 rows read through `numpy.memmap`, and later
steps read rows instead of running the locked layers. Rows are keyed by the sample's key (images) and by
the caption line itself (text: the line is the tower's only input, so a caption shared by several images is
computed once). The loss and the gradients are those of the uncached run (tested).

A cache is valid for one fingerprint: the format, the tower's cut, its frozen layers (as PyTorch prints
them: kinds, activations, epsilons) and every frozen weight, the input
transform (image size, mean, std, interpolation, resize mode, max_pixels; tokenizer and context length) and
each shard's path, size and modification time. Anything else found there is rebuilt; a resumed run reuses it.
With several processes each one computes the rows of its share of the shards (`part-RANK`), and all read all
parts.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import IterableDataset

from mmcl.data_pipelines import decode, tarstream
from mmcl.data_pipelines.decode import BadSample
from mmcl.data_pipelines.stream import make_loader, worker_slot
from mmcl.data_pipelines.transforms import clip_transform
from mmcl.config import ConfigError, Recipe
from mmcl.models import factory
from mmcl.models.frozen import TowerSplit, split_image_tower, split_text_tower

FORMAT = 1
FOLDER = "locked_features"
BATCH = 128  # rows per forward pass of a locked part


def towers_to_cache(recipe: Recipe, model: torch.nn.Module) -> Tuple[Dict[str, TowerSplit], List[str]]:
    """Which towers the cache serves (a locked part that exists, fed a deterministic input), and why the
    other locked ones are not served."""
    m, splits, notes = recipe.model, {}, []
    if m.lock_image and recipe.data.augment:
        notes.append("image tower not cached: its input is augmented (data.augment=true)")
    elif m.lock_image:
        splits["image"] = split_image_tower(model)
    if m.lock_text:
        splits["text"] = split_text_tower(model)
    notes += [f"{name} tower not cached: it has no locked part that can be cut off (its first layer trains, or "
              f"it is a text tower with unlocked layers)" for name, s in splits.items() if s is None]
    return {name: s for name, s in splits.items() if s is not None}, notes


class NoTokens:
    """The tokenizer slot of a stream whose text features come from the cache: captions travel, tokens are
    not needed (a [B, 0] tensor keeps the batch's shape)."""

    def __call__(self, captions: List[str]) -> torch.Tensor:
        return torch.zeros(len(captions), 0, dtype=torch.long)


# ---- reading -----------------------------------------------------------------------------------------

class Store:
    """One tower's cached rows: every process's part, memory-mapped; `rows(keys)` gathers a batch."""

    def __init__(self, folder: Path, unique: bool):
        meta = json.loads((folder / "meta.json").read_text())
        self.shape, self.arrays, self.index = tuple(meta["shape"]), [], {}
        every = []
        for part in range(meta["parts"]):
            keys = json.loads((folder / f"part-{part}.keys.json").read_text())
            array = np.memmap(folder / f"part-{part}.f32", dtype=np.float32, mode="r",
                              shape=(len(keys),) + self.shape) if keys else np.zeros((0,) + self.shape, np.float32)
            self.index.update({key: (part, row) for row, key in enumerate(keys)})
            self.arrays.append(array)
            every += keys
        if unique and len(self.index) < len(every):  # the stream names samples by key alone
            seen = set()
            twice = next(k for k in every if k in seen or seen.add(k))
            raise ConfigError(f"model.cache_locked: sample key {twice!r} appears more than once in the training "
                              f"shards; the cache finds images by key, so keys must be unique")

    def __len__(self) -> int:
        return len(self.index)

    def rows(self, keys: Sequence[str], what: str) -> torch.Tensor:
        try:
            where = [self.index[key] for key in keys]
        except KeyError as err:
            raise RuntimeError(f"locked-feature cache: no {what} row for {err.args[0]!r}; delete "
                               f"RUN/{FOLDER} to rebuild it") from None
        return torch.from_numpy(np.stack([self.arrays[part][row] for part, row in where]))


@dataclass
class LockedCache:
    splits: Dict[str, TowerSplit]
    stores: Dict[str, Store]

    def fill(self, batch: dict) -> dict:
        """Add the cached outputs of this batch's samples (`image_locked`, `text_locked`)."""
        if "image" in self.stores:
            batch["image_locked"] = self.stores["image"].rows(batch["key"], "image")
        if "text" in self.stores:
            batch["text_locked"] = self.stores["text"].rows(batch["caption"], "caption")
        return batch


# ---- building ----------------------------------------------------------------------------------------

def fingerprint(name: str, split: TowerSplit, inputs: dict, urls: Sequence[str]) -> str:
    """What the cached rows depend on: the frozen layers and weights, the input transform, the shards (not the
    trainable part: another head or learning rate reuses the same cache)."""
    digest = hashlib.sha256()
    header = {"format": FORMAT, "tower": name, "cut": split.where, "layers": split.frozen_repr, "inputs": inputs}
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    for key, tensor in sorted(split.frozen_state().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    for url in urls:
        stat = os.stat(url)
        digest.update(f"{os.path.abspath(url)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


class RawSamples(IterableDataset):
    """Raw samples of some local shards, split across DataLoader workers, turned into items by `make`
    (which raises BadSample for samples the training stream would skip)."""

    def __init__(self, urls: Sequence[str], make: Callable[[dict], object]):
        super().__init__()
        self.urls, self.make = list(urls), make

    def __iter__(self) -> Iterator:
        worker, workers = worker_slot()
        for url in self.urls[worker::workers]:
            for raw in tarstream.shard_samples(url, lambda err: None):
                try:
                    yield self.make(raw)
                except BadSample:
                    continue


class PartWriter:
    """Rows appended to `part-RANK.f32`, keys to `part-RANK.keys.json` when done."""

    def __init__(self, folder: Path, rank: int, device: torch.device):
        self.folder, self.rank, self.device, self.keys = folder, rank, device, []
        self.file = open(folder / f"part-{rank}.f32", "wb")

    def add(self, keys: List[str], rows: torch.Tensor) -> None:
        self.file.write(rows.detach().float().cpu().contiguous().numpy().tobytes())
        self.keys += keys

    def close(self) -> None:
        self.file.close()
        (self.folder / f"part-{self.rank}.keys.json").write_text(json.dumps(self.keys))


def image_part(split: TowerSplit, urls: Sequence[str], transform, max_pixels: int, workers: int,
               writer: PartWriter) -> Tuple[int, ...]:
    """The locked image part's output for every usable image of these shards (the eval transform)."""
    items = RawSamples(urls, lambda raw: (raw["__key__"], transform(decode.sample_image(raw, max_pixels))))
    shape, keys, pixels = None, [], []
    for key, image in make_loader(items, min(workers, len(urls))):
        keys.append(key)
        pixels.append(image)
        if len(keys) == BATCH:
            shape = write_rows(split, keys, torch.stack(pixels), writer)
            keys, pixels = [], []
    if keys:
        shape = write_rows(split, keys, torch.stack(pixels), writer)
    return shape


def text_part(split: TowerSplit, urls: Sequence[str], tokenizer, writer: PartWriter) -> Tuple[int, ...]:
    """The locked text part's output for every caption line of these shards, shortest captions first so
    that a batch's trailing padding can be cut (towers that mask padding only)."""
    unique = set()
    for lines in RawSamples(urls, decode.sample_captions):
        unique.update(lines)
    captions = sorted(unique)
    if not captions:
        return None
    tokens = tokenizer(captions)
    pad = split.pad_id
    lengths = (tokens != pad).sum(1) if pad is not None else torch.full((len(captions),), tokens.shape[1])
    order = torch.argsort(lengths, stable=True)
    shape = None
    for start in range(0, len(order), BATCH):
        rows = order[start:start + BATCH]
        shape = write_rows(split, [captions[i] for i in rows.tolist()], tokens[rows, :int(lengths[rows].max())], writer)
    return shape


@torch.no_grad()
def write_rows(split: TowerSplit, keys: List[str], inputs: torch.Tensor, writer: PartWriter) -> Tuple[int, ...]:
    inputs = inputs.to(writer.device)
    if inputs.dim() == 4:  # images: oneDNN's convolutions run several times faster on channels-last input
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    rows = split.frozen(inputs)
    writer.add(keys, rows)
    return tuple(rows.shape[1:])


def build_part(name: str, split: TowerSplit, recipe: Recipe, urls: Sequence[str], pre_cfg: dict, tokenizer,
               folder: Path, rank: int, device: torch.device) -> Optional[Tuple[int, ...]]:
    writer = PartWriter(folder, rank, device)
    try:
        if name == "image":
            transform = clip_transform(pre_cfg["size"], False, pre_cfg["mean"], pre_cfg["std"])
            shape = image_part(split, urls, transform, recipe.data.max_pixels, recipe.data.workers, writer)
        else:
            shape = text_part(split, urls, tokenizer, writer)
    finally:
        writer.close()
    return shape


def tower_inputs(name: str, recipe: Recipe, model_cfg: dict, pre_cfg: dict, tokenizer) -> dict:
    """What a tower's input depends on besides the data (part of the fingerprint)."""
    if name == "image":
        return {"preprocess": pre_cfg, "max_pixels": recipe.data.max_pixels}
    text_cfg = model_cfg.get("text_cfg", {})
    return {"tokenizer": type(tokenizer).__name__, "context_length": getattr(tokenizer, "context_length", None),
            "source": text_cfg.get("hf_tokenizer_name"), "options": text_cfg.get("tokenizer_kwargs")}


def planned(recipe: Recipe, model: torch.nn.Module, verbose: bool = False) -> Dict[str, TowerSplit]:
    """The towers the cache will serve (none without `model.cache_locked`); nothing is read or written."""
    if not recipe.model.cache_locked:
        return {}
    splits, notes = towers_to_cache(recipe, model)
    if not splits:
        raise ConfigError(f"model.cache_locked: no locked tower to cache ({'; '.join(notes)})")
    if verbose and notes:
        print(f"locked-feature cache: {'; '.join(notes)}", flush=True)
    return splits


def prepare(recipe: Recipe, model: torch.nn.Module, model_cfg: dict, tokenizer, accelerator, run_dir: Path,
            urls: Sequence[str]) -> Optional[LockedCache]:
    """Open (or build, where missing or stale) the cache of every tower `towers_to_cache` picks."""
    splits = planned(recipe, model, accelerator.is_main_process)
    if not splits:
        return None
    pre_cfg = factory.preprocess_cfg(model)
    was_training = model.training
    model.eval()
    stores = {}
    for name, split in splits.items():
        folder = run_dir / FOLDER / name
        key = fingerprint(name, split, tower_inputs(name, recipe, model_cfg, pre_cfg, tokenizer), urls)
        reused = is_valid(folder, key)
        if not reused:
            build(name, split, recipe, urls, pre_cfg, tokenizer, folder, key, accelerator)
        stores[name] = Store(folder, unique=name == "image")
        if accelerator.is_main_process:
            how = "reused" if reused else f"built in {json.loads((folder / 'meta.json').read_text())['seconds']} s"
            print(f"locked-feature cache: {name}: {len(stores[name])} rows of {split.where} in {folder} ({how})",
                  flush=True)
    model.train(was_training)
    return LockedCache(splits, stores)


def is_valid(folder: Path, key: str) -> bool:
    try:
        return json.loads((folder / "meta.json").read_text())["fingerprint"] == key
    except (OSError, ValueError, KeyError):
        return False


def build(name: str, split: TowerSplit, recipe: Recipe, urls: Sequence[str], pre_cfg: dict, tokenizer,
          folder: Path, key: str, accelerator) -> None:
    """Every process computes its share of the shards; the main process writes meta.json last."""
    rank, world = accelerator.process_index, accelerator.num_processes
    if accelerator.is_main_process:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    accelerator.wait_for_everyone()
    start = time.time()
    shape = build_part(name, split, recipe, urls[rank::world], pre_cfg, tokenizer, folder, rank, accelerator.device)
    shapes = [shape] * world
    if world > 1:
        torch.distributed.all_gather_object(shapes, shape)
    accelerator.wait_for_everyone()
    known = [s for s in shapes if s is not None]
    if not known:
        raise RuntimeError(f"locked-feature cache: no usable {name} input in {len(urls)} shards")
    if accelerator.is_main_process:
        meta = {"fingerprint": key, "shape": list(known[0]), "parts": world, "cut": split.where,
                "seconds": round(time.time() - start, 1)}
        (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    accelerator.wait_for_everyone()
