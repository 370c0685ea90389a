"""Seven SSL methods on CIFAR-10, mmcl against lightly's implementations, 3 seeds: kNN and linear probe.

    python benchmarks/ssl_methods.py [--seeds 0 1 2] [--steps 234] [--only byol swav ...] [--render]

For each seed, the batches are made once by mmcl's multi-view pipeline from the CIFAR-10 train split
(../shared/data/cifar10, 10,000 images): 2 views at 32 px (crop scale 0.2-1, the tiny recipes' setting) and
2 small 16 px views (scale 0.05-0.14, used by SwAV only), and held in memory. Every method then trains on
exactly those batches, from its tiny recipe (`recipes/cifar10_METHOD_tiny.yaml`: same tower, batch 128, the
seed as `train.seed`), for the same number of steps:
- mmcl: the trainer's own step (`mmcl.trainer.loop.optimizer_step`, and `before_epoch` at each epoch start);
- lightly: `benchmarks/lightly_methods.py`, lightly's heads, losses, momentum updates and schedules on a copy
  of the same initial tower and heads, with the same AdamW, schedule and clipping (PCL: lightly has none).
Each trained tower (and the untrained one of each seed) is scored by the functions `mmcl eval probe` runs:
kNN (k = 20) and a logistic-regression probe on frozen, normalised `encode_image` features, fitted on the
10,000 train images and scored on the 10,000 test images, plus the test features' collapse metrics; the
images are decoded and preprocessed once per seed, and the untrained tower of seed 0 is also scored through
`eval.evaluate_dataset` itself, as a cross-check of that shortcut.

One JSON per run in benchmarks/results/ssl_methods/ (a run whose JSON exists is skipped: the script can be
stopped and started again); `--render` (also done at the end) writes benchmarks/results/ssl_methods.json with
means and standard errors over the seeds and the table in README.md between the ssl-methods markers.
Accuracy at a fixed number of steps does not depend on the machine's load; the step times recorded here do,
so the speed comparison is `benchmarks/ssl_methods_speed.py`, run alone.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import mmcl.eval as mmcl_eval  # noqa: E402
from mmcl.data_pipelines import shards  # noqa: E402
from mmcl.data_pipelines.stream import SampleSpec, ShardStream  # noqa: E402
from mmcl.eval.geometry import collapse_metrics  # noqa: E402
from mmcl.eval.probe import knn_metrics, linear_probe_metrics  # noqa: E402
from mmcl.config import load_recipe  # noqa: E402
from mmcl.models import eval_preprocess  # noqa: E402
from mmcl.trainer import loop  # noqa: E402
from mmcl.trainer import setup as S  # noqa: E402

METHODS = ("simclr", "moco", "byol", "simsiam", "vicreg", "swav", "pcl")
CIFAR = common.SHARED_DATA / "cifar10"
RUNS = common.WORK / "ssl_methods"
OUT = common.RESULTS / "ssl_methods"
DOC = common.REPO / "README.md"
START, END = "<!-- ssl-methods:start -->", "<!-- ssl-methods:end -->"
KEYS = ("knn_acc1", "linear_probe_acc1", "feature_std", "effective_rank", "uniformity")


EXTRA = []  # trial overrides (`--set`, with `--tag` only)


def recipe_for(method: str, seed: int, steps: int, run_dir: Path):
    overrides = EXTRA + [f"data.train=[{CIFAR}]", f"train.output_dir={run_dir}", f"train.seed={seed}",
                 f"train.max_steps={steps}", "train.epochs=100", "train.resume=none", "train.progress=false",
                 "train.save_every=0", "eval.datasets=[]", "data.workers=0", "data.view_crop_scale=[0.2,1.0]"]
    return load_recipe(str(common.REPO / "recipes" / f"cifar10_{method}_tiny.yaml"), overrides)


def make_batches(seed: int, steps: int) -> list:
    """The seed's batches from mmcl's pipeline: 2 large + 2 small views, keys, as the trainer streams them."""
    recipe = recipe_for("swav", seed, steps, RUNS / "data")
    recipe.data.workers = 2
    plan = S.plan_data(recipe, 1)
    torch.manual_seed(seed)
    objective, model_cfg, _ = S.build(recipe, S.make_accelerator(recipe))
    spec = S.sample_spec(recipe, objective, model_cfg, None)
    data = S.TrainData(recipe, plan, spec, 0, 0)
    batches, epoch = [], 0
    while len(batches) < steps:
        batches += [{"views": b["views"], "key": b["key"]} for b in data.epoch(epoch)][:steps - len(batches)]
        epoch += 1
    data.close()
    return batches


class ProbeData:
    """CIFAR-10 train and test images, decoded and preprocessed once (the eval preprocess is the same for
    every tower here): `mmcl eval probe` would decode them again for each of the ~40 towers."""

    def __init__(self, model):
        self.splits = {split: self.load(split, eval_preprocess(model)) for split in ("train", "test")}

    @staticmethod
    def load(split: str, preprocess) -> tuple:
        spec = SampleSpec(image_transform=preprocess, label=True)
        stream = ShardStream(shards.split_urls(str(CIFAR), split), spec, 500, repeat=False, partial=True,
                             shuffle_buffer=0, rank=0, world=1)
        batches = list(stream)
        return torch.cat([b["image"] for b in batches]), torch.cat([b["label"] for b in batches])

    @torch.inference_mode()
    def features(self, model, split: str) -> torch.Tensor:
        images = self.splits[split][0]
        return torch.cat([model.encode_image(images[i:i + 500], normalize=True).float()
                          for i in range(0, len(images), 500)])

    def probe(self, model) -> dict:
        """kNN (k=20), logistic-regression probe and collapse metrics: the functions `mmcl eval probe` runs."""
        model.eval()
        (_, train_labels), (_, test_labels) = self.splits["train"], self.splits["test"]
        train, test = self.features(model, "train"), self.features(model, "test")
        metrics = {**knn_metrics(train, train_labels, test, test_labels, 10),
                   **linear_probe_metrics(train, train_labels, test, test_labels, 10), **collapse_metrics(test)}
        return {k: metrics[k] for k in KEYS}


def probe_by_cli_function(model) -> dict:
    """The same numbers through `eval.evaluate_dataset` itself (the code of `mmcl eval probe`): a cross-check."""
    model.eval()
    result = mmcl_eval.evaluate_dataset(model, eval_preprocess(model), None, str(CIFAR), split="test",
                                        task="linear_probe", batch_size=500)
    return {k: result["metrics"][k] for k in KEYS}


def views_for(method: str, batch: dict) -> dict:
    return batch if method == "swav" else {"views": batch["views"][:2], "key": batch["key"]}


def train_mmcl(method: str, seed: int, batches: list) -> tuple:
    """Train with the trainer's step on the batches; return (model, losses, seconds)."""
    recipe = recipe_for(method, seed, len(batches), RUNS / f"mmcl_{method}_s{seed}")
    run, _ = loop.start(recipe)
    losses, start = [], time.perf_counter()
    for step, batch in enumerate(batches):
        if step % run.plan.steps_per_epoch == 0:
            run.objective.before_epoch(step // run.plan.steps_per_epoch, run.plan.urls)
        out, _ = loop.optimizer_step(run, views_for(method, batch))
        losses.append(float(out["loss"]))
    seconds = time.perf_counter() - start
    run.save()  # `mmcl eval probe --model RUN_DIR` scores the same tower
    return run.objective.model, losses, seconds


def train_lightly(method: str, seed: int, batches: list) -> tuple:
    from lightly_methods import LIGHTLY

    recipe = recipe_for(method, seed, len(batches), RUNS / f"lightly_{method}_s{seed}")
    objective, _, _ = S.build(recipe, S.make_accelerator(recipe))  # the same initial tower and heads as mmcl's
    side = LIGHTLY[method](objective, recipe, len(batches))
    losses, start = [], time.perf_counter()
    for batch in batches:
        losses.append(side.step(views_for(method, batch)))
    seconds = time.perf_counter() - start
    model = copy.deepcopy(objective.model)
    model.visual = side.visual
    return model, losses, seconds


def untrained(seed: int, steps: int):
    recipe = recipe_for("simclr", seed, steps, RUNS / f"untrained_s{seed}")
    objective, _, _ = S.build(recipe, S.make_accelerator(recipe))
    return objective.model


def result_file(impl: str, method: str, seed: int) -> Path:
    return OUT / f"{impl}_{method}_s{seed}.json"


def jobs(methods, seeds, impls=("mmcl", "lightly")) -> list:
    out = [("untrained", "-", seed) for seed in seeds]
    for seed in seeds:
        for method in methods:
            out += [(impl, method, seed) for impl in impls if not (impl == "lightly" and method == "pcl")]
    return out


def run_job(impl: str, method: str, seed: int, batches: list, data: "ProbeData") -> None:
    common.say(f"{impl} {method} seed {seed}: training {len(batches)} steps")
    if impl == "untrained":
        model, losses, seconds = untrained(seed, len(batches)), [], 0.0
    else:
        model, losses, seconds = (train_mmcl if impl == "mmcl" else train_lightly)(method, seed, batches)
    metrics = data.probe(model)
    if impl == "untrained" and seed == 0:
        metrics["cross_check_evaluate_dataset"] = probe_by_cli_function(model)
    record = {"impl": impl, "method": method, "seed": seed, "steps": len(losses), "batch_size": 128,
              "train_seconds": seconds, "first_loss": losses[0] if losses else None,
              "final_loss": losses[-1] if losses else None, "losses_every_10": losses[::10], **metrics,
              "load_average": common.machine_info()["load_average"]}
    OUT.mkdir(parents=True, exist_ok=True)
    result_file(impl, method, seed).write_text(json.dumps(record, indent=2))
    common.say(f"{impl} {method} seed {seed}: {metrics}")


def run_all(methods, seeds, steps: int, impls) -> None:
    todo = [job for job in jobs(methods, seeds, impls) if not result_file(*job).is_file()]
    for seed in seeds:
        mine = [job for job in todo if job[2] == seed]
        if not mine:
            continue
        common.say(f"seed {seed}: making {steps} batches")
        batches = make_batches(seed, steps)
        data = ProbeData(untrained(seed, steps))
        for job in mine:
            run_job(*job, batches, data)


# ---- summary and table ---------------------------------------------------------------------------------

def mean_se(values: list) -> dict:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": None, "se": None, "n": 0}
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "se": se, "n": len(values)}


