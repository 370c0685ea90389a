"""Learning in a fixed wall-clock budget: mmcl vs open_clip_train, both judged by the same evaluator.

    python benchmarks/learning_budget.py [--tasks digits flickr8k] [--digits-budget 90 240] [--flickr-budget 420]

For each task both trainers get the same budget of wall-clock seconds for the whole training process
(start-up included, evaluation excluded), the same model config, shards, batch size, precision, worker count
and optimizer hyperparameters (the mmcl recipe's lr, weight decay, warmup, betas, eps, gradient clipping).
What differs is what each trainer does by default: caption sampling, crop, parameter groups, and its speed.

1. Calibrate: right before its own run, a short run of the trainer (4 + 8 steps) measures its samples/s and
   its start-up + tear-down seconds (--calibration-runs > 1 takes medians).
2. Plan: each trainer's schedule (warmup + cosine) is set for the steps it can take in 92% of the budget.
3. Train: a run still going when the budget ends is stopped and its newest complete checkpoint is judged
   (both save every epoch-length of steps: open_clip_train at its epoch ends, mmcl with save_every). The
   seconds each used are reported: a busy machine can make a run slower or faster than its calibration.
4. Judge: both checkpoints become open_clip `local-dir:` exports and are scored by `mmcl eval all`;
   clip_benchmark scores the same exports as a cross-check (--cross-check).
5. Time to accuracy (--curve, on): every saved checkpoint of both runs of the longest digits budget is
   scored, and the time each trainer needed to reach zero-shot top-1 0.5, 0.75 and 0.9 is reported
   (benchmarks/accuracy_curve.py).

The digits get two budgets (90 s and 240 s by default): both trainers end near the task's ceiling (~0.95)
within 240 s, so the short budget is the one that tells how fast each learns.

Tasks: `digits` (digits_clip_tiny; zero-shot top-1 on the held-out digits) and `flickr8k`
(flickr8k_clip_tiny at 64 px; Flickr8k test retrieval R@1/5/10 both ways and CIFAR-10 zero-shot top-1).
"mmcl ahead" counts as clear when the difference exceeds two binomial standard errors.

Writes benchmarks/results/learning_budget.json.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import accuracy_curve  # noqa: E402
import openclip_anchor  # noqa: E402
import train_throughput as tt  # noqa: E402

SAFETY = 0.92  # each schedule is planned for this share of the budget
GRACE = 1.0  # a run is stopped at this multiple of the budget (--grace); its time used is reported either way
TASKS = {
    "digits": {"recipe": "digits_clip_tiny", "train": common.DIGITS, "eval": [common.DIGITS],
               "metrics": [("digits", "acc1")]},
    "flickr8k": {"recipe": "flickr8k_clip_tiny", "train": common.SHARED_DATA / "flickr8k",
                 "eval": [common.SHARED_DATA / "flickr8k", common.SHARED_DATA / "cifar10"],
                 "metrics": [("flickr8k", f"{d}_retrieval_recall@{k}") for d in ("image", "text") for k in (1, 5, 10)]
                 + [("cifar10", "acc1")]},
}


def task_args(task: dict, budget: float, workdir: Path, args) -> SimpleNamespace:
    """What train_throughput's runners need, for this task's recipe (calibration: 4 + 8 steps, quick 2 + 4)."""
    recipe = tt.load_recipe(task["recipe"], [])
    every = 2 if args.quick else 4
    return SimpleNamespace(recipe=task["recipe"], recipe_path=str(common.REPO / "recipes" / f"{task['recipe']}.yaml"),
                           batch_size=recipe.train.batch_size, workers=recipe.data.workers, warmup=every,
                           steps=2 * every, log_every=every, budget=budget, workdir=workdir, recipe_obj=recipe,
                           mmcl_threads=args.mmcl_threads, grace=args.grace)


def mmcl_env(args) -> dict:
    return {"OMP_NUM_THREADS": str(args.mmcl_threads)} if args.mmcl_threads else {}


def calibrate_once(args: SimpleNamespace, name: str, data: Path, model_cfg: dict, repeat: int) -> dict:
    """One short run: samples/s after warm-up, and the seconds the process spends outside its steps."""
    tag = f"calibrate_{Path(args.recipe).stem}_{name}_r{repeat}"
    if name == "mmcl":
        result = tt.run_mmcl(args, data, tag, mmcl_env(args))
    else:
        result = tt.run_openclip(args, data, tag, model_cfg, args.recipe_obj)
    steps_time = (args.warmup + args.steps) * args.batch_size / result["samples_per_s"]
    return {"samples_per_s": result["samples_per_s"], "overhead_seconds": max(0.0, result["process_seconds"] - steps_time)}


def calibrate(args: SimpleNamespace, name: str, data: Path, model_cfg: dict, repeats: int) -> dict:
    """`repeats` short runs of one trainer: median samples/s and overhead, and the steps they plan."""
    found = []
    for repeat in range(repeats):
        common.say(f"budget {Path(args.recipe).stem}: calibrating {name}")
        found.append(calibrate_once(args, name, data, model_cfg, repeat))
    rate = common.summarize([r["samples_per_s"] for r in found])
    overhead = common.summarize([r["overhead_seconds"] for r in found])
    return {"samples_per_s": rate, "overhead_seconds": overhead,
            "planned_steps": planned_steps(args, rate["median"], overhead["median"])}


def planned_steps(args: SimpleNamespace, rate: float, overhead: float) -> int:
    usable = args.budget * SAFETY - overhead
    return max(10, int(usable * rate / args.batch_size))


def train_mmcl(args: SimpleNamespace, data: Path, steps: int, interval: int) -> dict:
    out = args.workdir / "mmcl_run"
    overrides = [f"data.train=[{data}]", f"train.output_dir={out}", f"train.max_steps={steps}", "train.epochs=100000",
                 f"train.save_every={interval}", "train.keep_last=100000", "train.resume=none", "train.progress=false",
                 "eval.datasets=[]", "eval.retrieval=[]"]
    log = args.workdir / "mmcl_train.log"
    started_at = time.time()
    result = common.run_logged([sys.executable, "-m", "mmcl", "train", args.recipe_path, *overrides], log,
                               env=common.child_env(**mmcl_env(args)), deadline=args.budget * args.grace)
    common.check_ok(result, log, "mmcl train")
    from mmcl import runs

    done = runs.latest_checkpoint(out)
    if done is None:
        return {**result, "steps_done": 0, "export": None}
    result.update(run_dir=str(out), started_at=started_at)
    export = args.workdir / "mmcl_export"
    subprocess.run([sys.executable, "-m", "mmcl", "export", str(out), "--out", str(export)], cwd=common.REPO,
                   check=True, capture_output=True, env=common.child_env())
    return {**result, "steps_done": int(done.name.split("_")[1]), "export": str(export)}


def train_openclip(args: SimpleNamespace, data: Path, steps: int, model_cfg: dict) -> dict:
    """Epochs of about one pass each, sized so that epochs x batches = the planned steps."""
    model_dir = openclip_anchor.write_model_config(args.workdir / "openclip_models", "bench-model", model_cfg)
    full = -(-common.split_samples(data) // args.batch_size)
    epochs = max(1, round(steps / full))
    o = args.recipe_obj.optim
    run = openclip_anchor.AnchorRun(
        model_dir=model_dir, model_name="bench-model", data_root=data,
        samples_per_epoch=-(-steps // epochs) * args.batch_size, epochs=epochs, batch_size=args.batch_size,
        workers=args.workers, logs=args.workdir, name="openclip_run", lr=o.lr, weight_decay=o.weight_decay,
        warmup=o.warmup_steps, betas=tuple(o.betas), eps=o.eps, grad_clip=o.grad_clip, log_every=10)
    tt.remove_tree(run.run_dir)
    log = args.workdir / "openclip_train.log"
    started_at = time.time()
    result = common.run_logged(run.command(), log, env=openclip_anchor.env(), deadline=args.budget * args.grace)
    common.check_ok(result, log, "open_clip_train")
    checkpoint = openclip_anchor.latest_checkpoint(run)
    if checkpoint is None:
        return {**result, "steps_done": 0, "epochs": epochs, "export": None}
    result.update(run_dir=str(run.run_dir), started_at=started_at)
    export = openclip_anchor.export_checkpoint(checkpoint, model_cfg, args.workdir / "openclip_export")
    done = int(checkpoint.stem.split("_")[1]) * run.steps_per_epoch()
    return {**result, "steps_done": done, "epochs": epochs, "steps_per_epoch": run.steps_per_epoch(),
            "export": str(export)}


def evaluate(export: str, datasets: List[Path], out: Path) -> Dict[str, dict]:
    """`mmcl eval all` on a local-dir export: {dataset name: its CLIP_benchmark-schema JSON}."""
    cmd = [sys.executable, "-m", "mmcl", "eval", "all", "--model", f"local-dir:{export}", "--data",
           *map(str, datasets), "--out", str(out), "--no-progress", "--device", "cpu"]
    log = out.with_suffix(".log")
    common.check_ok(common.run_logged(cmd, log), log, "mmcl eval all")
    results = {}
    for path in sorted(out.glob("*_zeroshot_*.json")):
        data = json.loads(path.read_text())
        results[path.stem.rsplit("_zeroshot", 1)[0]] = data
    return results


def cross_check(export: str, datasets: List[Path], mmcl_results: Dict[str, dict]) -> dict:
    """clip_benchmark on the same export and data (its own CLI, fp32, run as eval_vs_clip_benchmark.py runs it:
    its dataset builder, loader and metrics, numpy-2 patch included); the largest metric difference per dataset."""
    import eval_vs_clip_benchmark as evcb

    diffs = {}
    for root in datasets:
        task = mmcl_results[root.name]["task"]
        theirs = evcb.timed_run("clip_benchmark", f"local-dir:{export}", root, task, bf16=False, images=1)["metrics"]
        ours = mmcl_results[root.name]["metrics"]
        diffs[root.name] = max(abs(ours[k] - v) for k, v in theirs.items() if is_number(v) and is_number(ours.get(k)))
    return diffs


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


def standard_error(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def query_count(result: dict, metric: str) -> int:
    """Images for accuracy and image->text recall; captions (5 per Flickr8k image) for text->image recall."""
    images = result.get("mmcl", {}).get("samples", 1000)
    return images * 5 if metric.startswith("image_retrieval") else images


def compare(task: dict, mmcl: Dict[str, dict], anchor: Dict[str, dict]) -> List[dict]:
    """One row per metric; a trainer with no checkpoint inside the budget scores None (not ahead)."""
    rows = []
    for dataset, metric in task["metrics"]:
        ours = mmcl[dataset]["metrics"][metric] if dataset in mmcl else None
        theirs = anchor[dataset]["metrics"][metric] if dataset in anchor else None
        row = {"dataset": dataset, "metric": metric, "mmcl": ours, "open_clip_train": theirs}
        if ours is None or theirs is None:
            rows.append({**row, "difference": None, "two_standard_errors": None, "ahead": theirs is None and ours is not None,
                         "clearly_ahead": theirs is None and ours is not None})
            continue
        n = query_count(mmcl[dataset], metric)
        se = math.hypot(standard_error(ours, n), standard_error(theirs, n))
        rows.append({**row, "difference": ours - theirs, "two_standard_errors": 2 * se, "queries": n,
                     "ahead": ours > theirs, "clearly_ahead": ours - theirs > 2 * se})
    return rows


def judge(info: dict, task: dict, workdir: Path, trainer: str, cross: str) -> Dict[str, dict]:
    """Evaluate one trainer's export (and cross-check it); {} when it saved nothing inside the budget."""
    if not info.get("export"):
        info["metrics"] = None
        return {}
    results = evaluate(info["export"], task["eval"], workdir / f"eval_{trainer}")
    info["metrics"] = {ds: r["metrics"] for ds, r in results.items()}
    if cross:
        checked = task["eval"] if cross == "all" else task["eval"][:1]
        info["clip_benchmark_max_difference"] = cross_check(info["export"], checked, results)
    return results


