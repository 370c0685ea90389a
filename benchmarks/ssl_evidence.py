"""Evidence for the SSL objectives on real data, CPU-sized.

1. CIFAR-10 (../shared/data/cifar10): train `cifar10_simclr_tiny` and `cifar10_moco_tiny` as shipped, then
   kNN (k=20, cosine, exp(s/0.07) votes) and a logistic-regression linear probe on the frozen
   `encode_image` features, fitted on the train split (10,000) and scored on all 10,000 test images; the
   baseline is the same tower at its random initialisation (the trainer's seed, so the runs' starting point).
2. Flickr8k (../shared/data/flickr8k): `flickr8k_slip_tiny` against the same recipe with objective.name=clip
   (same towers, data, steps and seed), scored by retrieval recall@1/5/10 on the 1,000 test images and
   5,000 captions (CLIP_benchmark's definitions), with the untrained towers as the floor. Their image towers
   also get the CIFAR-10 kNN / linear probe of (1): SLIP's claim is a better image representation.

Writes benchmarks/results/ssl_evidence.json and the table in README.md (between the evidence markers).
Training runs go through the CLI (`python -m mmcl train`), one after the other, into runs/benchmarks/ssl/.

    python benchmarks/ssl_evidence.py [--only simclr,moco,slip,clip] [--reuse] [--max-steps N]
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from accelerate.utils import set_seed

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks are plain scripts next to their shared helpers)

import mmcl.eval as mmcl_eval  # noqa: E402
from mmcl.config import load_recipe  # noqa: E402
from mmcl import load_model  # noqa: E402
from mmcl.models import build_model, eval_preprocess, make_tokenizer  # noqa: E402
from mmcl.trainer.logs import read_metrics  # noqa: E402

CIFAR = common.SHARED_DATA / "cifar10"
FLICKR = common.SHARED_DATA / "flickr8k"
RUNS = common.WORK / "ssl"
DOC = common.REPO / "README.md"
START, END = "<!-- ssl-evidence:start -->", "<!-- ssl-evidence:end -->"
# name -> (recipe, extra overrides, evaluation dataset, task)
RUN_SPECS = {
    "simclr": ("cifar10_simclr_tiny", [], CIFAR, "linear_probe"),
    "moco": ("cifar10_moco_tiny", [], CIFAR, "linear_probe"),
    "slip": ("flickr8k_slip_tiny", [], FLICKR, "retrieval"),
    "clip": ("flickr8k_slip_tiny", ["objective.name=clip", "objective.slip=null", "objective.simclr=null"], FLICKR,
             "retrieval"),
}
RETRIEVAL_KEYS = [f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)]
PROBE_KEYS = ["knn_acc1", "knn_acc5", "linear_probe_acc1", "linear_probe_acc5"]


def recipe_path(name: str) -> str:
    return str(common.REPO / "recipes" / f"{name}.yaml")


def run_overrides(name: str, max_steps: Optional[int] = None) -> list:
    """The shipped recipe, with its own output folder, no progress bar and no in-training evaluation."""
    extra = RUN_SPECS[name][1] + ([f"train.max_steps={max_steps}"] if max_steps else [])
    return extra + [f"train.output_dir={RUNS / name}", "train.progress=false", "train.resume=none",
                    "eval.datasets=[]", "eval.every=0"]


def train_run(name: str, reuse: bool, max_steps: Optional[int]) -> dict:
    """Train one recipe through the CLI (from scratch); return steps, seconds and first / last logged loss."""
    run_dir = RUNS / name
    seconds = run_dir / "train_seconds.txt"
    if not (reuse and seconds.is_file()):
        shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl appends: start from an empty folder
        cmd = [sys.executable, "-m", "mmcl", "train", recipe_path(RUN_SPECS[name][0])]
        cmd += run_overrides(name, max_steps)
        common.say(f"training {name}: {' '.join(cmd[3:])}")
        result = common.run_logged(cmd, RUNS / f"{name}.log")
        common.check_ok(result, RUNS / f"{name}.log", f"training {name}")
        seconds.write_text(f"{result['seconds']:.1f}")
    metrics = [r for r in read_metrics(run_dir) if r.get("loss") is not None]
    return {"steps": metrics[-1]["step"], "train_seconds": float(seconds.read_text()),
            "first_loss": metrics[0]["loss"], "final_loss": metrics[-1]["loss"],
            "samples_per_s": sum(r["samples_per_s"] for r in metrics[1:]) / max(1, len(metrics) - 1)}


def untrained(name: str):
    """The towers exactly as the trainer initialises them for this recipe (same seed, same build)."""
    recipe = load_recipe(recipe_path(RUN_SPECS[name][0]), run_overrides(name))
    set_seed(recipe.train.seed)
    model, model_cfg = build_model(recipe.model)
    return model.eval(), eval_preprocess(model), make_tokenizer(model_cfg)


def evaluate(towers: tuple, root: Path, task: str) -> dict:
    """Retrieval or probe metrics on root's test split; Flickr8k towers also get a CIFAR-10 probe."""
    model, preprocess, tokenizer = towers
    start = time.perf_counter()
    result = mmcl_eval.evaluate_dataset(model, preprocess, tokenizer if task == "retrieval" else None, str(root),
                                        split="test", task=task, batch_size=500)
    keys = RETRIEVAL_KEYS if task == "retrieval" else PROBE_KEYS
    out = {**{k: result["metrics"][k] for k in keys}, "test_samples": result["samples"],
           "eval_seconds": time.perf_counter() - start}
    if task == "retrieval":  # how well the image tower transfers: SLIP's claim is a better image tower
        probe = mmcl_eval.evaluate_dataset(model, preprocess, None, str(CIFAR), split="test",
                                           task="linear_probe", batch_size=500)
        out.update({f"cifar10_{k}": probe["metrics"][k] for k in PROBE_KEYS})
    return out


