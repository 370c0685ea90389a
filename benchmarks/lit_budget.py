"""A model that transfers, trained on a CPU in 10 minutes: LiT (flickr8k_lit) beside CLIP from scratch
(flickr8k_clip_tiny), both judged by CLIP_benchmark 1.6.2's own command line.

    python benchmarks/lit_budget.py [--budget 600] [--only lit scratch] [--ablations] [--quick]

1. `mmcl train flickr8k_lit` from nothing (no cached features) with a wall-clock budget for the whole
   process: start-up, computing the locked towers' features, training, the last checkpoint. A run still
   going at the budget is stopped and its newest checkpoint is judged; the seconds used are reported.
2. `flickr8k_clip_tiny` (both towers from scratch) in the same budget, its schedule planned for the steps it
   can take in 92% of it, as benchmarks/learning_budget.py plans it (a short calibration run first).
3. Each run is exported (`mmcl export`), the export is copied to a fresh folder, and CLIP_benchmark's CLI
   runs from inside the copy (`--model local-dir:.`, fp32 with `--no_amp`): CIFAR-10 test zero-shot top-1
   and Flickr8k test retrieval recall@1/5/10 both ways. clip_benchmark 1.6.2's `accuracy()` fails on
   numpy 2; the CLI runs in a process that patches it first (benchmarks/eval_vs_clip_benchmark.py).
4. `--ablations`: what each choice of the recipe is worth, each variant a run of its own in the same budget
   (features computed again where they change): no feature cache (the locked towers run every step; its
   schedule planned like the from-scratch run), 96 and 160 px instead of 128, MLP heads instead of linear
   ones, and the last group of the image trunk unlocked (trained from the cached output of the rest).

Training holds the CPU lock exclusively (a timing measurement); evaluation shares it.
Targets (the issue's): flickr8k_lit reaches CIFAR-10 top-1 >= 0.30 and Flickr8k recall@5 >= 0.20 both ways.
Writes benchmarks/results/lit_budget.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import learning_budget as lb  # noqa: E402

LOCK, TURNSTILE = Path("/tmp/mmcl-cpu.lock"), Path("/tmp/mmcl-turnstile.lock")
DOCS_BEGIN, DOCS_END = "<!-- lit_budget:begin -->", "<!-- lit_budget:end -->"
WORK = common.WORK / "lit_budget"
DATA = {"cifar10": ("zeroshot_classification", common.SHARED_DATA / "cifar10"),
        "flickr8k": ("zeroshot_retrieval", common.SHARED_DATA / "flickr8k")}
HEADLINE = [("cifar10", "acc1"), ("flickr8k", "image_retrieval_recall@5"), ("flickr8k", "text_retrieval_recall@5")]
TARGETS = {("cifar10", "acc1"): 0.30, ("flickr8k", "image_retrieval_recall@5"): 0.20,
           ("flickr8k", "text_retrieval_recall@5"): 0.20}
# Ablations: each names its settings in full, so a row reproduces under the current recipe (160 px, 10 epochs).
# The first recipe (128 px, 20 epochs) is the base the single changes were measured against.
FIRST = ["model.config.vision_cfg.image_size=128", "train.epochs=20"]
VARIANTS = {  # name -> (overrides of flickr8k_lit, what it changes)
    "128px_20_epochs": (FIRST, "the first recipe: 128 px, 20 epochs (the base of the next five rows)"),
    "no_cache": (["model.cache_locked=false", "model.config.vision_cfg.image_size=128"],
                 "128 px, locked towers run every step (no feature cache), schedule planned for the budget"),
    "96px": ([*FIRST, "model.config.vision_cfg.image_size=96"], "96 px instead of 128"),
    "160px": ([*FIRST, "model.config.vision_cfg.image_size=160"], "160 px instead of 128"),
    "mlp_heads": ([*FIRST, "model.config.vision_cfg.timm_proj=mlp", "model.config.text_cfg.hf_proj_type=mlp"],
                  "MLP heads instead of linear"),
    "unlock_last_group": ([*FIRST, "model.lock_image_unlocked_groups=1"],
                          "the image trunk's last group trains (from the cached output of the rest)"),
    # the schedule: without the cache, 132 steps (6 epochs) beat 460 cached ones (20 epochs): the heads over-fit
    "5_epochs": (["model.config.vision_cfg.image_size=128", "train.epochs=5"], "128 px, 5 epochs"),
    "160px_5_epochs": (["model.config.vision_cfg.image_size=160", "train.epochs=5"], "160 px, 5 epochs"),
    "160px_10_epochs": (["model.config.vision_cfg.image_size=160", "train.epochs=10"],
                        "160 px, 10 epochs: the settings the recipe took (a separate run)"),
}


@contextlib.contextmanager
def cpu_lock(exclusive: bool):
    """The machine's fair CPU lock (what /usr/local/bin/flock does for `flock -s|-x /tmp/mmcl-cpu.lock`):
    exclusive holds the turnstile, so no new shared job starts, and waits up to 120 s for the running ones;
    shared passes the turnstile and holds the lock shared."""
    with open(TURNSTILE, "a") as turn, open(LOCK, "a") as lock:
        if exclusive:
            fcntl.flock(turn, fcntl.LOCK_EX)
            deadline = time.time() + 120
            while time.time() < deadline:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(lock, fcntl.LOCK_UN)
                    break
                except BlockingIOError:
                    time.sleep(1)
        else:
            fcntl.flock(turn, fcntl.LOCK_SH)
            fcntl.flock(turn, fcntl.LOCK_UN)
            fcntl.flock(lock, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(turn, fcntl.LOCK_UN)
            fcntl.flock(lock, fcntl.LOCK_UN)


def lit_overrides(out: Path, extra: List[str]) -> List[str]:
    return [f"train.output_dir={out}", "train.resume=none", "train.progress=false", "train.save_every=46",
            "train.keep_last=1", "eval.datasets=[]", "eval.retrieval=[]", *extra]


def train_lit(name: str, extra: List[str], budget: float) -> dict:
    """One flickr8k_lit run from nothing (its feature cache removed first) in the budget."""
    out = WORK / name
    shutil.rmtree(out, ignore_errors=True)
    log = WORK / f"{name}_train.log"
    cmd = [sys.executable, "-m", "mmcl", "train", "flickr8k_lit", *lit_overrides(out, extra)]
    common.say(f"lit budget: training {name} ({budget:.0f} s budget)")
    with cpu_lock(exclusive=True):
        load = os.getloadavg()[0]
        result = common.run_logged(cmd, log, deadline=budget)
    common.check_ok(result, log, f"mmcl train flickr8k_lit ({name})")
    return {**result, "load_average_at_start": load, **run_facts(out)}


def run_facts(out: Path) -> dict:
    """Steps done, and the seconds each locked tower's features took (their meta.json)."""
    from mmcl import runs

    latest = runs.latest_checkpoint(out)
    facts = {"run_dir": str(out), "steps_done": runs.read_meta(latest)["step"] if latest else 0}
    for meta in sorted((out / "locked_features").glob("*/meta.json")):
        data = json.loads(meta.read_text())
        facts[f"cache_{meta.parent.name}_seconds"] = data["seconds"]
        facts[f"cache_{meta.parent.name}_cut"] = data["cut"]
    return facts


