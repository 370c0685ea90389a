"""mmcl's evaluation against clip_benchmark 1.6.2: same model, same data, same metrics, images per second.

    PYTHONPATH=. python benchmarks/eval_vs_clip_benchmark.py [--repeats 3] [--batch-size 256]

The model is a tiny but real open_clip CLIP (ViT: 32 px, patch 8, width 64, 2 layers; text: width 64,
2 layers, context 32; embedding 32), built with a fixed seed and saved as a `local-dir:` export, so both
tools load the same weights with the same preprocess and tokenizer. Data: the CIFAR-10 test split (10,000
images, 4 shards) and the Flickr8k test split (1,000 images, 5,000 captions, 1 shard) from ../shared/data.

Each timed run is a fresh process (no warm tokenizer cache or page-cache advantage for the second tool:
every shard is read once before timing), the tools alternate, and the median of `--repeats` runs is kept.
Timed: from building the dataset to the metrics, model loading excluded. Both sides use fp32 (clip_benchmark
`amp=False`; its default autocast would use bfloat16 on a CPU), the same batch size and the same number of
DataLoader workers. clip_benchmark reads through its own `build_dataset("wds/<name>", root=...)` and the
DataLoader its CLI builds. Its `accuracy()` fails on numpy 2 (float of a 1-element array); it is patched.
clip_benchmark runs with torch's default CPU threads unless --cb-threads is given; mmcl uses its own
policy (the cores that loading leaves free).

Reported: images per second of wall time (the requirement: mmcl >= 2x) and images per CPU-second (process
plus DataLoader workers), which depends less on what else the machine runs.
Writes benchmarks/results/eval_vs_clip_benchmark.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
RESULTS = os.path.join(ROOT, "benchmarks", "results", "eval_vs_clip_benchmark.json")
MODEL_CFG = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
             "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
# (dataset folder, clip_benchmark task, worker counts). Flickr8k's test split is one shard: clip_benchmark's
# webdataset loader fails with more workers than shards, so it gets 0 and 1.
CONFIGS = [("cifar10", "zeroshot_classification", (0, 2)), ("flickr8k", "zeroshot_retrieval", (0, 1))]
RECALL_K = [1, 5, 10]


def export_model(folder: str) -> str:
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.CLIP(**MODEL_CFG)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(folder, "open_clip_model.safetensors"))
    with open(os.path.join(folder, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": MODEL_CFG, "preprocess_cfg": {}}, f)
    return f"local-dir:{folder}"


def numpy2_accuracy(output, target, topk=(1,)):
    """clip_benchmark's accuracy() with `[0]` added: numpy 2 refuses float() of a 1-element array."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].reshape(-1).float().sum(0, keepdim=True).cpu().numpy()[0]) / len(target)
            for k in topk]


def run_clip_benchmark(model, preprocess, tokenizer, root, task, batch_size, workers, threads):
    import torch
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification as zc
    from clip_benchmark.metrics import zeroshot_retrieval as zr

    zc.accuracy = numpy2_accuracy
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    ds = build_dataset(f"wds/{os.path.basename(root)}", root=root, transform=preprocess, split="test", task=task)
    loader = torch.utils.data.DataLoader(ds.batched(batch_size), batch_size=None, shuffle=False,
                                         num_workers=workers)
    if task == "zeroshot_classification":
        metrics = zc.evaluate(model, loader, tokenizer, ds.classes, ds.templates, "cpu", amp=False)
    else:
        metrics = zr.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=RECALL_K)
    return metrics, time.perf_counter() - start


def run_mmcl(model, preprocess, tokenizer, root, task, batch_size, workers):
    from eval import evaluate_dataset

    start = time.perf_counter()
    result = evaluate_dataset(model, preprocess, tokenizer, root, split="test", task=task, batch_size=batch_size,
                              workers=workers, recall_k=RECALL_K)
    return result["metrics"], time.perf_counter() - start


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the DataLoader workers, once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_one(args) -> None:
    """One timed evaluation in this (fresh) process; prints a JSON line."""
    import warnings

    from eval.cli import load_model

    warnings.filterwarnings("ignore")  # webdataset's shardshuffle notice on clip_benchmark's side
    model, preprocess, tokenizer = load_model(args.model, "cpu")
    root = os.path.join(DATA, args.dataset)
    cpu_before = cpu_seconds()
    if args.one == "clip_benchmark":
        metrics, seconds = run_clip_benchmark(model, preprocess, tokenizer, root, args.task, args.batch_size,
                                              args.workers, args.cb_threads)
    else:
        metrics, seconds = run_mmcl(model, preprocess, tokenizer, root, args.task, args.batch_size, args.workers)
    print(json.dumps({"metrics": metrics, "seconds": seconds, "cpu_seconds": cpu_seconds() - cpu_before}))


