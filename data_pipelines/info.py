"""`mmcl data info ROOT`: what a dataset folder holds, read from its files and tar headers.

Per split: shard count, sample count (sizes.json, and/or counted from the tars), the keys seen (`jpg`,
`txt`, `cls`, ...), the captions of the first samples; for the root: task, class names, templates.
Problems (missing or unreadable shards, counts that disagree) are listed rather than raised, because this
is the command one runs to find out what is wrong with a folder.
"""
from __future__ import annotations

import os
import re
import tarfile
from typing import Any, Dict, List, Optional

from mmcl.data_pipelines.shards import (CLASSNAMES_FILE, TEMPLATES_FILE, dataset_task, folder_urls, list_splits,
                                   read_classnames, read_templates, split_size)

# webdataset's rule: the key is the member path up to the first dot of its file name.
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
MAX_CAPTIONS = 3


def scan_shard(path: str, stats: Dict[str, Any], max_captions: int = MAX_CAPTIONS) -> None:
    """Add one shard's samples, keys and first captions to `stats` (reads headers; caption bodies only)."""
    last_key = None
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            match = _KEY_EXT.match(member.name) if member.isfile() else None
            if match is None:
                continue
            key, ext = match.groups()
            if key != last_key:  # webdataset groups consecutive members with one key into a sample
                stats["counted"] += 1
                last_key = key
            stats["keys"].add(ext)
            if ext == "txt" and len(stats["captions"]) < max_captions:
                text = tar.extractfile(member).read().decode("utf-8", errors="replace")
                lines = [line.strip() for line in text.splitlines() if line.strip()]
                stats["captions"].append({"key": os.path.basename(key), "captions": lines})


def _count_problems(split: Dict[str, Any], path: str) -> None:
    if split["samples"] is not None and split["counted"] is not None and split["samples"] != split["counted"]:
        split["errors"].append(f"{path}: sizes.json says {split['samples']} samples, the shards hold "
                               f"{split['counted']}")


def split_info(root: str, name: str, count: bool = True, max_captions: int = MAX_CAPTIONS) -> Dict[str, Any]:
    """One split's facts. `count=False` reads only the first shard when sizes.json gives the count."""
    folder = os.path.join(root, name)
    urls = folder_urls(folder)
    samples = split_size(root, name)
    to_scan = urls if count or samples is None else urls[:1]
    stats: Dict[str, Any] = {"counted": 0, "keys": set(), "captions": []}
    errors: List[str] = []
    for url in to_scan:
        if not os.path.isfile(url):
            errors.append(f"missing shard: {url}")
            continue
        try:
            scan_shard(url, stats, max_captions)
        except (tarfile.TarError, OSError) as err:
            errors.append(f"unreadable shard {url}: {err}")
    info = {"shards": len(urls), "samples": samples,
            "counted": stats["counted"] if len(to_scan) == len(urls) else None,
            "keys": sorted(stats["keys"]), "captions": stats["captions"], "errors": errors}
    _count_problems(info, folder)
    return info


def _optional(read, root: str) -> Optional[int]:
    try:
        return len(read(root))
    except FileNotFoundError:
        return None


def dataset_info(root: str, count: bool = True, max_captions: int = MAX_CAPTIONS) -> Dict[str, Any]:
    """Facts about a dataset folder: task, class names and templates counts, and per-split facts."""
    splits = list_splits(root)
    if not splits:
        raise FileNotFoundError(f"no splits in {root} (expected folders of .tar shards, e.g. {root}/train)")
    return {"root": root, "task": dataset_task(root),
            "classnames": _optional(read_classnames, root), "templates": _optional(read_templates, root),
            "splits": {name: split_info(root, name, count, max_captions) for name in splits}}


def _shorten(text: str, width: int = 70) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _split_lines(name: str, split: Dict[str, Any]) -> List[str]:
    samples = [f"{split['samples']} in sizes.json" if split["samples"] is not None else "no sizes.json"]
    if split["counted"] is not None:
        samples.append(f"{split['counted']} counted")
    shards = f"{split['shards']} shard" + ("" if split["shards"] == 1 else "s")
    lines = [f"{name}: {shards}, samples: {', '.join(samples)}",
             f"  keys: {' '.join(split['keys']) or 'none'}"]
    for entry in split["captions"]:
        more = len(entry["captions"]) - 1
        first = _shorten(entry["captions"][0]) if entry["captions"] else "(empty)"
        lines.append(f"  {entry['key']}: {first!r}" + (f" (+{more} more)" if more > 0 else ""))
    lines += [f"  problem: {error}" for error in split["errors"]]
    return lines


def format_info(info: Dict[str, Any]) -> str:
    """The report printed by `mmcl data info`."""
    names = f"{info['classnames']} class names" if info["classnames"] is not None else f"no {CLASSNAMES_FILE}"
    templates = f"{info['templates']} templates" if info["templates"] is not None else f"no {TEMPLATES_FILE}"
    lines = [f"{info['root']}: task {info['task']}, {names}, {templates}"]
    for name, split in info["splits"].items():
        lines += _split_lines(name, split)
    return "\n".join(lines)
