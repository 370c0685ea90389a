"""Training samples/s: mmcl vs open_clip_train on the same shards, and mmcl against its in-memory ceiling.

    python benchmarks/train_throughput.py [--repeats 3] [--warmup 5] [--steps 10] [--quick]

Both trainers get the recipe's model config (digits_clip_tiny by default), the same shards, batch size,
precision (fp32 unless a variant says otherwise), DataLoader worker count and torch's default threads. Each run is a fresh process; the
variants alternate (their order rotates every repeat) so that the neighbours' load hits all of them alike.
A run takes `warmup + steps` optimizer steps; samples/s is measured over the `steps` after the warm-up from
each trainer's own log (mmcl: metrics.jsonl every `--log-every` steps; open_clip_train: its "Batch (t)" mean
per log window, which also covers the wait for data).

Variants:
- mmcl: `mmcl train RECIPE` end to end (shards -> decode -> augment -> tokenize -> step).
- open_clip_train: `open_clip_train.main` with the same settings (webdataset 0.2.86, see openclip_anchor.py).
- mmcl_in_memory: mmcl's own optimizer step (`mmcl.trainer.loop.optimizer_step`) on batches loaded beforehand:
  the ceiling the pipeline is measured against (pipeline efficiency = end-to-end / in-memory).
- mmcl_in_memory_plain (`--ablation`, on by default): the same with `model.packed_attention=false
  optim.fused=false`, i.e. open_clip's nn.MultiheadAttention path and torch's default AdamW: what those two
  paths of mmcl's step are worth.
- with `--variants ...`: mmcl_bf16 / mmcl_in_memory_bf16 (`train.precision=bf16`: autocast on a CPU too),
  open_clip_train_bf16 (`--precision amp_bf16`), mmcl_compile / mmcl_in_memory_compile (`model.compile=true`).
  Compiling happens in the warm-up steps.
- mmcl_system_malloc / mmcl_in_memory_system_malloc: `train.keep_freed_memory=false`, glibc's own mmap and trim
  thresholds (large freed blocks go back to the kernel and come back as page faults, mmcl/memory.py);
  open_clip_train_kept_memory: open_clip_train given the same two thresholds through MALLOC_MMAP_THRESHOLD_ and
  MALLOC_TRIM_THRESHOLD_, to show how much of mmcl's lead is that setting.
- *_threads_N (`--threads-variant`, off by default): the same three with OMP_NUM_THREADS = cores - workers,
  the thread policy mmcl's evaluator uses. Measured on an idle 2-core machine it makes training slower
  (one compute thread instead of two: 214 vs 324 samples/s for mmcl before its faster step, 251 vs 362 for
  open_clip_train), so the trainer keeps torch's default threads; the variant stays for other machines.

Writes benchmarks/results/train_throughput.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from mmcl import memory  # noqa: E402
import openclip_anchor  # noqa: E402

TARGET_VS_OPENCLIP = 1.5
TARGET_PIPELINE = 0.95


def load_recipe(recipe: str, overrides: List[str]):
    from mmcl.config import load_recipe as load

    return load(str(common.REPO / "recipes" / f"{recipe}.yaml") if "/" not in recipe else recipe, overrides)


def base_overrides(args, data_root: Path, out: Path) -> List[str]:
    return [f"data.train=[{data_root}]", f"data.workers={args.workers}", f"train.batch_size={args.batch_size}",
            f"train.output_dir={out}", "train.precision=fp32", "train.resume=none", "train.progress=false",
            f"train.max_steps={args.warmup + args.steps}", f"train.log_every={args.log_every}",
            "train.save_every=0", "eval.datasets=[]", "eval.retrieval=[]", "train.epochs=1000"]


def mmcl_rate(metrics: Path, warmup: int, steps: int, batch: int) -> float:
    """Samples/s over steps (warmup, warmup + steps] from metrics.jsonl records (each covers log_every steps)."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    previous, samples, seconds = 0, 0, 0.0
    for record in records:
        step = record["step"]
        if previous >= warmup and step <= warmup + steps:
            n = (step - previous) * batch
            samples, seconds = samples + n, seconds + n / record["samples_per_s"]
        previous = step
    if not samples:
        raise RuntimeError(f"no metrics record after the warm-up in {metrics}")
    return samples / seconds


def run_mmcl(args, data_root: Path, tag: str, extra_env: Dict[str, str], overrides=()) -> dict:
    out = common.WORK / "throughput" / tag
    cmd = [sys.executable, "-m", "mmcl", "train", args.recipe_path, *base_overrides(args, data_root, out), *overrides]
    log = out.with_suffix(".log")
    result = common.run_logged(cmd, log, env=common.child_env(**extra_env))
    common.check_ok(result, log, f"mmcl train ({tag})")
    rate = mmcl_rate(out / "metrics.jsonl", args.warmup, args.steps, args.batch_size)
    return {"samples_per_s": rate, "process_seconds": result["seconds"]}


