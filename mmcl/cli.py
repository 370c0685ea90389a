"""`mmcl` command line: train | eval | data | export | quickstart | embed | index | search | serve.

Input problems (bad recipe, missing file, bad value) print one line `mmcl: error: ...` and exit with code 2
before any work starts; a run that fails while training exits with code 1.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import List, Optional

# recipes/ sits beside mmcl/ in a checkout; a wheel carries it inside, as mmcl/recipes/ (pyproject's package-dir)
_HERE = Path(__file__).resolve().parent
RECIPES_DIR = _HERE / "recipes" if (_HERE / "recipes").is_dir() else _HERE.parent / "recipes"


WORKER_TRACEBACK = "Original Traceback (most recent call last):"


def one_line(err: Exception) -> str:
    """Errors are reported on one line (set MMCL_DEBUG=1 for the traceback). An error raised in a DataLoader
    worker arrives with the worker's traceback in its message: its last line holds the error itself."""
    text = str(err)
    if WORKER_TRACEBACK in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split()) or type(err).__name__


def format_warning(message, category, filename, lineno, line=None) -> str:
    """mmcl's own deprecation warnings as one line, like its errors; other warnings as Python shows them."""
    if issubclass(category, FutureWarning) and Path(filename).resolve().is_relative_to(Path(__file__).parent):
        return f"mmcl: warning: {message}\n"
    return PYTHON_FORMAT_WARNING(message, category, filename, lineno, line)


PYTHON_FORMAT_WARNING = warnings.formatwarning


def find_recipe(name: str) -> str:
    """A recipe path, or a recipe name from the recipes/ folder (e.g. `digits_clip_tiny`)."""
    if Path(name).is_file():
        return name
    for candidate in (Path("recipes") / f"{name}.yaml", RECIPES_DIR / f"{name}.yaml", RECIPES_DIR / name):
        if candidate.is_file():
            return str(candidate)
    return name  # load_recipe reports it as not found


def cmd_train(args) -> int:
    from mmcl.config import load_recipe
    from mmcl.trainer import train
    from mmcl.trainer.loop import dry_run

    from mmcl.distributed import shutdown

    recipe = load_recipe(find_recipe(args.recipe), args.overrides)
    dry_run(recipe) if args.dry_run else train(recipe)
    shutdown()  # after success only: a failed rank must not wait here for the others
    return 0


def cmd_export(args) -> int:
    from mmcl.models import export_run

    out = export_run(Path(args.run_dir), Path(args.out), Path(args.checkpoint) if args.checkpoint else None)
    print(f"exported to {out} (load with open_clip.create_model_and_transforms('local-dir:{out}'))")
    return 0


def cmd_quickstart(args) -> int:
    from mmcl.quickstart import quickstart

    quickstart(Path(args.out), steps=args.steps, overrides=args.overrides)
    return 0


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line like every other mmcl error (its usage text is a --help away)."""

    def error(self, message: str):
        self.exit(2, f"mmcl: error: {' '.join(message.split())} (see {self.prog} --help)\n")


# options that several InfoNCE sections share (label-aware, hard-negative, mixing and text-side)
SHARED_OPTIONS = """\
options within those sections (e.g. objective.simclr.hard_negatives.beta=1.0):
  clip, simclr, moco  hard_negatives: {beta, tau_plus, decoupled}  HCL / debiased / decoupled negatives
                      imix_alpha: i-Mix, mixed images with mixed virtual labels (0: off)
  moco, clip          mochi: {top_k, s, s_prime}  MoCHi synthetic hard negatives (moco v2; clip's
                      cross_modal_queue)
  clip                label_positives: same-class pairs (`cls`) are positives (SupCon-style)
                      text_ssl_weight, simcse: {temperature, token_shuffle, token_cutoff}  SimCSE text term
                      (with model.text_dropout)"""


def objectives_help() -> str:
    """`mmcl train --help`'s list of objectives: each objective.name with the first line of its options' doc."""
    from mmcl.objective_options import SECTION_TYPES, SECTIONS

    lines = ["objectives (objective.name) and the option sections each reads:"]
    for name, sections in SECTIONS.items():
        doc = (SECTION_TYPES[name].__doc__ or "").strip().splitlines()[0]
        lines.append(f"  {name:<9} {doc} [objective.{', objective.'.join(sections)}]")
    return "\n".join(lines + ["", SHARED_OPTIONS])


def build_parser() -> argparse.ArgumentParser:
    from mmcl.data_pipelines.cli import add_data_subcommands

    parser = Parser(prog="mmcl", description="Contrastive pretraining: CLIP, SigLIP, SimCLR, MoCo, SLIP")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train from a YAML recipe", description="Train from a YAML recipe. "
                       "Run under `accelerate launch -m mmcl train ...` or torchrun for several processes.",
                       epilog=objectives_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="recipe file, or a name from recipes/ (e.g. digits_clip_tiny)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-3 train.batch_size=128")
    p.add_argument("--dry-run", action="store_true", help="validate the recipe and build everything the run "
                   "needs (towers, optimizer, data plan, resume checkpoint), then stop; writes nothing")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("export", help="write an open_clip local-dir export of a run")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoint", default=None, help="a checkpoint folder (default: the newest complete one)")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("quickstart", help="embedded digits: build shards, train a tiny CLIP, evaluate, plot")
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--steps", type=int, default=None, help="override the recipe's step budget")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_quickstart)
    add_data_subcommands(sub)
    from mmcl.search.cli import add_search_subcommands

    add_search_subcommands(sub)
    try:
        from mmcl.eval.cli import add_eval_subcommands
    except ImportError as err:  # pragma: no cover - only while the eval package is being developed
        print(f"mmcl: eval commands unavailable: {err}", file=sys.stderr)
    else:
        add_eval_subcommands(sub)
    return parser


def parse(parser: argparse.ArgumentParser, argv: Optional[List[str]]) -> argparse.Namespace:
    """argparse stops filling `overrides` at the first option: `mmcl train R --dry-run k=v` keeps k=v as well."""
    args, rest = parser.parse_known_args(argv)
    if rest and isinstance(getattr(args, "overrides", None), list) and not any(r.startswith("-") for r in rest):
        args.overrides += rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    """Every known failure ends here as one line: bad input (exit 2), a run that cannot go on (exit 1)."""
    from pickle import UnpicklingError

    from mmcl.data_pipelines.stream import NoUsableSamples
    from mmcl.config import ConfigError
    from mmcl.models.weights import UnsafeCheckpointError
    from mmcl.trainer.loop import TrainingError

    warnings.formatwarning = format_warning
    args = parse(build_parser(), argv)
    try:
        return args.func(args) or 0
    except (ConfigError, FileNotFoundError, UnsafeCheckpointError, ValueError, UnpicklingError) as err:
        if os.environ.get("MMCL_DEBUG"):
            raise
        print(f"mmcl: error: {one_line(err)}", file=sys.stderr)
        return 2
    # the run started but cannot go on (OSError: e.g. disk full; NoUsableSamples: no shard holds a usable sample)
    except (TrainingError, OSError, NoUsableSamples) as err:
        if os.environ.get("MMCL_DEBUG"):
            raise
        print(f"mmcl: error: {one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mmcl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