def train_planned(name: str, recipe: str, extra: List[str], budget: float, args) -> dict:
    """A run whose schedule is planned for the budget from a calibration run (learning_budget's rule)."""
    workdir = WORK / name
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    task = {"recipe": recipe}
    targs = lb.task_args(task, budget, workdir, args)
    targs.recipe_path = write_recipe(recipe, extra, workdir) if extra else targs.recipe_path
    data = common.SHARED_DATA / "flickr8k"
    with cpu_lock(exclusive=True):
        load = os.getloadavg()[0]
        calibration = lb.calibrate(targs, "mmcl", data, {}, 1)
        steps = calibration["planned_steps"]
        common.say(f"lit budget: training {name}, {steps} steps planned")
        result = lb.train_mmcl(targs, data, steps, interval=max(10, steps // 4))
    return {**result, "planned_steps": steps, "calibration": calibration, "load_average_at_start": load,
            "export_dir": result.get("export")}


def write_recipe(recipe: str, extra: List[str], workdir: Path) -> str:
    """The named recipe with overrides applied, as a file (calibration and training read the same one)."""
    from mmcl.cli import find_recipe
    from mmcl.config import load_recipe, dump_recipe

    path = workdir / f"{recipe}.yaml"
    dump_recipe(load_recipe(find_recipe(recipe), extra), path)
    return str(path)


def export_copy(run_dir: Path, name: str) -> Path:
    """`mmcl export`, then a copy in a fresh folder: what is judged is what a user would get elsewhere."""
    export, copy = WORK / f"{name}_export", WORK / "elsewhere" / name
    for folder in (export, copy):
        shutil.rmtree(folder, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "mmcl", "export", str(run_dir), "--out", str(export)], cwd=common.REPO,
                   check=True, capture_output=True, env=common.child_env())
    shutil.copytree(export, copy)
    return copy


def judge(copy: Path, name: str) -> Dict[str, dict]:
    """CLIP_benchmark's CLI, from inside the copied export, on each dataset: {dataset: its metrics}."""
    results = {}
    for dataset, (task, root) in DATA.items():
        out = WORK / f"{name}_{dataset}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--clip-benchmark-cli", "eval", "--dataset",
               f"wds/{dataset}", "--dataset_root", str(root), "--task", task, "--model", "local-dir:.",
               "--pretrained", name, "--output", str(out), "--no_amp", "--batch_size", "256",
               "--num_workers", "0", "--recall_k", "1", "5", "10"]
        log = WORK / f"{name}_{dataset}_clip_benchmark.log"
        common.say(f"lit budget: clip_benchmark {name} on {dataset}")
        with cpu_lock(exclusive=False):
            with open(log, "w") as sink:
                done = subprocess.run(cmd, cwd=copy, stdout=sink, stderr=subprocess.STDOUT,
                                      env=dict(common.child_env(), HF_HUB_OFFLINE="1"))
        common.check_ok({"returncode": done.returncode, "stopped": False}, log, f"clip_benchmark {dataset}")
        results[dataset] = json.loads(out.read_text())["metrics"]
    return results