def openclip_rate(log_text: str, warmup: int, steps: int, batch: int) -> dict:
    """Samples/s over the log windows that start after `warmup` batches and end within warmup + steps + 1."""
    previous, batches, seconds, data = 0, 0, 0.0, 0.0
    for window in openclip_anchor.windows(log_text):
        done = window["samples_done"] // batch
        if previous >= warmup and done <= warmup + steps + 1:
            n = done - previous
            batches, seconds, data = batches + n, seconds + n * window["batch_time"], data + n * window["data_time"]
        previous = done
    if not batches:
        raise RuntimeError("no open_clip_train log window after the warm-up")
    return {"samples_per_s": batches * batch / seconds, "data_wait_fraction": data / seconds}


def run_openclip(args, data_root: Path, tag: str, model_cfg: dict, recipe, extra_env=None,
                 precision: str = "fp32") -> dict:
    work = common.WORK / "throughput"
    model_dir = openclip_anchor.write_model_config(work / "openclip_models", "bench-model", model_cfg)
    o = recipe.optim
    run = openclip_anchor.AnchorRun(
        model_dir=model_dir, model_name="bench-model", data_root=data_root,
        samples_per_epoch=(args.warmup + args.steps + 2) * args.batch_size, epochs=1,
        batch_size=args.batch_size, workers=args.workers, logs=work / "openclip_logs", name=tag,
        lr=o.lr, weight_decay=o.weight_decay, warmup=o.warmup_steps, betas=tuple(o.betas), eps=o.eps,
        grad_clip=o.grad_clip, log_every=args.log_every, precision=precision)
    remove_tree(run.run_dir)
    log = work / f"{tag}.log"
    result = common.run_logged(run.command(), log, env=openclip_anchor.env(**(extra_env or {})))
    common.check_ok(result, log, f"open_clip_train ({tag})")
    rate = openclip_rate(log.read_text(errors="replace"), args.warmup, args.steps, args.batch_size)
    return {**rate, "process_seconds": result["seconds"]}


def remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


PLAIN_STEP = ["model.packed_attention=false", "optim.fused=false"]  # the ablation: torch's default paths


def run_in_memory(args, data_root: Path, tag: str, extra_env: Dict[str, str], overrides=()) -> dict:
    out = common.WORK / "throughput" / tag
    remove_tree(out)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--in-memory-child", "--recipe", args.recipe,
           "--data", str(data_root), "--child-out", str(out), "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--log-every", str(args.log_every),
           *[f"--override={o}" for o in overrides]]
    log = out.with_suffix(".log")
    result = common.run_logged(cmd, log, env=common.child_env(**extra_env))
    common.check_ok(result, log, f"in-memory steps ({tag})")
    return json.loads(log.read_text().strip().splitlines()[-1])


def in_memory_child(args) -> None:
    """In this process: load warmup + steps batches first, then time mmcl's optimizer step on them."""
    import itertools

    from mmcl.trainer import loop
    from mmcl.trainer import setup as S

    recipe = load_recipe(args.recipe, base_overrides(args, Path(args.data), Path(args.child_out)) + ["data.workers=0"] +
                         list(args.override or []))
    run, _ = loop.start(recipe)
    batches = list(itertools.islice(S.epoch_batches(recipe, run.plan, run.spec, 0, 0), run.plan.steps_per_epoch))
    count = args.warmup + args.steps
    batches = [batches[i % len(batches)] for i in range(count)]
    for batch in batches[:args.warmup]:
        loop.optimizer_step(run, dict(batch))
    start = time.perf_counter()
    for batch in batches[args.warmup:]:
        loop.optimizer_step(run, dict(batch))
    seconds = time.perf_counter() - start
    import torch

    print(json.dumps({"samples_per_s": args.steps * args.batch_size / seconds, "torch_threads": torch.get_num_threads()}))


BF16, COMPILE = ["train.precision=bf16"], ["model.compile=true"]
SYSTEM_MALLOC = ["train.keep_freed_memory=false"]
# what train.keep_freed_memory does inside mmcl (mmcl/memory.py), given to open_clip_train through glibc's variables
KEPT_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(memory.MMAP_THRESHOLDS[0]),
                   "MALLOC_TRIM_THRESHOLD_": str(memory.TRIM_THRESHOLD)}
