"""`mmcl embed | index build | search | serve`: from a trained model and shards to a searchable index and a page.

mmcl/cli.py calls `add_search_subcommands(subparsers)`. Bad input raises ValueError / FileNotFoundError with
a one-line message, which `mmcl` prints as `mmcl: error: ...` (exit code 2).
"""
from __future__ import annotations

import argparse

from mmcl.search.index import DEFAULT_EXACT_BELOW, DEFAULT_MAX_MEMORY, DEFAULT_TARGET_RECALL


def _handler(module: str, name: str):
    """The command's handler, imported when the command runs (torch, faiss and FastAPI load only then)."""
    def run(args) -> int:
        import importlib

        return getattr(importlib.import_module(f"mmcl.search.{module}"), name)(args)
    return run


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _embed_parser(sub) -> None:
    p = sub.add_parser("embed", help="embed the images and captions of shards into EMB/ (resumable)",
                       description="Image embeddings and one embedding per caption line, in parts "
                                   "(img_emb/, text_emb/, Parquet metadata); rerun to resume.")
    p.add_argument("--model", required=True, help="run dir, local-dir:DIR, NAME or NAME:WEIGHTS_FILE")
    p.add_argument("--data", required=True, nargs="+", metavar="ROOT|URLS",
                   help="dataset folder(s) (read at --split), split folders, brace patterns or tar files")
    p.add_argument("--split", default="test")
    p.add_argument("--out", required=True, help="embedding folder EMB/")
    p.add_argument("--batch-size", type=_positive, default=128)
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes (at most one per shard of a part)")
    p.add_argument("--part-shards", type=_positive, default=4, help="shards per part (the unit of resuming)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=_handler("embed", "run_embed"))


def _index_parser(sub) -> None:
    p = sub.add_parser("index", help="build faiss indexes over an embedding folder")
    commands = p.add_subparsers(dest="index_command", required=True)
    b = commands.add_parser("build", help="exact or ANN indexes for a memory budget, tuned for a target recall",
                            description="Exact inner product below --exact-below vectors; above, the best ANN "
                                        "index that fits --max-memory (HNSW, IVF-Flat, IVF-SQ8, OPQ+IVF-PQ), tuned "
                                        "for --target-recall@10; recall, latency and size are stored and printed.")
    b.add_argument("embeddings", help="embedding folder EMB/ written by `mmcl embed`")
    b.add_argument("--out", required=True, help="index folder INDEX/")
    b.add_argument("--max-memory", default=DEFAULT_MAX_MEMORY, help=f"index size budget (default {DEFAULT_MAX_MEMORY})")
    b.add_argument("--exact-below", type=int, default=DEFAULT_EXACT_BELOW,
                   help=f"exact search below this many vectors (default {DEFAULT_EXACT_BELOW}; 0: always ANN)")
    b.add_argument("--target-recall", type=float, default=DEFAULT_TARGET_RECALL, help="recall@10 to tune for")
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=_handler("build", "run_index_build"))


def _search_parser(sub) -> None:
    p = sub.add_parser("search", help="query an index by text or by image",
                       description="text -> image, image -> image (--to image), image -> text (--to text).")
    p.add_argument("index", help="index folder INDEX/")
    p.add_argument("--text", default=None, help="a sentence to search for")
    p.add_argument("--image", default=None, help="an image file to search with")
    p.add_argument("--to", choices=("image", "text"), default="image", help="return images (default) or captions")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--model", default=None, help="default: the model that made the embeddings")
    p.add_argument("--device", default=None)
    p.set_defaults(func=_handler("query", "run_search"))


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="a search page and JSON API over an index (pip install 'mmcl[serve]')")
    p.add_argument("index", help="index folder INDEX/")
    p.add_argument("--host", default="127.0.0.1", help="default: loopback only")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", default=None, help="default: the model that made the embeddings")
    p.add_argument("--device", default=None)
    p.set_defaults(func=_handler("serve", "run_serve"))


def add_search_subcommands(sub) -> None:
    for add in (_embed_parser, _index_parser, _search_parser, _serve_parser):
        add(sub)