def summarize_runs() -> dict:
    records = [json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))]
    groups = {}
    for r in records:
        groups.setdefault((r["impl"], r["method"]), []).append(r)
    rows = {}
    for (impl, method), runs in groups.items():
        rows[f"{impl}/{method}"] = {"impl": impl, "method": method, "seeds": sorted(r["seed"] for r in runs),
                                    "steps": runs[0]["steps"],
                                    **{k: mean_se([r[k] for r in runs]) for k in KEYS + ("train_seconds",)}}
    return rows


def cell(stat: dict, scale: float = 100.0, digits: int = 1) -> str:
    if stat["mean"] is None:
        return "-"
    se = f" ± {scale * stat['se']:.{digits}f}" if stat["se"] is not None else ""
    return f"{scale * stat['mean']:.{digits}f}{se}"


def markdown(rows: dict, speed: dict) -> str:
    lines = ["| method | mmcl kNN | lightly kNN | mmcl linear | lightly linear | mmcl feature std x sqrt(d) | "
             "mmcl effective rank | speed mmcl / lightly, tiny / small tower |", "|---|---|---|---|---|---|---|---|"]
    base = rows.get("untrained/-")
    if base:
        lines.append(f"| random init (same seeds) | {cell(base['knn_acc1'])} | | "
                     f"{cell(base['linear_probe_acc1'])} | | "
                     f"{cell(base['feature_std'], math.sqrt(128), 2)} | {cell(base['effective_rank'], 1, 1)} | |")
    for method in METHODS:
        ours, theirs = rows.get(f"mmcl/{method}"), rows.get(f"lightly/{method}")
        if not ours:
            continue
        dash = {"mean": None}
        theirs_knn = cell(theirs["knn_acc1"]) if theirs else "(none in lightly)"
        theirs_lin = cell(theirs["linear_probe_acc1"]) if theirs else "-"
        ratio = speed.get(method, "-")
        lines.append(f"| {method} | {cell(ours['knn_acc1'])} | {theirs_knn} | {cell(ours['linear_probe_acc1'])} | "
                     f"{theirs_lin} | {cell(ours['feature_std'], math.sqrt(128), 2)} | "
                     f"{cell(ours.get('effective_rank', dash), 1, 1)} | {ratio} |")
    return "\n".join(lines)


