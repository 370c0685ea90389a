"""Queries against an index folder: text -> image, image -> image, image -> text (and text -> text).

`Searcher(INDEX)` loads index.json, the faiss indexes (with their tuned search parameters), the tables and the
model that made the embeddings (or another one of the same width), once. Every query is embedded with the
model's own preprocess and tokenizer, L2-normalised, and searched by inner product (= cosine).
"""
from __future__ import annotations

import mimetypes
import os
import re
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from mmcl.data_pipelines import decode
from mmcl.data_pipelines.tarstream import sample_at
from mmcl.models.text import text_encoder
from mmcl.search import index as ix
from mmcl.search import store

TARGETS = ("image", "text")
MAX_QUERY_CHARS = 1000


class Searcher:
    def __init__(self, index_dir: str, model: Optional[str] = None, device: str = "cpu"):
        self.dir = Path(index_dir)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"no such index folder: {index_dir}")
        self.info = store.read_json(self.dir / store.INDEX_FILE, "mmcl index (build one with `mmcl index build`)")
        self.indexes = {name: ix.read_index(self.dir / f"{name}.faiss", stats)
                        for name, stats in self.info["indexes"].items()}
        self.images = store.read_table(self.dir / store.IMAGE_TABLE)
        self.texts = store.read_table(self.dir / store.TEXT_TABLE)
        self.device = device
        self.model_spec = model or self.info["model"]
        self.model, self.preprocess, self.tokenizer = self._load_model(self.model_spec)
        self.encode_text = text_encoder(self.model)  # decided once: queries cut after their end-of-text token

    def _load_model(self, spec: str):
        from mmcl.eval.cli import load_model

        model, preprocess, tokenizer = load_model(spec, self.device)
        width = self._width(model, preprocess, tokenizer)
        if width != self.info["dim"]:
            raise ValueError(f"model {spec} embeds in {width} dimensions but the index {self.dir} holds "
                             f"{self.info['dim']}-d vectors: use the model that made it ({self.info['model']})")
        return model, preprocess, tokenizer

    @staticmethod
    def _width(model, preprocess, tokenizer) -> int:
        """The model's embedding width, from one tiny forward pass."""
        device = next(model.parameters()).device
        with torch.inference_mode():
            if tokenizer is not None:
                return int(model.encode_text(tokenizer(["a"]).to(device)).shape[-1])
            from PIL import Image

            return int(model.encode_image(preprocess(Image.new("RGB", (32, 32))).unsqueeze(0).to(device)).shape[-1])

    def embed_text(self, text: str) -> np.ndarray:
        text = (text or "").strip()
        if not text:
            raise ValueError("empty query: give some words to search for")
        if len(text) > MAX_QUERY_CHARS:
            raise ValueError(f"query too long: {len(text)} characters (at most {MAX_QUERY_CHARS})")
        if self.tokenizer is None:
            raise ValueError(f"model {self.model_spec} has no text tower: search by image")
        with torch.inference_mode():
            tokens = self.tokenizer([text]).to(self.device)
            return self._normalised(self.encode_text(tokens, normalize=True))

    def embed_image(self, data: bytes, name: str = "image") -> np.ndarray:
        """The embedding of encoded image bytes; ValueError naming `name` when they do not decode."""
        try:
            image = decode.decode_image(data)
        except decode.BadSample as bad:
            detail = re.sub(r"\s*<[^>]*>", "", str(bad))  # drop PIL's "<_io.BytesIO object at 0x...>"
            raise ValueError(f"{name} is not an image that decodes ({detail})") from None
        with torch.inference_mode():
            pixels = self.preprocess(image).unsqueeze(0).to(self.device)
            return self._normalised(self.model.encode_image(pixels, normalize=True))

    @staticmethod
    def _normalised(features: torch.Tensor) -> np.ndarray:
        vector = features.float().cpu().numpy()
        return np.ascontiguousarray(vector / np.linalg.norm(vector, axis=1, keepdims=True), dtype=np.float32)

    def search(self, vector: np.ndarray, k: int = 10, target: str = "image") -> List[Dict]:
        """The k nearest images (target "image") or captions ("text"), best first, with their scores."""
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}: use one of {', '.join(TARGETS)}")
        if target not in self.indexes:
            raise ValueError(f"the index {self.dir} has no {target} index (the shards had no captions)")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        index = self.indexes[target]
        scores, ids = index.search(vector, min(k, index.ntotal))
        return [self._result(target, rank, int(i), float(s))
                for rank, (i, s) in enumerate(zip(ids[0], scores[0]), 1) if i >= 0]

    def _result(self, target: str, rank: int, row: int, score: float) -> Dict:
        if target == "text":
            image_id = self.texts["image_id"][row]
            return {"rank": rank, "score": round(score, 5), "text_id": row, "image_id": image_id,
                    "key": self.images["key"][image_id], "caption": self.texts["caption"][row]}
        return {"rank": rank, "score": round(score, 5), "image_id": row, "key": self.images["key"][row],
                "caption": self.images["caption"][row]}

    def text_search(self, text: str, k: int = 10, target: str = "image") -> List[Dict]:
        return self.search(self.embed_text(text), k, target)

    def image_search(self, data: bytes, k: int = 10, target: str = "image", name: str = "image") -> List[Dict]:
        return self.search(self.embed_image(data, name), k, target)

    def image_bytes(self, image_id: int):
        """(bytes, MIME type) of an indexed image, read from its shard at its byte offset."""
        if not 0 <= image_id < len(self.images["key"]):
            raise KeyError(f"no image {image_id} (the index holds {len(self.images['key'])})")
        sample = sample_at(self.images["shard"][image_id], int(self.images["offset"][image_id]))
        ext = decode.find_image_key(sample)
        if ext is None:
            raise ValueError(f"sample {sample['__key__']} in {self.images['shard'][image_id]} has no image")
        return sample[ext], mimetypes.types_map.get("." + ext, "application/octet-stream")


def read_image_file(path: str) -> bytes:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such image file: {path}")
    with open(path, "rb") as f:
        return f.read()


def format_results(results: List[Dict]) -> str:
    """A plain table: rank, score, key, caption."""
    lines = [f"{'rank':>4}  {'score':>7}  {'key':<20}  caption"]
    lines += [f"{r['rank']:>4}  {r['score']:>7.4f}  {str(r['key']):<20}  {r['caption']}" for r in results]
    return "\n".join(lines)


def run_search(args) -> int:
    """`mmcl search` handler."""
    import json

    if (args.text is None) == (args.image is None):
        raise ValueError("give exactly one of --text or --image")
    if args.k < 1 or args.k > 1000:
        raise ValueError(f"--k must be between 1 and 1000, got {args.k}")
    data = read_image_file(args.image) if args.image is not None else None
    if args.text is not None and not args.text.strip():
        raise ValueError("empty query: --text needs some words")
    searcher = Searcher(args.index, args.model, args.device or "cpu")
    if data is not None:
        results = searcher.image_search(data, args.k, args.to, name=args.image)
    else:
        results = searcher.text_search(args.text, args.k, args.to)
    print(json.dumps(results, indent=1) if args.json else format_results(results))
    return 0