# name -> (runner, mmcl recipe overrides or open_clip_train's --precision)
VARIANTS = {
    "mmcl": ("mmcl", []), "open_clip_train": ("open_clip_train", "fp32"), "mmcl_in_memory": ("in_memory", []),
    "mmcl_in_memory_plain": ("in_memory", PLAIN_STEP),
    "mmcl_bf16": ("mmcl", BF16), "open_clip_train_bf16": ("open_clip_train", "amp_bf16"),
    "mmcl_in_memory_bf16": ("in_memory", BF16),
    "mmcl_compile": ("mmcl", COMPILE), "mmcl_in_memory_compile": ("in_memory", COMPILE),
    "mmcl_system_malloc": ("mmcl", SYSTEM_MALLOC), "mmcl_in_memory_system_malloc": ("in_memory", SYSTEM_MALLOC),
    "open_clip_train_kept_memory": ("open_clip_train", "fp32"),
}
ENV = {"open_clip_train_kept_memory": KEPT_MEMORY_ENV}  # variants that differ only in their environment
DEFAULT_VARIANTS = ["mmcl", "open_clip_train", "mmcl_in_memory", "mmcl_in_memory_plain", "mmcl_system_malloc",
                    "mmcl_in_memory_system_malloc", "open_clip_train_kept_memory"]


def variants(args) -> Dict[str, tuple]:
    """name -> (runner, overrides, extra environment). The thread variants pin torch's threads with OMP_NUM_THREADS."""
    names = list(args.variants) + (["mmcl_in_memory_plain"] if args.ablation and "mmcl_in_memory_plain" not in
                                   args.variants else [])
    out = {name: (*VARIANTS[name], dict(ENV.get(name, {}))) for name in names}
    if args.threads_variant:
        n = threads_for_fix(args.workers)
        env = {"OMP_NUM_THREADS": str(n)}
        out.update({f"mmcl_threads_{n}": ("mmcl", [], env), f"open_clip_train_threads_{n}": ("open_clip_train", "fp32", env),
                    f"mmcl_in_memory_threads_{n}": ("in_memory", [], env)})
    return out


def threads_for_fix(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) - workers)


