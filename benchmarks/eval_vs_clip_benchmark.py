"""mmcl eval at three model sizes: against clip_benchmark 1.6.2 and against the model's own ceiling, fp32 and bf16.

    PYTHONPATH=. python benchmarks/eval_vs_clip_benchmark.py [--sizes tiny32 small64 vit_b32]
        [--precisions fp32 bf16] [--repeats 3] [--redo]

Models: seeded random open_clip CLIPs saved as `local-dir:` exports, so both tools load the same weights,
preprocess and tokenizer:
- tiny32: ViT 32 px, patch 8, width 64, 2 layers; text width 64, 2 layers; embedding 32 (loading dominates);
- small64: ViT 64 px, patch 8, width 192, 4 layers, head width 64; text context 32, width 192, 3 heads, 4 layers;
  embedding 192 (the model dominates);
- vit_b32: open_clip's ViT-B-32 architecture at 224 px (the model dominates by far).
Data (../shared/data): the CIFAR-10 test split (zero-shot) and the Flickr8k test split (retrieval); for vit_b32
the first 1,000 CIFAR-10 test images and the first 100 Flickr8k test images (500 captions), copied byte for byte
into runs/benchmarks/eval_data/ (a ViT-B/32 pass over all 5,000 Flickr8k captions takes minutes on 2 cores).

Each cell (size, dataset, precision) runs three things, each in a fresh process, in an order that rotates
from repeat to repeat, `--repeats` times (the median is kept):
- mmcl: the whole `python -m mmcl eval zeroshot|retrieval ...` command (batch 256, workers = min(2, shards),
  `--amp` for bf16, mmcl's own thread policy);
- clip_benchmark: its whole CLI (benchmarks/clip_benchmark_cli.py: its `eval` command with `accuracy()`
  patched for numpy 2), same batch and workers, `--no_amp` for fp32 (its default, amp, is bf16 on a CPU);
- ceiling: benchmarks/eval_ceiling.py, the same model on the same inputs already in memory, with the threads
  mmcl's policy gives it.
Reported: the whole command's seconds (process start to exit), images/s of the evaluation itself (from
reading the data to the metrics; model loading excluded; for the ceiling, the model's work only), and the
metrics: mmcl against clip_benchmark at the same precision, and bf16 against fp32 for each tool.
Results: benchmarks/results/eval_vs_clip_benchmark.json, written after every cell; cells already there are
kept unless --redo, so an interrupted run resumes, and `--sizes` runs the sizes one at a time.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TINY = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
SMALL = {"embed_dim": 192,
         "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 192, "layers": 4, "head_width": 64},
         "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 192, "heads": 3, "layers": 4}}
# size -> (model config or open_clip architecture name, [(dataset, first N test images or None)])
SIZES = {"tiny32": (TINY, [("cifar10", None), ("flickr8k", None)]),
         "small64": (SMALL, [("cifar10", None), ("flickr8k", None)]),
         "vit_b32": ("ViT-B-32", [("cifar10", 1000), ("flickr8k", 100)])}
TASKS = {"cifar10": "zeroshot_classification", "flickr8k": "zeroshot_retrieval"}
TOOLS = ("clip_benchmark", "mmcl", "ceiling")
BATCH, RECALL_K = 256, (1, 5, 10)
EVAL_DATA = common.WORK / "eval_data"
RESULTS = "eval_vs_clip_benchmark.json"


def export_model(size: str, folder: Path) -> str:
    """The size's model, seeded, as an open_clip `local-dir:` export (made once)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    cfg = SIZES[size][0]
    cfg = open_clip.get_model_config(cfg) if isinstance(cfg, str) else cfg
    if not (folder / "open_clip_config.json").is_file():
        torch.manual_seed(0)
        model = open_clip.CLIP(**cfg)
        folder.mkdir(parents=True, exist_ok=True)
        weights = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(folder / "open_clip_model.safetensors"))
        (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    return f"local-dir:{folder}"


def first_samples(dataset: str, count: int, shards: int) -> Path:
    """The first `count` test samples of a shared dataset, tar members copied as they are, in `shards` shards."""
    source, out = common.SHARED_DATA / dataset, EVAL_DATA / f"{dataset}_first{count}"
    if (out / "test" / "sizes.json").is_file():
        return out
    members = []
    for url in sorted((source / "test").glob("*.tar"), key=lambda p: int(p.stem)):
        with tarfile.open(url) as tar:
            for info in tar:
                members.append((info, tar.extractfile(info).read()))
        keys = list(dict.fromkeys(info.name.split(".", 1)[0] for info, _ in members))
        if len(keys) > count:
            break
    keep = set(keys[:count])
    members = [(info, data) for info, data in members if info.name.split(".", 1)[0] in keep]
    per_shard = -(-len(members) // shards)
    (out / "test").mkdir(parents=True, exist_ok=True)
    for i in range(shards):
        with tarfile.open(out / "test" / f"{i}.tar", "w", format=tarfile.GNU_FORMAT) as tar:
            for info, data in members[i * per_shard:(i + 1) * per_shard]:
                tar.addfile(info, io.BytesIO(data))
    (out / "test" / "nshards.txt").write_text(f"{shards}\n")
    (out / "test" / "sizes.json").write_text(json.dumps({"samples": count}))
    for extra in ("classnames.txt", "zeroshot_classification_templates.txt", "dataset_type.txt"):
        if (source / extra).is_file():
            (out / extra).write_text((source / extra).read_text())
    return out


def dataset_root(dataset: str, first) -> Path:
    if first is None:
        return common.SHARED_DATA / dataset
    return first_samples(dataset, first, shards=2 if dataset == "cifar10" else 1)


def shard_count(root: Path) -> int:
    return int((root / "test" / "nshards.txt").read_text())


def command(tool: str, model: str, root: Path, task: str, bf16: bool, workers: int, out: Path) -> list:
    if tool == "mmcl":
        name = "zeroshot" if task == "zeroshot_classification" else "retrieval"
        return [sys.executable, "-m", "mmcl", "eval", name, "--model", model, "--data", str(root), "--batch-size",
                str(BATCH), "--workers", str(workers), "--no-progress", "--out", str(out)] + \
            (["--recall-k", *map(str, RECALL_K)] if name == "retrieval" else []) + (["--amp"] if bf16 else [])
    if tool == "clip_benchmark":
        return [sys.executable, str(common.BENCH / "clip_benchmark_cli.py"), "eval", "--dataset",
                f"wds/{root.name}", "--dataset_root", str(root), "--model", model, "--pretrained", "", "--task",
                task, "--batch_size", str(BATCH), "--num_workers", str(workers), "--recall_k", *map(str, RECALL_K),
                "--output", str(out / "result.json"), "--quiet"] + ([] if bf16 else ["--no_amp"])
    return [sys.executable, str(common.BENCH / "eval_ceiling.py"), "--model", model, "--data", str(root), "--task",
            task, "--batch-size", str(BATCH), "--workers", str(workers)] + (["--amp"] if bf16 else [])


def read_run(tool: str, out: Path, stdout: str, images: int) -> dict:
    """(eval seconds, metrics) of a finished run from what the tool wrote."""
    if tool == "mmcl":
        record = json.loads(next(out.glob("*.json")).read_text())
        return {"eval_seconds": record["mmcl"]["seconds"], "metrics": record["metrics"],
                "threads": record["mmcl"].get("threads")}
    if tool == "clip_benchmark":
        seconds = json.loads((out / "timing.json").read_text())["eval_seconds"]
        return {"eval_seconds": seconds, "metrics": json.loads((out / "result.json").read_text())["metrics"]}
    return {"eval_seconds": json.loads(stdout.strip().splitlines()[-1])["seconds"], "metrics": {}}


def timed_run(tool: str, model: str, root: Path, task: str, bf16: bool, images: int) -> dict:
    """One fresh process of `tool`; its whole wall time, its evaluation's images/s, its metrics."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        cmd = command(tool, model, root, task, bf16, min(2, shard_count(root)), out)
        load = os.getloadavg()[0]
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=common.REPO, capture_output=True, text=True,
                              env=common.child_env(CB_TIMING=str(out / "timing.json")))
        whole = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-3000:]}")
        run = read_run(tool, out, done.stdout, images)
    run.update(whole_seconds=whole, images_per_s=images / run["eval_seconds"], load_average=round(load, 2))
    return run


def max_difference(ours: dict, theirs: dict) -> float:
    """Largest |difference| over the metrics both have (NaN equals NaN)."""
    diffs = [abs(ours[k] - v) for k, v in theirs.items()
             if k in ours and not (v is None or ours[k] is None or (math.isnan(v) and math.isnan(ours[k])))]
    return max(diffs, default=0.0)


def summarize_cell(runs: dict, images: int) -> dict:
    cell = {"images": images}
    for tool, rs in runs.items():
        cell[tool] = {"whole_seconds": common.summarize([r["whole_seconds"] for r in rs]),
                      "images_per_s": common.summarize([r["images_per_s"] for r in rs]),
                      "load_average": [r["load_average"] for r in rs], "metrics": rs[0]["metrics"]}
    cell["mmcl"]["threads"] = runs["mmcl"][0].get("threads")
    ips = {tool: cell[tool]["images_per_s"]["median"] for tool in runs}
    whole = {tool: cell[tool]["whole_seconds"]["median"] for tool in runs}
    cell["speedup_images_per_s"] = ips["mmcl"] / ips["clip_benchmark"]
    cell["speedup_whole_command"] = whole["clip_benchmark"] / whole["mmcl"]
    cell["of_ceiling"] = ips["mmcl"] / ips["ceiling"]
    cell["metric_difference"] = max_difference(runs["mmcl"][0]["metrics"], runs["clip_benchmark"][0]["metrics"])
    cell["mmcl_metrics_same_every_repeat"] = all(r["metrics"] == runs["mmcl"][0]["metrics"] for r in runs["mmcl"])
    return cell


def run_cell(size: str, model: str, dataset: str, first, precision: str, repeats: int) -> dict:
    root = dataset_root(dataset, first)
    images = first or common.split_samples(root, "test")
    runs = {tool: [] for tool in TOOLS}
    for repeat in range(repeats):
        order = TOOLS[repeat % 3:] + TOOLS[:repeat % 3]
        for tool in order:
            common.say(f"{size} {dataset} {precision} repeat {repeat + 1}/{repeats}: {tool}")
            runs[tool].append(timed_run(tool, model, root, TASKS[dataset], precision == "bf16", images))
    cell = summarize_cell(runs, images)
    cell.update(size=size, dataset=dataset, precision=precision, data=str(root), task=TASKS[dataset],
                workers=min(2, shard_count(root)), runs=runs)
    return cell


def add_drift(cells: dict) -> None:
    """bf16 against fp32, per tool: the largest difference over CLIP_benchmark's metrics (the cost of autocast;
    mmcl's extra metrics, ranks, are left out so that both tools are judged on the same numbers)."""
    for key, cell in cells.items():
        if cell["precision"] == "bf16" and key.replace("/bf16", "/fp32") in cells:
            fp32 = cells[key.replace("/bf16", "/fp32")]
            shared = fp32["clip_benchmark"]["metrics"]
            cell["bf16_drift"] = {tool: max_difference({k: cell[tool]["metrics"][k] for k in shared},
                                                       {k: fp32[tool]["metrics"][k] for k in shared})
                                  for tool in ("mmcl", "clip_benchmark")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    p.add_argument("--datasets", nargs="+", choices=list(TASKS), default=list(TASKS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--redo", action="store_true", help="measure cells that are already in the results again")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args()
    path = common.result_path(args.out)
    report = common.read_json(path) or {}
    cells = report.get("cells", {}) if report.get("version") == 2 else {}
    machine = common.machine_info()  # the load average at the start
    for size in args.sizes:
        model = export_model(size, common.WORK / "eval_models" / size)
        for dataset, first in SIZES[size][1]:
            for precision in args.precisions:
                key = f"{size}/{dataset}/{precision}"
                if dataset not in args.datasets or (key in cells and not args.redo):
                    continue
                cells[key] = run_cell(size, model, dataset, first, precision, args.repeats)
                add_drift(cells)
                common.write_json(args.out, {"version": 2, "machine": machine, "batch_size": BATCH,
                                             "repeats": args.repeats, "cells": cells})
    print(table(cells))


def table(cells: dict) -> str:
    lines = ["| model | data (test) | precision | mmcl img/s | clip_benchmark img/s | speedup | whole command "
             "mmcl / clip_benchmark | ceiling img/s | mmcl / ceiling | metric diff | bf16 drift mmcl / cb |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for cell in cells.values():
        med = {tool: cell[tool]["images_per_s"]["median"] for tool in TOOLS}
        whole = {tool: cell[tool]["whole_seconds"]["median"] for tool in TOOLS}
        drift = cell.get("bf16_drift")
        lines.append(
            f"| {cell['size']} | {cell['dataset']} ({cell['images']:,}) | {cell['precision']} | {med['mmcl']:,.0f} | "
            f"{med['clip_benchmark']:,.0f} | {cell['speedup_images_per_s']:.2f}x | {whole['mmcl']:.1f} s / "
            f"{whole['clip_benchmark']:.1f} s ({cell['speedup_whole_command']:.2f}x) | {med['ceiling']:,.0f} | "
            f"{cell['of_ceiling']:.2f} | {cell['metric_difference']:.1e} | "
            + (f"{drift['mmcl']:.1e} / {drift['clip_benchmark']:.1e} |" if drift else "- |"))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
