"""SimCLR: mmcl's objective and trainer step vs a plain loop on lightly's NTXentLoss, same model, same batches.

    python benchmarks/ssl_throughput.py [--repeats 3] [--steps 10] [--parity-steps 10] [--quick]

Recipe cifar10_simclr_tiny (ViT image tower at 32 px, MLP head, two views, temperature from the recipe) on
../shared/data/cifar10. Batches of views come from mmcl's multi-view pipeline and are loaded into memory
first, so both sides train on identical inputs and only the step is timed.

- mmcl: `mmcl.trainer.loop.optimizer_step` (objective -> mmcl NTXentLoss -> backward -> clip -> AdamW ->
  schedule), as `mmcl train` runs it.
- lightly: a copy of the same image tower and head made before the first step, `lightly.loss.NTXentLoss`,
  and the loop lightly's examples use (forward both views, loss, backward, clip, step), with the same AdamW
  parameter groups and learning-rate schedule so that the two runs can be compared step by step.

Parity: both train in lock-step for `--parity-steps` steps on the same batches; the largest loss difference
is reported (step 0: same weights, same inputs). Throughput: blocks of `--steps` steps alternate between the
two (order swapped every repeat) after the parity phase, which is also the warm-up.

Writes benchmarks/results/ssl_throughput.json.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PARITY_TOLERANCE = 1e-5
TARGET_RATIO = 0.95


def build_mmcl(args):
    from mmcl.config import load_recipe
    from mmcl.trainer import loop

    overrides = [f"data.train=[{common.SHARED_DATA / 'cifar10'}]", f"train.output_dir={common.WORK / 'ssl' / 'run'}",
                 "train.resume=none", "train.progress=false", "train.save_every=0", "eval.datasets=[]",
                 "data.workers=0", f"train.batch_size={args.batch_size}", "train.epochs=1000",
                 f"train.max_steps={args.parity_steps + 2 * args.repeats * args.steps + 1}"]
    recipe = load_recipe(str(common.REPO / "recipes" / "cifar10_simclr_tiny.yaml"), overrides)
    run, _ = loop.start(recipe)
    return recipe, run


class LightlySimCLR:
    """The plain loop: backbone + head copied from mmcl's objective, lightly's loss, torch's AdamW."""

    def __init__(self, objective, recipe, total_steps: int):
        import torch
        from lightly.loss import NTXentLoss
        from torch import nn

        from mmcl.trainer.optim import make_optimizer, make_scheduler

        self.module = nn.ModuleDict({"visual": copy.deepcopy(objective.model.visual),
                                     "head": copy.deepcopy(objective.head)})
        self.criterion = NTXentLoss(temperature=recipe.objective.section("simclr").temperature)
        self.optimizer = make_optimizer(self.module, recipe.optim)
        self.scheduler = make_scheduler(self.optimizer, total_steps, recipe.optim)
        self.clip = recipe.optim.grad_clip
        self.torch = torch

    def step(self, batch: dict) -> float:
        self.module.train()
        x0, x1 = batch["views"]
        z0 = self.module["head"](self.module["visual"](x0))
        z1 = self.module["head"](self.module["visual"](x1))
        loss = self.criterion(z0, z1)
        loss.backward()
        if self.clip:
            self.torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def load_batches(recipe, run, count: int) -> list:
    from mmcl.trainer import setup as S

    batches = list(itertools.islice(S.epoch_batches(recipe, run.plan, run.spec, 0, 0), count))
    return [{k: v for k, v in b.items() if k in ("views",)} for b in batches]


def mmcl_step(run, batch: dict) -> float:
    from mmcl.trainer import loop

    losses, _ = loop.optimizer_step(run, dict(batch))
    return float(losses["loss"])


def parity(run, anchor, batches, steps: int) -> dict:
    """Lock-step training on the same batches: losses of both sides, step by step."""
    ours, theirs = [], []
    for i in range(steps):
        batch = batches[i % len(batches)]
        ours.append(mmcl_step(run, batch))
        theirs.append(anchor.step(batch))
    diffs = [abs(a - b) for a, b in zip(ours, theirs)]
    return {"mmcl_losses": ours, "lightly_losses": theirs, "first_step_difference": diffs[0],
            "max_difference": max(diffs), "tolerance": PARITY_TOLERANCE, "met": diffs[0] <= PARITY_TOLERANCE}


def timed_block(step, batches, steps: int, batch_size: int) -> float:
    start = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    return steps * batch_size / (time.perf_counter() - start)


def throughput(run, anchor, batches, args) -> dict:
    sides = {"mmcl": lambda b: mmcl_step(run, b), "lightly": anchor.step}
    rates = {"mmcl": [], "lightly": []}
    for repeat in range(args.repeats):
        for name in (["mmcl", "lightly"] if repeat % 2 == 0 else ["lightly", "mmcl"]):
            rates[name].append(timed_block(sides[name], batches, args.steps, args.batch_size))
            common.say(f"ssl {name} r{repeat}: {rates[name][-1]:.1f} samples/s")
    summary = {name: common.summarize(values) for name, values in rates.items()}
    value = common.ratio(summary["mmcl"], summary["lightly"])
    return {"summary": summary, "ratio": value, "paired": common.paired_ratios(rates["mmcl"], rates["lightly"]),
            "target": TARGET_RATIO, "met": value is not None and value >= TARGET_RATIO}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="steps per timed block")
    p.add_argument("--parity-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=8, help="distinct batches loaded into memory")
    p.add_argument("--quick", action="store_true", help="1 repeat of 5 steps, 5 parity steps")
    p.add_argument("--out", default="ssl_throughput.json")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.steps, args.parity_steps = 1, 5, 5
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    torch.manual_seed(0)
    recipe, run = build_mmcl(args)
    anchor = LightlySimCLR(run.objective, recipe, run.plan.total_steps)
    batches = load_batches(recipe, run, args.batches)
    common.say(f"ssl: {len(batches)} batches of {args.batch_size} x 2 views in memory")
    report = {"machine": common.machine_info(),
              "settings": {"recipe": "cifar10_simclr_tiny", "batch_size": args.batch_size, "views": 2,
                           "temperature": recipe.objective.section("simclr").temperature, "steps_per_block": args.steps,
                           "repeats": args.repeats, "parity_steps": args.parity_steps},
              "parity": parity(run, anchor, batches, args.parity_steps),
              "throughput": throughput(run, anchor, batches, args)}
    path = common.write_json(args.out, report)
    common.say(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