def timed_run(tool, dataset, task, workers, model, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", tool, "--dataset", dataset, "--task", task,
           "--workers", str(workers), "--model", model, "--batch-size", str(args.batch_size)]
    if args.cb_threads:
        cmd += ["--cb-threads", str(args.cb_threads)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def same_metrics(ours: dict, theirs: dict, tol: float = 1e-6) -> float:
    """Largest difference over clip_benchmark's metric names (NaN equals NaN); raises if above tol."""
    worst = 0.0
    for key, value in theirs.items():
        mine = ours[key]
        if math.isnan(value) and math.isnan(mine):
            continue
        worst = max(worst, abs(mine - value))
    if worst > tol:
        raise AssertionError(f"metrics differ by {worst}: mmcl {ours} vs clip_benchmark {theirs}")
    return worst


def warm_page_cache() -> None:
    for name, _, _ in CONFIGS:
        folder = os.path.join(DATA, name, "test")
        for file in sorted(os.listdir(folder)):
            with open(os.path.join(folder, file), "rb") as f:
                while f.read(1 << 22):
                    pass


def bench_config(dataset, task, workers, model, args) -> dict:
    runs = {"mmcl": [], "clip_benchmark": []}
    for repeat in range(args.repeats):
        order = ["clip_benchmark", "mmcl"] if repeat % 2 == 0 else ["mmcl", "clip_benchmark"]
        for tool in order:
            runs[tool].append(timed_run(tool, dataset, task, workers, model, args))
    images = 10_000 if dataset == "cifar10" else 1_000
    worst = max(same_metrics(m["metrics"], c["metrics"]) for m, c in zip(runs["mmcl"], runs["clip_benchmark"]))
    row = {"dataset": dataset, "task": task, "workers": workers, "images": images, "max_metric_difference": worst,
           "metrics": runs["mmcl"][0]["metrics"], "clip_benchmark_metrics": runs["clip_benchmark"][0]["metrics"]}
    for tool, results in runs.items():
        seconds, cpu = [r["seconds"] for r in results], [r["cpu_seconds"] for r in results]
        row[tool] = {"seconds": seconds, "median_seconds": statistics.median(seconds),
                     "images_per_s": images / statistics.median(seconds), "cpu_seconds": cpu,
                     "images_per_cpu_s": images / statistics.median(cpu)}
    row["speedup"] = row["mmcl"]["images_per_s"] / row["clip_benchmark"]["images_per_s"]
    row["cpu_speedup"] = row["mmcl"]["images_per_cpu_s"] / row["clip_benchmark"]["images_per_cpu_s"]
    return row


def table(rows) -> str:
    lines = ["| dataset (test) | workers | clip_benchmark img/s | mmcl img/s | speedup | "
             "clip_benchmark img/CPU-s | mmcl img/CPU-s | max metric diff |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cb, mm = r["clip_benchmark"], r["mmcl"]
        lines.append(f"| {r['dataset']} | {r['workers']} | {cb['images_per_s']:.0f} | {mm['images_per_s']:.0f} | "
                     f"{r['speedup']:.2f}x | {cb['images_per_cpu_s']:.0f} | {mm['images_per_cpu_s']:.0f} | "
                     f"{r['max_metric_difference']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--cb-threads", type=int, default=None, help="torch threads for clip_benchmark's runs")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--one", choices=["mmcl", "clip_benchmark"], help=argparse.SUPPRESS)
    p.add_argument("--dataset", help=argparse.SUPPRESS)
    p.add_argument("--task", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return run_one(args)
    warm_page_cache()
    with tempfile.TemporaryDirectory() as folder:
        model = export_model(folder)
        rows = [bench_config(dataset, task, workers, model, args)
                for dataset, task, worker_counts in CONFIGS for workers in worker_counts]
    import torch

    report = {"model_cfg": MODEL_CFG, "batch_size": args.batch_size, "repeats": args.repeats,
              "clip_benchmark_threads": args.cb_threads or torch.get_num_threads(), "cpu_cores": os.cpu_count(),
              "load_average_after": os.getloadavg(), "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(table(rows))


if __name__ == "__main__":
    main()