def clip_benchmark_cli(argv: List[str]) -> None:
    """clip_benchmark's own `main()` with these arguments, after the numpy-2 fix of its accuracy()."""
    from clip_benchmark_cli import numpy2_accuracy
    from clip_benchmark import cli
    from clip_benchmark.metrics import zeroshot_classification

    zeroshot_classification.accuracy = numpy2_accuracy
    sys.argv = ["clip_benchmark", *argv]
    cli.main()


def run_one(name: str, kind: str, extra: List[str], args) -> dict:
    if kind == "lit":
        trained = train_lit(name, extra, args.budget)
    else:
        trained = train_planned(name, kind, extra, args.budget, args)
    metrics = judge(export_copy(Path(trained["run_dir"]), name), name) if trained["steps_done"] else {}
    row = {"name": name, "recipe": "flickr8k_lit" if kind == "lit" else kind, "overrides": extra, **trained,
           "metrics": metrics}
    common.say(f"lit budget: {name}: {headline(row)}")
    return row


def headline(row: dict) -> str:
    values = [row["metrics"].get(d, {}).get(m) for d, m in HEADLINE]
    return ", ".join(f"{d} {m} {v:.3f}" if v is not None else f"{d} {m} -" for (d, m), v in zip(HEADLINE, values))


def meets_targets(row: dict) -> Optional[bool]:
    values = {key: row["metrics"].get(key[0], {}).get(key[1]) for key in TARGETS}
    if any(v is None for v in values.values()):
        return None
    return all(values[key] >= target for key, target in TARGETS.items())


