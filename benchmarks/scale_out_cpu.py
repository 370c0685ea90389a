"""Gradient all-reduce during the backward pass vs after it, with two gloo processes on this CPU.

    python benchmarks/scale_out_cpu.py [--repeats 3] [--sizes vit_s vit_ti]

Each run is `torchrun --nproc_per_node 2 benchmarks/step_speed.py` (a fresh pair of processes, one torch
thread each) on a CLIP whose image tower is ViT-S-like (width 384, 12 blocks, 6 heads, 32 px images in
patches of 4: 65 tokens) or ViT-Ti-like (width 192, 3 heads), with a 6-block text tower of the same width,
large enough that the 90-205 MB of fp32 gradients take a visible share of a step. Modes, rotated between
repeats: `train.grad_sync=overlap` (buckets sent as the backward pass finishes them, the default),
`after_backward` (one bucketed all-reduce after the whole backward pass, mmcl's previous behaviour) and
`train.fsdp=true` (the towers sharded). Reported: the median over repeats of each run's median seconds per
optimizer step, and the ratio of the medians.

Writes benchmarks/results/scale_out_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SIZES = {"vit_s": 384, "vit_ti": 192}  # width of both towers; heads of 64 channels
MODES = {"overlap": ["train.grad_sync=overlap"], "after_backward": ["train.grad_sync=after_backward"],
         "fsdp": ["train.fsdp=true"]}


def model_config(width: int) -> dict:
    heads = width // 64
    return {"embed_dim": 256,
            "vision_cfg": {"image_size": 32, "patch_size": 4, "width": width, "layers": 12, "head_width": 64,
                           "mlp_ratio": 4.0},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": width, "heads": heads, "layers": 6,
                         "mlp_ratio": 4.0}}


def recipe_file(size: str, batch: int) -> Path:
    import yaml

    common.ensure_digits()  # a recipe needs training data to validate; the steps use synthetic batches
    out = common.WORK / "scale_out" / size
    recipe = {"model": {"config": model_config(SIZES[size])}, "data": {"train": [str(common.DIGITS)], "workers": 0},
              "optim": {"lr": 5e-4, "weight_decay": 0.2, "warmup_steps": 2},
              "train": {"output_dir": str(out), "batch_size": batch, "save_every": 0, "resume": "none",
                        "progress": False, "log_every": 1000, "epochs": 1000}}
    path = out.with_suffix(".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_pair(recipe: Path, mode: str, tag: str, args) -> dict:
    port = 29500 + (os.getpid() + hash(tag)) % 400
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(Path(__file__).resolve().parent / "step_speed.py"), str(recipe), "--warmup", str(args.warmup),
           "--steps", str(args.steps)] + [f"--override={o}" for o in MODES[mode]]
    log = common.WORK / "scale_out" / f"{tag}.log"
    env = common.child_env(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    common.check_ok(common.run_logged(cmd, log, env=env), log, f"step_speed ({tag})")
    return json.loads([line for line in log.read_text().splitlines() if line.startswith("{")][-1])


def measure(args) -> dict:
    results = {}
    for size in args.sizes:
        recipe, modes = recipe_file(size, args.batch_size), list(MODES)
        for repeat in range(args.repeats):
            for mode in modes[repeat % len(modes):] + modes[:repeat % len(modes)]:
                tag = f"{size}_{mode}_r{repeat}"
                result = run_pair(recipe, mode, tag, args)
                common.say(f"{tag}: {result['seconds_per_step']:.3f} s/step, {result['sent_in_backward']} of "
                           f"{result['grad_buckets']} buckets sent during backward")
                results.setdefault(size, {}).setdefault(mode, []).append(result)
    return results


def summarize(results: dict) -> dict:
    out = {}
    for size, modes in results.items():
        steps = {mode: common.summarize([r["seconds_per_step"] for r in runs]) for mode, runs in modes.items()}
        base = steps["after_backward"]["median"]
        out[size] = {"seconds_per_step": steps,
                     "speedup_vs_after_backward": {m: base / s["median"] for m, s in steps.items()},
                     "paired_speedup": {m: common.paired_ratios([r["seconds_per_step"] for r in modes["after_backward"]],
                                                                [r["seconds_per_step"] for r in runs])
                                        for m, runs in modes.items()}}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16, help="per process")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", default="scale_out_cpu.json")
    args = p.parse_args(argv)
    machine = common.machine_info()
    results = measure(args)
    report = {"machine": machine, "load_average_end": os.getloadavg(),
              "settings": {"sizes": {s: model_config(SIZES[s]) for s in args.sizes}, "batch_per_process": args.batch_size,
                           "processes": 2, "backend": "gloo", "threads_per_process": 1, "warmup_steps": args.warmup,
                           "measured_steps": args.steps, "repeats": args.repeats, "precision": "fp32"},
              "runs": results, "summary": summarize(results)}
    path = common.write_json(args.out, report)
    common.say(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
