"""`mmcl eval zeroshot | retrieval | probe | geometry | all`.

mmcl/cli.py calls `add_eval_subcommands(subparsers)`; each command sets `func(args) -> int`. Bad input
raises ValueError / FileNotFoundError with a one-line message, which `mmcl` prints as `mmcl: error: ...`
(exit code 2). `python -m mmcl.eval.cli ...` runs the same commands stand-alone with the same behaviour.

Models (`--model`): `local-dir:DIR` (an open_clip export, loaded here through open_clip), or anything
`mmcl.models.load_model` accepts: an mmcl run directory, `NAME` or `NAME:WEIGHTS_FILE` (open_clip
architecture with local weights; nothing is downloaded).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch

from mmcl.eval.retrieval import DEFAULT_KS

COMMANDS = {
    "zeroshot": ("zero-shot classification: acc1, acc5, mean per-class recall", "zeroshot_classification"),
    "retrieval": ("image-text retrieval: recall@k both ways, mean / median rank", "zeroshot_retrieval"),
    "probe": ("kNN and linear probe on frozen image features (train split -> test split)", "linear_probe"),
    "geometry": ("alignment, uniformity and modality gap on a retrieval set", "geometry"),
    "all": ("each dataset's own task (from its folder), one JSON per dataset and one table", None),
}


def load_model(spec: str, device: str) -> Tuple[torch.nn.Module, Callable, Callable]:
    """(model, eval preprocess, tokenizer) from a model spec, on `device`, in eval mode (mmcl.load_model)."""
    from mmcl.models import load_model as load_mmcl_model  # lazily: the model zoo is heavy

    return load_mmcl_model(spec, device)


def split_spec(spec: str) -> Tuple[str, str]:
    """(model, pretrained) for the results' schema: `NAME:WEIGHTS` splits, other specs stay whole."""
    if not spec.startswith("local-dir:") and ":" in spec and not os.path.isdir(spec):
        name, weights = spec.split(":", 1)
        return name, weights
    return spec, ""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_common(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument("--model", required=True, help="run dir, local-dir:DIR, NAME or NAME:WEIGHTS_FILE")
    p.add_argument("--data", required=True, nargs="+", metavar="ROOT",
                   help="dataset folder(s) in CLIP_benchmark's webdataset layout")
    p.add_argument("--split", default="test")
    p.add_argument("--batch-size", type=_positive, default=128)
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes (0: a background thread)")
    p.add_argument("--threads", type=_positive, default=None,
                   help="torch threads of the model on a CPU (default: every core; see the README)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default=None, help="folder for JSON, PNG and results.md")
    p.add_argument("--max-samples", type=_positive, default=None, help="evaluate the first N samples only")
    p.add_argument("--amp", action="store_true",
                   help="autocast the model: bfloat16 on a CPU, float16 on a GPU (faster, not bit-exact)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    if command in ("zeroshot", "all"):
        p.add_argument("--templates", default=None, help="templates file, one a line with {c}")
        p.add_argument("--classnames", default=None, help="class names file, one a line")
    if command in ("retrieval", "all"):
        p.add_argument("--recall-k", type=_positive, nargs="+", default=list(DEFAULT_KS))
    if command == "probe":
        p.add_argument("--train-split", default="train")
        p.add_argument("--knn-k", type=_positive, default=20)
        p.add_argument("--knn-temperature", type=float, default=0.07)
        p.add_argument("--probe-c", type=float, default=1.0, help="inverse L2 strength of the linear probe")
        p.add_argument("--knn-only", action="store_true", help="skip the logistic-regression probe")


def add_eval_subcommands(subparsers) -> argparse.ArgumentParser:
    """Add `eval` and its commands to an argparse subparsers object."""
    parser = subparsers.add_parser("eval", help="evaluate a model: zero-shot, retrieval, probes, geometry",
                                   description="Evaluate a model on datasets in CLIP_benchmark's webdataset "
                                               "layout; metrics as CLIP_benchmark defines them.")
    commands = parser.add_subparsers(dest="eval_command", required=True)
    for command, (summary, _) in COMMANDS.items():
        p = commands.add_parser(command, help=summary, description=summary)
        _add_common(p, command)
        p.set_defaults(func=run_eval)
    return parser


def _options(args) -> dict:
    get = lambda name, default=None: getattr(args, name, default)  # noqa: E731 - per-command options
    options = dict(batch_size=args.batch_size, workers=args.workers, threads=args.threads, max_samples=args.max_samples,
                   amp=args.amp, channels_last=args.channels_last, progress=not args.no_progress,
                   classnames_file=get("classnames"), templates_file=get("templates"),
                   recall_k=tuple(get("recall_k", DEFAULT_KS)), geometry=args.eval_command == "all")
    if args.eval_command == "probe":
        options.update(train_split=args.train_split, knn_k=args.knn_k, knn_temperature=args.knn_temperature,
                       probe_c=args.probe_c)
    return options


def _task(args) -> Optional[str]:
    task = COMMANDS[args.eval_command][1]
    if task == "linear_probe" and args.knn_only:
        return "knn"
    return task


def _check_data(roots: List[str]) -> None:
    """Fail before loading the model when a dataset folder is missing."""
    for root in roots:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"no such dataset folder: {root}")


def run_eval(args) -> int:
    """Handler of every `mmcl eval` command: evaluate each --data folder, print the table, write --out."""
    from mmcl.eval.report import markdown_table, write_reports
    from mmcl.eval.runner import evaluate_dataset

    _check_data(args.data)
    device = args.device or default_device()
    model, preprocess, tokenizer = load_model(args.model, device)
    options = _options(args)
    results = [evaluate_dataset(model, preprocess, tokenizer, root, split=args.split, task=_task(args),
                                device=device, **options) for root in args.data]
    print(markdown_table(results), end="")
    for result in results:
        skipped = sum(result["skipped"].values())
        if skipped:
            print(f"{result['dataset']}: skipped {skipped} bad samples {result['skipped']}", file=sys.stderr)
    if args.out:
        name, pretrained = split_spec(args.model)
        written = write_reports(results, args.out, name, pretrained)
        print(f"wrote {len(written)} files to {args.out}", file=sys.stderr)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Stand-alone entry point (`python -m mmcl.eval.cli eval ...` style, without the `mmcl` program)."""
    parser = argparse.ArgumentParser(prog="mmcl")
    add_eval_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"mmcl: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