def table(rows: List[dict], budget: float) -> str:
    lines = ["| run | what | seconds used (budget) | features computed (s) | steps | CIFAR-10 top-1 | "
             "Flickr8k R@1 / R@5 / R@10 text->image | image->text |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        f, c = row["metrics"].get("flickr8k", {}), row["metrics"].get("cifar10", {})
        recall = lambda side: " / ".join(f"{f.get(f'{side}_retrieval_recall@{k}', float('nan')):.3f}" for k in (1, 5, 10))
        cache = "+".join(f"{row[k]:.0f}" for k in ("cache_image_seconds", "cache_text_seconds") if k in row) or "-"
        lines.append(f"| {row['name']} | {row.get('what', row['recipe'])} | {row['seconds']:.0f} ({budget:.0f})"
                     f"{' stopped' if row.get('stopped') else ''} | {cache} | {row['steps_done']} | "
                     f"{c.get('acc1', float('nan')):.3f} | {recall('image')} | {recall('text')} |")
    return "\n".join(lines)


def render(report: dict, path: Path = common.REPO / "README.md") -> None:
    """The table between the lit_budget markers of README.md (the section "Pretrained towers")."""
    text = path.read_text()
    if DOCS_BEGIN not in text or DOCS_END not in text:
        raise SystemExit(f"{path} lacks the {DOCS_BEGIN} / {DOCS_END} markers")
    m = report["machine"]
    note = (f"{m['cpu']}, {m['cores']} cores, load average {m['load_average'][0]} at the start; "
            f"rerun: `python benchmarks/lit_budget.py --ablations`")
    head, rest = text.split(DOCS_BEGIN, 1)
    path.write_text(f"{head}{DOCS_BEGIN}\n{table(report['rows'], report['budget_seconds'])}\n\n{note}\n"
                    f"{DOCS_END}{rest.split(DOCS_END, 1)[1]}")


def merged(out: str, rows: List[dict]) -> List[dict]:
    """Rows of an earlier run of this script that this one did not redo are kept (headline and ablations
    can run apart)."""
    earlier = common.read_json(common.result_path(out)) or {}
    names = {r["name"] for r in rows}
    order = ["flickr8k_lit", "flickr8k_clip_tiny", *VARIANTS]
    rank = lambda row: order.index(row["name"]) if row["name"] in order else len(order)
    return sorted([r for r in earlier.get("rows", []) if r["name"] not in names] + rows, key=rank)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=600.0, help="wall seconds for each training process")
    p.add_argument("--only", nargs="*", choices=["lit", "scratch"], default=["lit", "scratch"],
                   help="the headline runs to do (none: `--only` alone, e.g. with --ablations)")
    p.add_argument("--ablations", nargs="*", choices=sorted(VARIANTS), default=None,
                   help="variants of flickr8k_lit, each in the same budget (all when given without names)")
    p.add_argument("--out", default="lit_budget.json")
    p.add_argument("--quick", action="store_true", help="calibration of the from-scratch run: 2 + 4 steps")
    p.add_argument("--mmcl-threads", type=int, default=None)
    p.add_argument("--grace", type=float, default=1.0)
    p.add_argument("--render", action="store_true", help="only redraw README.md's table from the JSON")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--clip-benchmark-cli":
        return clip_benchmark_cli(sys.argv[2:])
    args = parse_args(argv)
    if args.render:
        return render(common.read_json(common.result_path(args.out)))
    WORK.mkdir(parents=True, exist_ok=True)
    info, rows = common.machine_info(), []
    if "lit" in args.only:
        rows.append({**run_one("flickr8k_lit", "lit", [], args), "what": "LiT: both towers pretrained and locked"})
    if "scratch" in args.only:
        rows.append({**run_one("flickr8k_clip_tiny", "flickr8k_clip_tiny", [], args),
                     "what": "CLIP from scratch, schedule planned for the budget"})
    for name in (sorted(VARIANTS) if args.ablations == [] else args.ablations or []):
        extra, what = VARIANTS[name]
        kind = "flickr8k_lit" if name == "no_cache" else "lit"
        rows.append({**run_one(name, kind, extra, args), "what": what})
    for row in rows:
        row["meets_targets"] = meets_targets(row) if row["recipe"] == "flickr8k_lit" else None
    report = {"machine": info, "budget_seconds": args.budget, "targets": {f"{d} {m}": t for (d, m), t in TARGETS.items()},
              "rows": merged(args.out, rows)}
    path = common.write_json(args.out, report)
    print(table(report["rows"], args.budget))
    if not args.quick:  # a smoke run does not replace the recorded table
        render(report)
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