def speed_cells() -> dict:
    """'1.02x (small) / 0.98x (larger)' per method from ssl_methods_speed.json, if it was run."""
    data = common.read_json(common.RESULTS / "ssl_methods_speed.json") or {}
    out = {}
    for method, sizes in data.get("methods", {}).items():
        out[method] = " / ".join(f"{s['ratio']:.2f}x" for s in sizes.values() if s.get("ratio"))
    return out


def render() -> dict:
    rows = summarize_runs()
    report = {"machine": common.machine_info(), "rows": rows,
              "settings": {"data": "cifar10 train (10,000) -> test (10,000)", "batch_size": 128,
                           "views": "2 x 32 px (scale 0.2-1) + 2 x 16 px for SwAV (scale 0.05-0.14)",
                           "eval": "kNN k=20 and logistic regression on frozen encode_image features"}}
    common.write_json("ssl_methods.json", report)
    table = markdown(rows, speed_cells())
    text = DOC.read_text()
    if START in text and END in text:
        head, rest = text.split(START, 1)
        DOC.write_text(head + START + "\n" + table + "\n" + END + rest.split(END, 1)[1])
    print(table)
    return report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=156, help="optimizer steps per run (156 = 2 epochs of 10k)")
    p.add_argument("--only", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--render", action="store_true", help="only redraw the summary and the table")
    p.add_argument("--tag", default="", help="a trial: results in results/ssl_methods_TAG/, README untouched")
    p.add_argument("--set", nargs="+", default=[], help="a trial's recipe overrides (with --tag)")
    p.add_argument("--impl", nargs="+", choices=("mmcl", "lightly"), default=["mmcl", "lightly"])
    args = p.parse_args(argv)
    if args.set and not args.tag:
        p.error("--set changes the recipes: give the trial a --tag")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    global OUT, RUNS, DOC
    torch.set_num_threads(1)  # the machine is shared; one thread per run is the fair share
    if args.tag:
        OUT, RUNS = OUT.with_name(f"ssl_methods_{args.tag}"), RUNS.with_name(f"ssl_methods_{args.tag}")
        DOC = Path("/dev/null")
        EXTRA[:] = args.set
    if not args.render:
        run_all(args.only, args.seeds, args.steps, args.impl)
    if not args.tag:
        render()
    else:
        print(markdown(summarize_runs(), {}))


if __name__ == "__main__":
    main()