def run_task(key: str, name: str, budget: float, args, order: List[str], curve: bool) -> dict:
    task, workdir = TASKS[name], common.WORK / "budget" / key
    tt.remove_tree(workdir)
    workdir.mkdir(parents=True)
    data = common.ensure_digits(task["train"]) if name == "digits" else task["train"]
    targs = task_args(task, budget, workdir, args)
    from mmcl.models.factory import resolve_model_cfg

    model_cfg = resolve_model_cfg(targs.recipe_obj.model)
    trainers = {"mmcl": {}, "open_clip_train": {}}
    interval = openclip_anchor.steps_per_epoch(common.split_samples(data), targs.batch_size, targs.workers)
    for trainer in order:  # calibrated right before its own run: the neighbours' load drifts over minutes
        calibration = calibrate(targs, trainer, data, model_cfg, args.calibration_runs)
        steps = calibration["planned_steps"]
        trainers[trainer].update(calibration=calibration, planned_steps=steps)
        common.say(f"budget {name}: training {trainer} for {steps} steps within {budget:.0f} s")
        run = train_mmcl(targs, data, steps, interval) if trainer == "mmcl" else train_openclip(targs, data, steps, model_cfg)
        run["over_budget"] = run["seconds"] > budget * 1.02
        trainers[trainer].update(run)
    results = {}
    for trainer, info in trainers.items():
        common.say(f"budget {name}: evaluating {trainer} ({info['steps_done']} steps)")
        results[trainer] = judge(info, task, workdir, trainer, args.cross_check)
    rows = compare(task, results["mmcl"], results["open_clip_train"])
    curve = accuracy_over_time(key, trainers, model_cfg, data, workdir) if curve else {}
    return {"time_to_accuracy": curve,"recipe": task["recipe"], "budget_seconds": budget, "batch_size": targs.batch_size,
            "mmcl_threads": args.mmcl_threads or "torch default",
            "workers": targs.workers, "trainers": trainers, "comparison": rows,
            "all_clearly_ahead": all(r["clearly_ahead"] for r in rows), "all_ahead": all(r["ahead"] for r in rows)}


