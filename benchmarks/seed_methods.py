"""Evidence for the label-aware, hard-negative, margin and text-side methods, side by side, CPU-sized.

Each group trains its methods from their tiny recipes with the same towers, steps, batch and seeds (the group's
overrides replace the recipes' towers and budget with a smaller one, so that all 42 runs fit in about 50 minutes
on 2 idle cores), then evaluates with `mmcl eval`:

- cifar10 (image only): SimCLR, SupCon, SimCLR + HCL, SimCLR + i-Mix, triplet; kNN and linear probe
  (`mmcl eval probe`, fitted on the 10,000 train images, scored on the 10,000 test images).
- moco (image only): MoCo v2 against MoCo v2 + MoCHi; the same probes.
- flickr8k (image-text): CLIP, CLIP + HCL, VSE++ (max violation, from the start and after 100 steps of the sum),
  CLIP + SimCSE term; Flickr8k test retrieval recall@1/5/10 (`mmcl eval retrieval`) and CIFAR-10 zero-shot
  (`mmcl eval zeroshot`).
- digits (image-text, the embedded data): CLIP against CLIP with label positives; zero-shot on the digits test.

Every (group, method, seed) writes `runs/benchmarks/seed_methods/GROUP/METHOD/sSEED/result.json`; a rerun skips
the runs whose result exists (resumable), and after each run the summary (mean and standard error over the
seeds done) is rewritten to benchmarks/results/seed_methods.json and the README table between the markers.
Each run (its training and its evaluations) holds the shared CPU lock once (`flock -s /tmp/mmcl-cpu.lock`):
a child `seed_methods.py --one GROUP METHOD SEED` under the lock does the work.

    python benchmarks/seed_methods.py [--groups cifar10,moco,flickr8k,digits] [--seeds 0,1,2] [--report-only]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks are plain scripts next to their shared helpers)

from mmcl.trainer.logs import read_metrics  # noqa: E402

CIFAR = common.SHARED_DATA / "cifar10"
FLICKR = common.SHARED_DATA / "flickr8k"
WORK = common.WORK / "seed_methods"
DOC = common.REPO / "README.md"
START, END = "<!-- seed-methods:start -->", "<!-- seed-methods:end -->"
LOCK = ["flock", "-s", "/tmp/mmcl-cpu.lock"]  # around each run's child process, not inside it
# One compute thread per process: these tiny towers gain nothing from two, and on a shared, busy 2-core machine
# several threads per process thrash (the test suite's conftest makes the same choice). Accuracy runs only.
CHILD_ENV = common.child_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
IMAGE_TOWER = ("{embed_dim: 64, vision_cfg: {image_size: 32, patch_size: 8, width: 64, layers: 2, head_width: 32, "
               "mlp_ratio: 2.0}, text_cfg: {context_length: 8, vocab_size: 49408, width: 32, heads: 2, layers: 1}}")
FLICKR_TOWERS = ("{embed_dim: 128, vision_cfg: {image_size: 64, patch_size: 16, width: 128, layers: 2, head_width: 32,"
                 " mlp_ratio: 2.0}, text_cfg: {context_length: 32, vocab_size: 49408, width: 128, heads: 4, layers: 2,"
                 " mlp_ratio: 2.0}}")
DIGIT_TOWERS = ("{embed_dim: 64, vision_cfg: {image_size: 32, patch_size: 4, width: 64, layers: 2, head_width: 32, "
                "mlp_ratio: 2.0}, text_cfg: {context_length: 16, vocab_size: 49408, width: 64, heads: 2, layers: 2, "
                "mlp_ratio: 2.0}}")
IMAGE_ONLY = [f"model.config={IMAGE_TOWER}", "model.ssl_head=[256,64]", "train.batch_size=64", "train.max_steps=250",
              "optim.warmup_steps=20"]
PROBE = [("probe", CIFAR, ["--batch-size", "500"])]
# group -> (shared overrides, {method: (recipe, extra overrides, label)}, evaluations)
GROUPS = {
    "cifar10": (IMAGE_ONLY, {
        "simclr": ("cifar10_simclr_tiny", [], "SimCLR"),
        "supcon": ("cifar10_supcon_tiny", [], "SupCon (uses the labels)"),
        "simclr_hcl": ("cifar10_simclr_hcl_tiny", [], "SimCLR + HCL (beta 0.5, tau+ 0.1)"),
        "simclr_imix": ("cifar10_simclr_imix_tiny", [], "SimCLR + i-Mix (alpha 1)"),
        "triplet": ("cifar10_triplet_tiny", [], "triplet (semi-hard, margin 0.2)"),
    }, PROBE),
    "moco": (IMAGE_ONLY, {
        "moco": ("cifar10_moco_tiny", [], "MoCo v2"),
        "moco_mochi": ("cifar10_moco_mochi_tiny", [], "MoCo v2 + MoCHi (256, 256, 64)"),
    }, PROBE),
    "flickr8k": ([f"model.config={FLICKR_TOWERS}", "train.batch_size=64", "train.max_steps=250",
                  "optim.warmup_steps=20", "model.text_dropout=0.0"], {
        "clip": ("flickr8k_clip_tiny", [], "CLIP"),
        "clip_hcl": ("flickr8k_clip_hcl_tiny", [], "CLIP + HCL (beta 0.1)"),
        "vse": ("flickr8k_vse_tiny", [], "VSE++ (max violation)"),
        "vse_warmup": ("flickr8k_vse_tiny", ["objective.vse.sum_warmup_steps=100"],
                       "VSE++ (sum for 100 steps, then max)"),
        "clip_simcse": ("flickr8k_clip_simcse_tiny", ["model.text_dropout=0.1"], "CLIP + SimCSE term (weight 1)"),
    }, [("retrieval", FLICKR, ["--batch-size", "250"]), ("zeroshot", CIFAR, ["--batch-size", "500"])]),
    "digits": ([f"model.config={DIGIT_TOWERS}", "train.batch_size=64", "train.max_steps=200", "optim.warmup_steps=20",
                f"data.train=[{common.DIGITS}]"], {
        "clip": ("digits_clip_tiny", [], "CLIP"),
        "clip_label_positives": ("digits_clip_label_positives", [], "CLIP + label positives"),
    }, [("zeroshot", common.DIGITS, ["--batch-size", "500"])]),
}
METRICS = {"probe": ["knn_acc1", "linear_probe_acc1"], "zeroshot": ["acc1"],
           "retrieval": [f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)]}


SMOKE = []  # --smoke: extra overrides of a quick pipeline check (its runs go to a folder of their own)


def run_dir(group: str, method: str, seed: int) -> Path:
    return (WORK / "smoke" if SMOKE else WORK) / group / method / f"s{seed}"


def train(group: str, method: str, seed: int) -> dict:
    """Train one (method, seed) through the CLI from scratch; steps, seconds and first / last logged loss."""
    shared, methods, _ = GROUPS[group]
    recipe, extra, _ = methods[method]
    out = run_dir(group, method, seed)
    cmd = [sys.executable, "-m", "mmcl", "train", str(common.REPO / "recipes" / f"{recipe}.yaml"), *shared,
                  *extra, f"train.seed={seed}", f"train.output_dir={out / 'run'}", "train.resume=none",
                  "train.progress=false", "train.save_every=0", "train.log_every=10", "eval.datasets=[]",
                  "eval.retrieval=[]", *SMOKE]
    if not (out / "run" / "summary.json").is_file():  # a finished run is kept when only its evaluation is redone
        common.say(f"training {group}/{method} seed {seed}")
        result = common.run_logged(cmd, out / "train.log", env=CHILD_ENV)
        common.check_ok(result, out / "train.log", f"training {group}/{method} seed {seed}")
    metrics = [r for r in read_metrics(out / "run") if r.get("loss") is not None]
    return {"steps": metrics[-1]["step"], "train_seconds": run_seconds(group, method, seed),
            "first_loss": metrics[0]["loss"], "final_loss": metrics[-1]["loss"],
            "command": " ".join(cmd[1:])}


def evaluate(group: str, method: str, seed: int) -> dict:
    """Every evaluation of the group through `mmcl eval`; the metrics of its JSON reports, by dataset."""
    out, metrics = run_dir(group, method, seed), {}
    for command, root, options in GROUPS[group][2]:
        folder = out / f"eval_{command}_{root.name}"
        cmd = [sys.executable, "-m", "mmcl", "eval", command, "--model", str(out / "run"), "--data", str(root),
                      "--out", str(folder), "--workers", "1", "--no-progress", *options]
        cmd += ["--max-samples", "200"] if SMOKE else []
        result = common.run_logged(cmd, folder.with_suffix(".log"), env=CHILD_ENV)
        common.check_ok(result, folder.with_suffix(".log"), f"evaluating {group}/{method} seed {seed}")
        report = json.loads(next(folder.glob("*.json")).read_text())
        metrics[f"{root.name}_{command}"] = {k: report["metrics"][k] for k in METRICS[command]}
        metrics[f"{root.name}_{command}"]["eval_seconds"] = result["seconds"]
    return metrics


def run_one(group: str, method: str, seed: int) -> None:
    """Train and evaluate one (method, seed) in a child process that holds the shared CPU lock throughout."""
    out = run_dir(group, method, seed)
    if (out / "result.json").is_file():
        return
    cmd = LOCK + [sys.executable, str(Path(__file__).resolve()), "--one", group, method, str(seed)]
    result = common.run_logged(cmd + (["--smoke"] if SMOKE else []), out / "run_one.log")
    common.check_ok(result, out / "run_one.log", f"{group}/{method} seed {seed}")


def train_and_evaluate(group: str, method: str, seed: int) -> None:
    done = run_dir(group, method, seed) / "result.json"
    result = {"group": group, "method": method, "seed": seed, "train": train(group, method, seed)}
    result["eval"] = evaluate(group, method, seed)
    done.write_text(json.dumps(result, indent=1) + "\n")
    common.say(f"{group}/{method} seed {seed}: {result['eval']}")


def run_seconds(group: str, method: str, seed: int) -> float:
    """Wall time of a run from its start (config.yaml written) to its end (summary.json): no lock waits."""
    run = run_dir(group, method, seed) / "run"
    return (run / "summary.json").stat().st_mtime - (run / "config.yaml").stat().st_mtime


def mean_se(values: list) -> dict:
    """Mean and standard error of the mean over seeds (se None for a single seed)."""
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "se": se, "n": len(values), "values": values}


def summarize() -> dict:
    """Per group and method: mean and standard error of every metric over the seeds that finished."""
    out = {}
    for group, (_, methods, _) in GROUPS.items():
        for method in methods:
            results = [json.loads(p.read_text()) for p in sorted((WORK / group / method).glob("s*/result.json"))]
            if not results:
                continue
            row = {"seeds": [r["seed"] for r in results],
                   "train_minutes": mean_se([run_seconds(group, method, r["seed"]) / 60 for r in results]),
                   "steps": results[0]["train"]["steps"]}
            for key in results[0]["eval"]:
                for metric in METRICS[key.split("_")[-1]]:
                    row[f"{key}/{metric}"] = mean_se([r["eval"][key][metric] for r in results])
            out.setdefault(group, {})[method] = row
    return out


def cell(stat: dict) -> str:
    if stat is None:
        return "-"
    se = f" ± {100 * stat['se']:.1f}" if stat["se"] is not None else ""
    return f"{100 * stat['mean']:.1f}{se}"


def group_table(group: str, rows: dict, columns: list) -> list:
    lines = ["| method | seeds | steps | train min | " + " | ".join(name for name, _ in columns) + " |",
             "|---" * (4 + len(columns)) + "|"]
    for method, row in rows.items():
        label = GROUPS[group][1][method][2]
        minutes = f"{row['train_minutes']['mean']:.1f}"
        values = " | ".join(cell(row.get(key)) for _, key in columns)
        lines.append(f"| {label} | {len(row['seeds'])} | {row['steps']} | {minutes} | {values} |")
    return lines


def markdown(summary: dict, machine: dict) -> str:
    probe = [("kNN top-1", "cifar10_probe/knn_acc1"), ("linear top-1", "cifar10_probe/linear_probe_acc1")]
    recalls = [(f"{'T->I' if d == 'image' else 'I->T'} R@{k}", f"flickr8k_retrieval/{d}_retrieval_recall@{k}")
               for d in ("image", "text") for k in (1, 5, 10)]
    titles = {"cifar10": ("CIFAR-10, image only (ViT 2 x 64 at 32 px, head 256-64, batch 64, 250 steps); kNN and "
                          "linear probe on the 10,000 test images", probe),
              "moco": ("CIFAR-10, MoCo v2 (same tower, batch and steps; queue 4,096)", probe),
              "flickr8k": ("Flickr8k, image-text (ViT 2 x 128 at 64 px patch 16, text 2 x 128, batch 64, 250 "
                           "steps); test retrieval and CIFAR-10 zero-shot",
                           recalls + [("CIFAR-10 zero-shot", "cifar10_zeroshot/acc1")]),
              "digits": ("Embedded digits, image-text (ViT 2 x 64 at 32 px, batch 64, 200 steps); zero-shot top-1 "
                         "on the 1,000 test digits", [("zero-shot top-1", "digits_zeroshot/acc1")])}
    lines = []
    for group, rows in summary.items():
        title, columns = titles[group]
        lines += [f"**{title}**", ""] + group_table(group, rows, columns) + [""]
    lines.append(f"Mean ± standard error over seeds, in %. Machine: {machine['cpu']}, {machine['cores']} cores, "
                 f"nothing else running (load average {machine['load_average'][0]} at the end), torch "
                 f"{machine['torch']}; `python benchmarks/seed_methods.py`, {machine['date'][:10]}.")
    return "\n".join(lines)


def report() -> None:
    summary, machine = summarize(), common.machine_info()
    payload = {"summary": summary, "groups": {g: {"shared_overrides": GROUPS[g][0],
                                                  "methods": {m: {"recipe": r, "overrides": o}
                                                              for m, (r, o, _) in GROUPS[g][1].items()}}
                                              for g in GROUPS}, "machine": machine}
    common.write_json("seed_methods.json", payload)
    common.write_doc_section(DOC, START, END, markdown(summary, machine))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", default=",".join(GROUPS), help="groups to run, comma-separated")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--report-only", action="store_true", help="rewrite the summary from finished runs")
    parser.add_argument("--smoke", action="store_true", help="2 steps per run, eval on 200 samples, no report")
    parser.add_argument("--one", nargs=3, metavar=("GROUP", "METHOD", "SEED"), help="one run, here (no lock)")
    args = parser.parse_args()
    if args.smoke:
        SMOKE.extend(["train.max_steps=2", "data.shuffle_buffer=10"])
    if args.one:
        train_and_evaluate(args.one[0], args.one[1], int(args.one[2]))
        return
    if args.smoke:
        for group in args.groups.split(","):
            for method in GROUPS[group][1]:
                run_one(group, method, 0)
        return
    if not args.report_only:
        common.ensure_digits()
        for seed in (int(s) for s in args.seeds.split(",")):  # seed-major: a whole first table comes early
            for group in args.groups.split(","):
                for method in GROUPS[group][1]:
                    run_one(group, method, seed)
                    report()
    report()


if __name__ == "__main__":
    main()