def measure(args, data_root: Path, model_cfg: dict, recipe) -> Dict[str, List[dict]]:
    table, runs = variants(args), {}
    names = list(table)
    for repeat in range(args.repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            kind, overrides, env = table[name]
            tag = f"{name}_r{repeat}"
            common.say(f"train throughput: {tag}")
            if kind == "mmcl":
                result = run_mmcl(args, data_root, tag, env, overrides)
            elif kind == "open_clip_train":
                result = run_openclip(args, data_root, tag, model_cfg, recipe, env, precision=overrides)
            else:
                result = run_in_memory(args, data_root, tag, env, overrides)
            common.say(f"  {result['samples_per_s']:.1f} samples/s")
            runs.setdefault(name, []).append(result)
    return runs


def comparisons(runs: Dict[str, List[dict]]) -> dict:
    """Medians per variant and the ratios the table shows (the first two carry the issue's targets)."""
    rates = {name: [r["samples_per_s"] for r in results] for name, results in runs.items()}
    summary = {name: common.summarize(values) for name, values in rates.items()}
    pairs = [("mmcl vs open_clip_train", "mmcl", "open_clip_train", TARGET_VS_OPENCLIP),
             ("pipeline efficiency: end-to-end / in-memory", "mmcl", "mmcl_in_memory", TARGET_PIPELINE),
             ("in-memory step: packed attention + fused AdamW vs torch's default paths", "mmcl_in_memory",
              "mmcl_in_memory_plain", None),
             ("mmcl bf16 vs open_clip_train fp32 (each at its best on this CPU)", "mmcl_bf16", "open_clip_train",
              TARGET_VS_OPENCLIP),
             ("mmcl bf16 vs open_clip_train amp_bf16", "mmcl_bf16", "open_clip_train_bf16", TARGET_VS_OPENCLIP),
             ("pipeline efficiency, bf16", "mmcl_bf16", "mmcl_in_memory_bf16", TARGET_PIPELINE),
             ("in-memory step: bf16 autocast vs fp32", "mmcl_in_memory_bf16", "mmcl_in_memory", None),
             ("open_clip_train: amp_bf16 vs fp32", "open_clip_train_bf16", "open_clip_train", None),
             ("mmcl with the system's malloc settings (train.keep_freed_memory=false) vs open_clip_train",
              "mmcl_system_malloc", "open_clip_train", None),
             ("mmcl vs open_clip_train, both keeping freed memory (open_clip_train through MALLOC_* variables)",
              "mmcl", "open_clip_train_kept_memory", None),
             ("mmcl: keep_freed_memory vs the system's malloc settings", "mmcl", "mmcl_system_malloc", None),
             ("in-memory step: keep_freed_memory vs the system's malloc settings", "mmcl_in_memory",
              "mmcl_in_memory_system_malloc", None),
             ("open_clip_train: MALLOC_* variables vs as shipped", "open_clip_train_kept_memory", "open_clip_train",
              None),
             ("in-memory step: model.compile vs eager", "mmcl_in_memory_compile", "mmcl_in_memory", None),
             ("mmcl compiled vs open_clip_train", "mmcl_compile", "open_clip_train", TARGET_VS_OPENCLIP),
             ("pipeline efficiency, compiled", "mmcl_compile", "mmcl_in_memory_compile", TARGET_PIPELINE)]
    fixed = [n for n in rates if n.startswith("mmcl_threads_")]
    for name in fixed:
        n = name.rsplit("_", 1)[1]
        pairs += [(f"mmcl with {n} thread(s) vs open_clip_train as shipped", name,
                   "open_clip_train", TARGET_VS_OPENCLIP),
                  (f"mmcl vs open_clip_train, both with {n} thread(s)", name, f"open_clip_train_threads_{n}",
                   TARGET_VS_OPENCLIP),
                  (f"pipeline efficiency with {n} thread(s)", name, f"mmcl_in_memory_threads_{n}", TARGET_PIPELINE)]
    rows = [compare(rates, summary, *pair) for pair in pairs if pair[1] in rates and pair[2] in rates]
    return {"summary": summary, "comparisons": rows}


def compare(rates, summary, label: str, ours: str, theirs: str, target: float) -> dict:
    value = common.ratio(summary[ours], summary[theirs])
    return {"label": label, "ours": ours, "anchor": theirs, "ratio": value,
            "paired": common.paired_ratios(rates[ours], rates[theirs]), "target": target,
            "met": None if target is None else value is not None and value >= target}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="digits_clip_tiny", help="recipe name in recipes/ or a YAML path")
    p.add_argument("--data", default=None, help="dataset folder (default: the recipe's; digits are built)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=None, help="default: the recipe's")
    p.add_argument("--workers", type=int, default=None, help="default: the recipe's")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS,
                   help="what to run side by side (bf16 and compiled variants of both trainers are available)")
    p.add_argument("--threads-variant", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--ablation", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the in-memory step with model.packed_attention=false optim.fused=false")
    p.add_argument("--quick", action="store_true", help="one repeat")
    p.add_argument("--override", action="append", help=argparse.SUPPRESS)
    p.add_argument("--out", default="train_throughput.json")
    p.add_argument("--in-memory-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def resolve(args):
    """Fill the defaults that come from the recipe and check that the log windows line up."""
    if args.quick:
        args.repeats, args.warmup, args.steps = 1, 5, 10
    args.recipe_path = str(common.REPO / "recipes" / f"{args.recipe}.yaml") if "/" not in args.recipe else args.recipe
    if args.warmup % args.log_every or args.steps % args.log_every:
        raise SystemExit("--warmup and --steps must be multiples of --log-every")
    data_root = common.train_root(args.recipe_path, args.data)  # before the recipe, which checks the shards
    recipe = load_recipe(args.recipe, [])
    args.batch_size = args.batch_size or recipe.train.batch_size
    args.workers = recipe.data.workers if args.workers is None else args.workers
    return recipe, data_root


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.in_memory_child:
        return in_memory_child(args)
    recipe, data_root = resolve(args)
    openclip_anchor.ensure_env()
    from mmcl.models.factory import resolve_model_cfg

    model_cfg = resolve_model_cfg(recipe.model)
    machine = common.machine_info()
    runs = measure(args, data_root, model_cfg, recipe)
    settings = {"recipe": args.recipe, "data": str(data_root), "batch_size": args.batch_size, "workers": args.workers,
                "precision": "fp32 unless the variant says bf16", "variants": {n: VARIANTS.get(n) for n in runs}, "warmup_steps": args.warmup, "measured_steps": args.steps,
                "repeats": args.repeats, "model_cfg": model_cfg, "threads_variant": threads_for_fix(args.workers)}
    report = {"machine": machine, "load_average_end": os.getloadavg(), "settings": settings, "runs": runs,
              **comparisons(runs), "notes": NOTES}
    path = common.write_json(args.out, report)
    common.say(f"wrote {path}")
    return report


NOTES = [
    ("open_clip_train tokenizes the whole `txt` (all caption lines, truncated to the context length); mmcl draws "
     "one caption line per sample. Same model, batch, precision, workers and shards otherwise."),
    "open_clip_train runs with webdataset 0.2.86 (its pipeline breaks on 1.x); mmcl with webdataset 1.x.",
]


if __name__ == "__main__":
    main()