def run_all(names: list, reuse: bool, max_steps: Optional[int]) -> dict:
    out = {"cifar10": {}, "flickr8k": {}}
    for name in names:
        _, _, root, task = RUN_SPECS[name]
        group = out["cifar10" if root == CIFAR else "flickr8k"]
        if "untrained" not in group:
            common.say(f"evaluating the untrained towers on {root.name}")
            group["untrained"] = evaluate(untrained(name), root, task)
        train = train_run(name, reuse, max_steps)
        common.say(f"evaluating {name}")
        group[name] = {**evaluate(load_model(str(RUNS / name)), root, task), **train}
        common.say(f"{name}: {group[name]}")
    return out


def standard_error(p: float, n: int) -> float:
    """Binomial standard error of a recall or accuracy p measured on n queries."""
    return math.sqrt(p * (1 - p) / n)


def pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def markdown(results: dict, machine: dict) -> str:
    lines = ["CIFAR-10 test (10,000 images; kNN and linear probe fitted on the 10,000 train images), frozen "
             "`encode_image` features:", "",
             "| image tower | steps | train time | kNN top-1 | kNN top-5 | linear top-1 | linear top-5 |",
             "|---|---|---|---|---|---|---|"]
    for name, row in results["cifar10"].items():
        label = {"untrained": "random init (same seed)", "simclr": "`cifar10_simclr_tiny`",
                 "moco": "`cifar10_moco_tiny`"}[name]
        time_s = f"{row['train_seconds'] / 60:.1f} min" if "train_seconds" in row else "-"
        lines.append(f"| {label} | {row.get('steps', 0)} | {time_s} | {pct(row['knn_acc1'])} | "
                     f"{pct(row['knn_acc5'])} | {pct(row['linear_probe_acc1'])} | {pct(row['linear_probe_acc5'])} |")
    lines += ["", "Flickr8k test retrieval (1,000 images, 5,000 captions), same recipe, steps and seed; the last two "
              "columns probe the image tower on CIFAR-10 as above:", "",
              "| objective | steps | train time | text->image R@1 | R@5 | R@10 | image->text R@1 | R@5 | R@10 "
              "| CIFAR-10 kNN | CIFAR-10 linear |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in results["flickr8k"].items():
        label = {"untrained": "random init", "clip": "CLIP only", "slip": "SLIP (CLIP + SimCLR)"}[name]
        time_s = f"{row['train_seconds'] / 60:.1f} min" if "train_seconds" in row else "-"
        recalls = " | ".join(pct(row[k]) for k in RETRIEVAL_KEYS)
        lines.append(f"| {label} | {row.get('steps', 0)} | {time_s} | {recalls} | {pct(row['cifar10_knn_acc1'])} | "
                     f"{pct(row['cifar10_linear_probe_acc1'])} |")
    if "clip" in results["flickr8k"]:
        clip = results["flickr8k"]["clip"]
        lines += ["", "One binomial standard error at CLIP's values: text->image R@10 "
                  f"{pct(standard_error(clip['image_retrieval_recall@10'], 5000))}, image->text R@10 "
                  f"{pct(standard_error(clip['text_retrieval_recall@10'], 1000))}, CIFAR-10 top-1 "
                  f"{pct(standard_error(clip['cifar10_knn_acc1'], 10000))} points."]
    lines += ["", f"Accuracies and recalls in %. Machine: {machine['cpu']}, {machine['cores']} cores shared with "
              f"other jobs (load average {machine['load_average'][0]} at the end), torch {machine['torch']}; "
              f"`python benchmarks/ssl_evidence.py`, {machine['date'][:10]}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(RUN_SPECS), help="runs to do, comma-separated")
    parser.add_argument("--reuse", action="store_true", help="evaluate finished runs instead of retraining")
    parser.add_argument("--max-steps", type=int, default=None, help="cut every run short (a smoke test only)")
    args = parser.parse_args()
    names = [n for n in RUN_SPECS if n in args.only.split(",")]
    torch.manual_seed(0)
    start = time.perf_counter()
    results = run_all(names, args.reuse, args.max_steps)
    machine = common.machine_info()
    payload = {"results": results, "total_seconds": time.perf_counter() - start, "machine": machine,
               "reused_runs": args.reuse,  # then total_seconds is evaluation only; see each run's train_seconds
               "runs": {n: {"recipe": RUN_SPECS[n][0], "overrides": run_overrides(n, args.max_steps)}
                        for n in names}}
    common.say(f"wrote {common.write_json('ssl_evidence.json', payload)}")
    common.write_doc_section(DOC, START, END, markdown(results, machine))
    common.say(f"updated {DOC} ({payload['total_seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
