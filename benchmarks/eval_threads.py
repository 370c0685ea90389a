"""The thread policy's evidence: mmcl eval's images/s for every (DataLoader workers, torch threads) pair.

    PYTHONPATH=. python benchmarks/eval_threads.py [--repeats 3] [--sizes tiny32 small64]

On a CPU the model's threads and the loaders share the cores. This measures, for the 32 px model (loading
dominates) and the 64 px model (the model dominates) of eval_vs_clip_benchmark.py, on CIFAR-10 (zero-shot;
the 64 px model on its first 2,560 images) and Flickr8k (retrieval, whole test split): workers 0, 1, 2 x
threads 1, 2, each in a fresh process through the Python API (model loading excluded), the settings in a
rotating order, median of `--repeats`. It also records what mmcl's own policy (mmcl.eval.threads) picks.
Results: benchmarks/results/eval_threads.json and a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import eval_vs_clip_benchmark as evb  # noqa: E402

CELLS = {"tiny32": [("cifar10", None), ("flickr8k", None)], "small64": [("cifar10", 2560), ("flickr8k", None)]}
SETTINGS = [(w, t) for w in (0, 1, 2) for t in (1, 2)]


def run_one(args) -> None:
    """One evaluation in this fresh process; prints a JSON line."""
    from mmcl.eval import evaluate_dataset
    from mmcl import load_model

    model, preprocess, tokenizer = load_model(args.model, "cpu")
    threads = args.threads or None
    start = time.perf_counter()
    result = evaluate_dataset(model, preprocess, tokenizer, args.data, batch_size=256, workers=args.workers,
                              threads=threads, max_samples=args.max_samples)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "images_per_s": result["samples"] / seconds,
                      "metrics": result["metrics"], "threads": result["threads"]}))


def child(model: str, data: Path, workers: int, threads: int, max_samples) -> dict:
    cmd = [sys.executable, __file__, "--one", "--model", model, "--data", str(data), "--workers", str(workers),
           "--threads", str(threads)] + (["--max-samples", str(max_samples)] if max_samples else [])
    load = os.getloadavg()[0]
    done = subprocess.run(cmd, cwd=common.REPO, capture_output=True, text=True, env=common.child_env(), check=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]), load_average=round(load, 2))


def cell(size: str, model: str, dataset: str, max_samples, repeats: int) -> dict:
    data = common.SHARED_DATA / dataset
    runs = {setting: [] for setting in SETTINGS}
    for repeat in range(repeats):
        shift = repeat * 2 % len(SETTINGS)
        for workers, threads in SETTINGS[shift:] + SETTINGS[:shift]:
            common.say(f"{size} {dataset}: workers {workers}, threads {threads}, repeat {repeat + 1}")
            runs[(workers, threads)].append(child(model, data, workers, threads, max_samples))
    policy = child(model, data, 2, 0, max_samples)["threads"]  # what mmcl picks by itself (workers 2)
    rows = []
    for (workers, threads), rs in runs.items():
        rows.append({"workers": workers, "threads": threads, "images_per_s": common.summarize(
            [r["images_per_s"] for r in rs]), "load_average": [r["load_average"] for r in rs]})
    same = len({json.dumps(r["metrics"], sort_keys=True) for rs in runs.values() for r in rs}) == 1
    return {"size": size, "dataset": dataset, "images": max_samples or common.split_samples(data, "test"),
            "policy": policy, "metrics_identical": same, "rows": rows}


def table(cells: list) -> str:
    lines = ["| model | data (test) | workers | img/s, 1 thread | img/s, 2 threads | mmcl's policy |",
             "|---|---|---|---|---|---|"]
    for c in cells:
        by = {(r["workers"], r["threads"]): r["images_per_s"]["median"] for r in c["rows"]}
        for workers in (0, 1, 2):
            lines.append(f"| {c['size']} | {c['dataset']} ({c['images']:,}) | {workers} | {by[(workers, 1)]:,.0f} | "
                         f"{by[(workers, 2)]:,.0f} | {c['policy']['threads']} threads "
                         f"({c['policy']['flops_per_pixel']:,} FLOPs/pixel) |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", choices=list(CELLS), default=list(CELLS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="eval_threads.json")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--max-samples", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return run_one(args)
    machine = common.machine_info()
    cells = []
    for size in args.sizes:
        model = evb.export_model(size, common.WORK / "eval_models" / size)
        cells += [cell(size, model, dataset, first, args.repeats) for dataset, first in CELLS[size]]
    common.write_json(args.out, {"machine": machine, "repeats": args.repeats, "batch_size": 256, "cells": cells})
    print(table(cells))


if __name__ == "__main__":
    main()