def accuracy_over_time(name: str, trainers: dict, model_cfg: dict, data: Path, workdir: Path) -> dict:
    """The zero-shot curve of every saved checkpoint and the time each trainer needs to reach each target."""
    ours, theirs = trainers["mmcl"], trainers["open_clip_train"]
    if not ours.get("run_dir") or not theirs.get("run_dir"):
        return {}
    common.say(f"budget {name}: scoring every checkpoint of both trainers")
    return accuracy_curve.curve_summary(Path(ours["run_dir"]), ours["started_at"], Path(theirs["run_dir"]),
                                        theirs["started_at"], theirs["steps_per_epoch"], model_cfg, data, workdir)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--digits-budget", type=float, nargs="+", default=[90.0, 240.0],
                   help="seconds per trainer; several give one comparison each (the longest also gets the "
                        "time-to-accuracy curve, see --curve)")
    p.add_argument("--flickr-budget", type=float, default=420.0, help="seconds per trainer")
    p.add_argument("--cross-check", choices=["first", "all", ""], default="first",
                   help="clip_benchmark on the first eval dataset of each task (default), all, or none")
    p.add_argument("--first", choices=["mmcl", "open_clip_train"], default="mmcl", help="which trains first on the first task (the order alternates by task)")
    p.add_argument("--calibration-runs", type=int, default=1)
    p.add_argument("--grace", type=float, default=GRACE, help="stop runs at this multiple of the budget")
    p.add_argument("--mmcl-threads", type=int, default=None,
                   help="OMP_NUM_THREADS for mmcl's runs (default: torch's default, as shipped)")
    p.add_argument("--curve", action=argparse.BooleanOptionalAction, default=True,
                   help="score every checkpoint of the longest digits run (time to accuracy)")
    p.add_argument("--merge", action="store_true", help="update the tasks of an existing --out file")
    p.add_argument("--quick", action="store_true", help="budgets of 120 s (digits) and 150 s (flickr8k)")
    p.add_argument("--out", default="learning_budget.json")
    return p.parse_args(argv)


