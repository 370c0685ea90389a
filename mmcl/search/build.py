"""`mmcl index build EMB/ --out INDEX/`: an image index and a caption index over an embedding folder.

Each index is planned, built, tuned and measured by mmcl.search.index. The image index is tuned and measured
with caption queries (text -> image: held out by nature, they are not in it) and image queries (image ->
image); the caption index with image queries (image -> text) and caption queries. Tables of keys, captions,
shards and byte offsets are copied next to the indexes, so INDEX/ is all that search and serve need
(plus the shards themselves, read in place).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict

import numpy as np

from mmcl.search import index as ix
from mmcl.search import store


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not (out / store.INDEX_FILE).exists():
        raise ValueError(f"--out {out} is not empty and holds no mmcl index; use a new folder")


def _queries(data: dict, target: str) -> Dict[str, np.ndarray]:
    """Query sets for the `target` index: the other modality first (the cross-modal queries), then its own."""
    named = {"captions": data["text"], "images": data["image"]}
    order = ("captions", "images") if target == "image" else ("images", "captions")
    return {name: named[name] for name in order if len(named[name])}


def build_folder(emb: str, out: str, max_memory: int, exact_below: int = ix.DEFAULT_EXACT_BELOW,
                 target: float = ix.DEFAULT_TARGET_RECALL, seed: int = 0, echo=print) -> dict:
    """Build INDEX/ from EMB/; returns the content of index.json."""
    emb_dir, out_dir = Path(emb), Path(out)
    if not 0 < target <= 1 or exact_below < 0:
        raise ValueError(f"--target-recall must be in (0, 1] and --exact-below >= 0, got {target}, {exact_below}")
    _check_out(out_dir)
    data = store.load_embeddings(emb_dir)
    ix.faiss_module()  # fail on a missing faiss before any work
    out_dir.mkdir(parents=True, exist_ok=True)
    indexes = {}
    for target_name, vectors in (("image", data["image"]), ("text", data["text"])):
        if not len(vectors):
            continue
        index, stats = ix.build_index(vectors, _queries(data, target_name), max_memory, exact_below, target, seed)
        ix.write_index(index, str(out_dir / f"{target_name}.faiss"))
        indexes[target_name] = stats
        echo(ix.describe(target_name, stats))
    images, texts = data["images"], data["texts"]
    store.write_table(out_dir / store.IMAGE_TABLE, {"image_id": list(range(len(images["key"]))),
                                                     **{k: images[k] for k in ("key", "caption", "shard", "offset")}})
    store.write_table(out_dir / store.TEXT_TABLE, {"text_id": list(range(len(texts["caption"]))),
                                                    "image_id": texts["image_id"], "caption": texts["caption"]})
    if "text" not in indexes and (out_dir / "text.faiss").exists():
        (out_dir / "text.faiss").unlink()  # left from an earlier build of this folder
    info = {"format": store.FORMAT, "model": data["info"]["model"], "dim": int(data["image"].shape[1]),
            "embeddings": os.path.abspath(emb), "images": len(data["image"]), "captions": len(data["text"]),
            "indexes": indexes}
    store.write_json(out_dir / store.INDEX_FILE, info)
    return info


def run_index_build(args) -> int:
    """`mmcl index build` handler."""
    build_folder(args.embeddings, args.out, ix.parse_memory(args.max_memory), args.exact_below, args.target_recall,
                 args.seed)
    print(f"wrote {args.out}")
    return 0
