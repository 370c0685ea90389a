"""Where the shards of a data set are: URL specs, CLIP_benchmark dataset folders, local checks.

A dataset folder follows CLIP_benchmark's webdataset layout::

    ROOT/SPLIT/{0..N-1}.tar   ROOT/SPLIT/nshards.txt   ROOT/SPLIT/sizes.json ({"samples": N})
    ROOT/classnames.txt       ROOT/zeroshot_classification_templates.txt   ROOT/dataset_type.txt

Streams and evaluation resolve their sources here, so that every part reads a folder the same way.
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import List, Optional, Sequence, Union

import braceexpand

NSHARDS_FILE = "nshards.txt"
SIZES_FILE = "sizes.json"
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
DATASET_TYPE_FILE = "dataset_type.txt"

# A scheme followed by "://" (http, https, s3, gs, hf, ...) or webdataset's "pipe:" command prefix.
_REMOTE = re.compile(r"^(pipe:|[A-Za-z][A-Za-z0-9+.-]*://)")


def _shard_order(path: str):
    """Sort key: numeric stems in numeric order ("2.tar" before "10.tar"), other names after, by name."""
    stem = os.path.basename(path)[: -len(".tar")]
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)


def folder_urls(folder: str) -> List[str]:
    """The shards of one split folder: `nshards.txt` when present, else its `*.tar` files in numeric order."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no such split folder: {folder}")
    nshards_path = os.path.join(folder, NSHARDS_FILE)
    if os.path.isfile(nshards_path):
        with open(nshards_path, encoding="utf-8") as f:
            text = f.read().strip()
        try:
            count = int(text)
        except ValueError:
            raise ValueError(f"{nshards_path} should hold a shard count, found {text[:40]!r}") from None
        urls = [os.path.join(folder, f"{i}.tar") for i in range(count)]
    else:
        urls = sorted(glob.glob(os.path.join(folder, "*.tar")), key=_shard_order)
    if not urls:
        raise FileNotFoundError(f"no shards in {folder}")
    return urls


def split_urls(root: str, split: str) -> List[str]:
    """The shard paths of `root/split`; FileNotFoundError naming the path when there are none."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no such dataset folder: {root}")
    return folder_urls(os.path.join(root, split))


def _is_split_folder(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, NSHARDS_FILE)) or bool(glob.glob(os.path.join(folder, "*.tar")))


def _expand_one(spec: str, split: Optional[str]) -> List[str]:
    if os.path.isdir(spec):
        # A dataset root read at `split`, or a split folder itself.
        if split is not None and os.path.isdir(os.path.join(spec, split)):
            return split_urls(spec, split)
        if _is_split_folder(spec):
            return folder_urls(spec)
        if split is None:
            raise FileNotFoundError(f"no shards in {spec} (for a dataset folder, name a split)")
        return split_urls(spec, split)
    return list(braceexpand.braceexpand(spec))


def expand_urls(spec: Union[str, Sequence[str]], split: Optional[str] = None) -> List[str]:
    """Shard URLs from a spec.

    `spec` is a brace pattern (`/d/{000..009}.tar`), a "::"-separated list of patterns, a list of them,
    a split folder, or a dataset root (read at `split`). Patterns are not checked against the disk here:
    use `check_local` for that.
    """
    if isinstance(spec, (list, tuple)):
        parts = list(spec)
    elif isinstance(spec, str):
        parts = spec.split("::")
    else:
        raise ValueError(f"shard spec should be a string or a list of strings, got {type(spec).__name__}")
    urls = []
    for part in parts:
        part = os.fspath(part).strip()
        if part:
            urls.extend(_expand_one(part, split))
    if not urls:
        raise FileNotFoundError(f"no shards in spec {spec!r}")
    return urls


def is_remote(url: str) -> bool:
    """True for URLs that are not plain local files: `pipe:...`, `http(s)://`, `s3://`, `gs://` and the like."""
    return bool(_REMOTE.match(url)) and not url.startswith("file://")


def local_path(url: str) -> str:
    """The file path of a local URL (strips `file://`)."""
    return url[len("file://"):] if url.startswith("file://") else url


def check_local(urls: Sequence[str], allow_remote: bool = False) -> List[str]:
    """Check that every local shard exists; refuse remote or pipe URLs unless `allow_remote`.

    Refusing them by default matters because a `pipe:` URL runs a shell command.
    """
    urls = list(urls)
    for url in urls:
        if is_remote(url):
            if not allow_remote:
                raise ValueError(f"remote or pipe shard URL refused (allow_remote is off): {url}")
        elif not os.path.isfile(local_path(url)):
            raise FileNotFoundError(f"missing shard: {local_path(url)}")
    return urls


def split_size(root: str, split: str) -> Optional[int]:
    """The sample count in `root/split/sizes.json`, or None when the file is missing."""
    path = os.path.join(root, split, SIZES_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        sizes = json.load(f)
    try:
        return int(sizes["samples"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path} should be {{\"samples\": N}}") from None


_SPLIT_ORDER = ("train", "dev", "val", "validation", "test")


def list_splits(root: str) -> List[str]:
    """The split folders of a dataset root (those holding shards): train, dev, val, test first, then by name."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no such dataset folder: {root}")
    names = [n for n in os.listdir(root) if _is_split_folder(os.path.join(root, n))]
    rank = {name: i for i, name in enumerate(_SPLIT_ORDER)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def _read_lines(path: str) -> List[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def read_classnames(root: str) -> List[str]:
    """`root/classnames.txt`, one class name a line; FileNotFoundError when missing."""
    path = os.path.join(root, CLASSNAMES_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no class names: {path}")
    return _read_lines(path)


def read_templates(root: str) -> List[str]:
    """`root/zeroshot_classification_templates.txt` (each line holds `{c}`); FileNotFoundError when missing."""
    path = os.path.join(root, TEMPLATES_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no zero-shot templates: {path}")
    templates = _read_lines(path)
    for template in templates:
        if "{c}" not in template:
            raise ValueError(f"template without {{c}} in {path}: {template!r}")
    return templates


def dataset_task(root: str) -> str:
    """"retrieval" or "classification": `dataset_type.txt` when present, else classification iff classnames.txt."""
    type_path = os.path.join(root, DATASET_TYPE_FILE)
    if os.path.isfile(type_path):
        with open(type_path, encoding="utf-8") as f:
            task = f.read().strip().lower()
        if task not in ("retrieval", "classification"):
            raise ValueError(f"{type_path} should say retrieval or classification, found {task[:40]!r}")
        return task
    return "classification" if os.path.isfile(os.path.join(root, CLASSNAMES_FILE)) else "retrieval"