def plan_runs(args) -> List[tuple]:
    """(key, task, budget, with the accuracy curve) of every comparison to run, in order."""
    runs = []
    for name in args.tasks:
        if name == "digits":
            budgets = sorted(args.digits_budget)
            for budget in budgets:
                key = "digits" if len(budgets) == 1 else f"digits_{budget:.0f}s"
                runs.append((key, name, budget, args.curve and budget == budgets[-1]))
        else:
            runs.append((name, name, args.flickr_budget, False))
    return runs


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.quick:
        args.digits_budget, args.flickr_budget = [120.0], 150.0
    openclip_anchor.ensure_env()
    machine = common.machine_info()
    first = ["mmcl", "open_clip_train"] if args.first == "mmcl" else ["open_clip_train", "mmcl"]
    tasks = {}
    for i, (key, name, budget, curve) in enumerate(plan_runs(args)):
        tasks[key] = run_task(key, name, budget, args, first if i % 2 == 0 else first[::-1], curve)
    previous = common.read_json(common.result_path(args.out)) if args.merge else None
    if previous:  # keep the other tasks' results; this run's tasks replace theirs (any budget)
        kept = {k: v for k, v in previous.get("tasks", {}).items() if k.split("_")[0] not in args.tasks}
        tasks = {**kept, **tasks}
    report = {"machine": machine, "safety": SAFETY, "tasks": tasks, "notes": NOTES}
    path = common.write_json(args.out, report)
    common.say(f"wrote {path}")
    return report


NOTES = [
    ("Same optimizer hyperparameters for both (the mmcl recipe's); open_clip_train tokenizes the whole txt "
     "(caption lines joined, truncated), mmcl samples one caption line per image each time it is seen."),
    "Each trainer's step count is planned from its own calibrated samples/s: a faster trainer takes more steps.",
]


if __name__ == "__main__":
    main()
