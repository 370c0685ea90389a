"""Step throughput of mmcl's SSL objectives against lightly's implementations, at two tower sizes.

    flock -x /tmp/mmcl-cpu.lock python benchmarks/ssl_methods_speed.py [--repeats 3] [--steps 8] [--quick]

For SimCLR, MoCo v2, BYOL, SimSiam, VICReg and SwAV: the method's tiny CIFAR-10 recipe, with its tower as
shipped ("tiny": ViT width 128, 4 layers, 16 patches of 8 px) and a larger one ("small": width 256, 6 layers,
64 patches of 4 px). The mmcl side is the trainer's step (`mmcl.trainer.loop.optimizer_step`); the lightly side
is `benchmarks/lightly_methods.py` (lightly's heads, losses, momentum updates; the same tower, AdamW and
clipping). Both train on the same batches from mmcl's pipeline, loaded into memory first, so that only the
step is timed: after 3 warm-up steps each, blocks of `--steps` steps alternate between the two sides (order
swapped every repeat); samples/s is the median over the blocks. Run it alone (flock -x): it is a timing.

Writes benchmarks/results/ssl_methods_speed.json.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from lightly_methods import LIGHTLY  # noqa: E402

from mmcl.config import load_recipe  # noqa: E402
from mmcl.trainer import loop  # noqa: E402
from mmcl.trainer import setup as S  # noqa: E402

METHODS = ("simclr", "moco", "byol", "simsiam", "vicreg", "swav")
SIZES = {"tiny": [], "small": ["model.config.vision_cfg.width=256", "model.config.vision_cfg.layers=6",
                               "model.config.vision_cfg.patch_size=4", "model.config.vision_cfg.head_width=64"]}
CIFAR = common.SHARED_DATA / "cifar10"


def build(method: str, size: str, steps: int):
    overrides = [f"data.train=[{CIFAR}]", f"train.output_dir={common.WORK / 'ssl_speed' / method}",
                 "train.resume=none", "train.progress=false", "train.save_every=0", "eval.datasets=[]",
                 "data.workers=0", "train.epochs=1000", f"train.max_steps={steps}"] + SIZES[size]
    if method == "swav":  # the ViT at 4 px patches takes 16 px small views (4 x 4 patches)
        overrides.append("data.small_view_size=16")
    recipe = load_recipe(str(common.REPO / "recipes" / f"cifar10_{method}_tiny.yaml"), overrides)
    run, _ = loop.start(recipe)
    return recipe, run


def load_batches(recipe, run, count: int) -> list:
    batches = list(itertools.islice(S.epoch_batches(recipe, run.plan, run.spec, 0, 0), count))
    return [{"views": b["views"], "key": b["key"]} for b in batches]


def timed(step, batches, steps: int, batch_size: int) -> float:
    start = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    return steps * batch_size / (time.perf_counter() - start)


def compare(method: str, size: str, args) -> dict:
    total = 3 + args.repeats * args.steps + 1
    torch.manual_seed(0)
    recipe, run = build(method, size, total)
    anchor = LIGHTLY[method](run.objective, recipe, total)
    batches = load_batches(recipe, run, args.batches)
    sides = {"mmcl": lambda b: loop.optimizer_step(run, dict(b)), "lightly": anchor.step}
    for name in sides:  # warm-up (allocations, first-call costs)
        timed(sides[name], batches, 3, recipe.train.batch_size)
    rates = {"mmcl": [], "lightly": []}
    for repeat in range(args.repeats):
        for name in (["mmcl", "lightly"] if repeat % 2 == 0 else ["lightly", "mmcl"]):
            rates[name].append(timed(sides[name], batches, args.steps, recipe.train.batch_size))
        common.say(f"{method} {size} r{repeat}: mmcl {rates['mmcl'][-1]:.1f}, "
                   f"lightly {rates['lightly'][-1]:.1f} samples/s")
    summary = {name: common.summarize(values) for name, values in rates.items()}
    return {"summary": summary, "ratio": common.ratio(summary["mmcl"], summary["lightly"]),
            "paired": common.paired_ratios(rates["mmcl"], rates["lightly"]),
            "views": len(batches[0]["views"]), "batch_size": recipe.train.batch_size}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=8, help="steps per timed block")
    p.add_argument("--batches", type=int, default=4, help="distinct batches in memory")
    p.add_argument("--only", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--quick", action="store_true", help="1 repeat of 2 steps, tiny tower only")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.steps = 1, 2
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    report = {"machine": common.machine_info(), "settings": vars(args), "methods": {}}
    for method in args.only:
        report["methods"][method] = {size: compare(method, size, args)
                                     for size in (["tiny"] if args.quick else list(SIZES))}
    report["load_average_end"] = common.machine_info()["load_average"]
    path = common.write_json("ssl_methods_speed_quick.json" if args.quick else "ssl_methods_speed.json", report)
    common.say(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
