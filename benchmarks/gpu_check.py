"""The GPU check: ViT-B/32 training throughput and MFU, and evaluation speed, in bf16, in one short run.

    python benchmarks/gpu_check.py                 # on a GPU machine, about 5 minutes
    python benchmarks/gpu_check.py --dry-run       # anywhere: a tiny model on the CPU, to test the script

1. mmcl's optimizer step on synthetic batches already on the GPU (the ceiling; benchmarks/step_speed.py),
   with the model FLOPs of one step counted by torch.utils.flop_counter.FlopCounterMode;
   MFU = FLOPs x samples/s / (peak x GPUs) (H100 and H200 SXM: 989 TFLOP/s dense bf16). Variants, each
   in a fresh process: bf16 (the baseline), bf16 with `model.compile=true`, fp32.
   With two or more GPUs, one process per GPU: gradients all-reduced bucket by bucket during the backward
   pass (`train.grad_sync=overlap`, the default) vs after it (`after_backward`), and FSDP (`train.fsdp=true`).
   With one GPU that part says "not run".
2. `mmcl train` end to end on real shards, and open_clip_train (webdataset 0.2.86 from
   benchmarks/.openclip_env, carried to the machine) on the same shards, model, batch, bf16 and workers.
3. Zero-shot evaluation images/s and metric parity: mmcl's evaluator vs clip_benchmark, same export, bf16.

Data: `--data` (a dataset folder with train and test splits, e.g. a copy of ../shared/data/flickr8k);
without it, or when it is missing, synthetic JPEG shards are written first (the device machine does not
see ../shared). Writes benchmarks/results/gpu_check.json (gpu_check_dry_run.json with --dry-run).
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import openclip_anchor  # noqa: E402
import train_throughput as tt  # noqa: E402

PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}
TINY = {"embed_dim": 64, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def peak_flops(device_name: str, given=None):
    if given:
        return given * 1e12
    return next((v for k, v in PEAK_BF16.items() if k in (device_name or "")), None)


def write_synthetic(root: Path, train: int, test: int, size: int) -> Path:
    """Smooth random JPEGs with captions (train) and 10 labelled classes (test), in CLIP_benchmark's layout."""
    import numpy as np
    from PIL import Image

    from mmcl.data_pipelines.writers import ShardWriter

    rng = np.random.default_rng(0)
    words = ["red", "blue", "green", "small", "large", "round", "square", "dog", "cat", "car", "tree", "house"]
    for split, count, shard in (("train", train, max(1, train // 8)), ("test", test, max(1, test // 2))):
        with ShardWriter(str(root / split), shard_size=shard, overwrite=True) as writer:
            for i in range(count):
                small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
                image = Image.fromarray(small).resize((size, size), Image.BILINEAR)
                buf = io.BytesIO()
                image.save(buf, format="JPEG", quality=90)
                caption = "a " + " ".join(rng.choice(words, 4))
                writer.write({"__key__": f"{i:09d}", "jpg": buf.getvalue(), "txt": caption, "cls": str(i % 10)})
    (root / "classnames.txt").write_text("\n".join(f"class {c}" for c in "abcdefghij") + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of {c}.\nan image of {c}.\n")
    return root


def recipe_file(args, data: Path, out: Path) -> Path:
    import yaml

    model = {"config": TINY} if args.dry_run else {"arch": args.model}
    recipe = {"model": model, "data": {"train": [str(data)], "workers": args.workers},
              "optim": {"lr": 5e-4, "weight_decay": 0.2, "warmup_steps": 10},
              "train": {"output_dir": str(out), "batch_size": args.batch_size, "precision": "bf16", "epochs": 1000,
                        "max_steps": args.warmup + args.steps, "log_every": args.log_every, "save_every": 0,
                        "resume": "none", "progress": False}}
    path = out.parent / f"{out.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    return path


# mmcl's step in memory (benchmarks/step_speed.py), one fresh process per variant; bf16 is the baseline
VARIANTS = {"bf16": [], "bf16_compile": ["model.compile=true"], "fp32": ["train.precision=fp32"]}
# several processes, one per GPU (two gloo CPU processes in a dry run): how the gradients travel
SCALE_OUT = {"overlap": ["train.grad_sync=overlap"], "after_backward": ["train.grad_sync=after_backward"],
             "fsdp": ["train.fsdp=true"]}


def step_child(args, data: Path, name: str, overrides, processes: int = 1, count_flops: bool = False) -> dict:
    """Run benchmarks/step_speed.py on this recipe in a fresh process (under torchrun for several)."""
    out = common.WORK / "gpu" / f"step_{name}"
    tt.remove_tree(out)
    script = str(Path(__file__).resolve().parent / "step_speed.py")
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
                     str(29400 + os.getpid() % 500)]
    cmd = launcher + [script, str(recipe_file(args, data, out)), "--warmup", str(args.warmup),
                      "--steps", str(args.steps)] + [f"--override={o}" for o in overrides]
    cmd += ["--count-flops"] if count_flops else []
    log = out.with_suffix(".log")
    env = common.child_env(**({"CUDA_VISIBLE_DEVICES": ""} if args.dry_run and processes > 1 else {}))
    result = common.run_logged(cmd, log, env=env, deadline=args.step_limit)
    common.check_ok(result, log, f"step ({name})")
    if result["stopped"]:
        raise RuntimeError(f"step ({name}) stopped after --step-limit {args.step_limit:.0f} s; see {log}")
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"step ({name}) printed no result; see {log}")
    return json.loads(lines[-1])


def in_memory(args, data: Path) -> dict:
    """The bf16 / compiled / fp32 step of one process; model FLOPs counted once (the same math in all)."""
    out = {name: step_child(args, data, name, overrides, count_flops=name == "bf16")
           for name, overrides in VARIANTS.items()}
    return {**out["bf16"], "variants": out}


def scale_out(args, data: Path) -> dict:
    """Overlapped vs after-backward gradient all-reduce, and FSDP, with one process per GPU."""
    import torch

    processes = 2 if args.dry_run else torch.cuda.device_count()
    if processes < 2:
        return {"status": f"not run: {processes} GPU (overlap and FSDP need two processes, one per GPU)"}
    return {"processes": processes,
            "variants": {name: step_child(args, data, name, overrides, processes)
                         for name, overrides in SCALE_OUT.items()}}


def end_to_end_mmcl(args, data: Path) -> dict:
    out = common.WORK / "gpu" / "mmcl_e2e"
    tt.remove_tree(out)
    cmd = [sys.executable, "-m", "mmcl", "train", str(recipe_file(args, data, out))]
    log = out.with_suffix(".log")
    common.check_ok(common.run_logged(cmd, log, deadline=args.run_limit), log, "mmcl train")
    return {"samples_per_s": tt.mmcl_rate(out / "metrics.jsonl", args.warmup, args.steps, args.batch_size)}


def end_to_end_openclip(args, data: Path) -> dict:
    if common.openclip_webdataset_version() != common.OPENCLIP_WEBDATASET:
        return {"status": f"skipped: {common.OPENCLIP_ENV} (webdataset {common.OPENCLIP_WEBDATASET}) not present"}
    import torch

    work = common.WORK / "gpu"
    name = "bench-tiny" if args.dry_run else args.model
    models = openclip_anchor.write_model_config(work / "openclip_models", "bench-tiny", TINY)
    run = openclip_anchor.AnchorRun(
        model_dir=models, model_name=name, data_root=data, batch_size=args.batch_size, workers=args.workers,
        samples_per_epoch=(args.warmup + args.steps + 2) * args.batch_size, epochs=1, logs=work / "openclip_logs",
        name="e2e", lr=5e-4, weight_decay=0.2, warmup=10, precision="amp_bf16", log_every=args.log_every,
        device="cuda" if torch.cuda.is_available() else "cpu")
    tt.remove_tree(run.run_dir)
    log = work / "openclip_e2e.log"
    common.check_ok(common.run_logged(run.command(), log, env=openclip_anchor.env(), deadline=args.run_limit),
                    log, "open_clip_train")
    return tt.openclip_rate(log.read_text(errors="replace"), args.warmup, args.steps, args.batch_size)


def evaluation(args, data: Path) -> dict:
    """mmcl's evaluator vs clip_benchmark on the test split: images/s (best of 2 each), largest metric difference.

    Both run under bf16 autocast, so the metrics may differ where bf16 rounding flips a near tie.
    """
    import open_clip
    import torch

    from mmcl.eval import evaluate_dataset

    export = common.WORK / "gpu" / "export"
    export.mkdir(parents=True, exist_ok=True)
    cfg = TINY if args.dry_run else open_clip.get_model_config(args.model)
    save_export(cfg, export)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if hasattr(torch, "set_autocast_dtype"):
        torch.set_autocast_dtype(device, torch.bfloat16)  # both tools call torch.autocast(device): bf16 for both
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export}", device=device)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{export}")
    model.eval()
    ours, mmcl_seconds, cb_seconds = None, [], []
    for repeat in range(2):  # alternate the tools; the first pass also warms the page cache and kernels
        for tool in (("clip_benchmark", "mmcl") if repeat == 0 else ("mmcl", "clip_benchmark")):
            start = time.perf_counter()
            if tool == "mmcl":
                ours = evaluate_dataset(model, preprocess, tokenizer, str(data), split="test", device=device,
                                        batch_size=args.eval_batch, workers=args.workers, amp=True)
                mmcl_seconds.append(time.perf_counter() - start)
            else:
                theirs = clip_benchmark_eval(model, preprocess, tokenizer, data, args, device)
                cb_seconds.append(time.perf_counter() - start)
    mmcl_seconds, cb_seconds = min(mmcl_seconds), min(cb_seconds)
    diff = max(abs(ours["metrics"][k] - v) for k, v in theirs.items() if not math.isnan(v) and ours["metrics"].get(k) is not None)
    images = ours["samples"]
    return {"images": images, "mmcl_images_per_s": images / mmcl_seconds,
            "clip_benchmark_images_per_s": images / cb_seconds, "speedup": cb_seconds / mmcl_seconds,
            "max_metric_difference": diff, "metrics": ours["metrics"]}


def save_export(cfg: dict, folder: Path) -> None:
    import dataclasses

    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    preprocess = dataclasses.asdict(open_clip.transform.PreprocessCfg(size=cfg["vision_cfg"]["image_size"]))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}))


def clip_benchmark_eval(model, preprocess, tokenizer, data: Path, args, device: str):
    from clip_benchmark_cli import numpy2_accuracy
    import torch
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification as zc

    zc.accuracy = numpy2_accuracy
    ds = build_dataset(f"wds/{data.name}", root=str(data), transform=preprocess, split="test",
                       task="zeroshot_classification")
    workers = min(args.workers, int((data / "test" / "nshards.txt").read_text()))
    loader = torch.utils.data.DataLoader(ds.batched(args.eval_batch), batch_size=None, num_workers=workers)
    return zc.evaluate(model, loader, tokenizer, ds.classes, ds.templates, device, amp=True)


def resolve_data(args):
    """(train root, eval root): the given folders, or synthetic shards written here when they are missing."""
    train = Path(args.data) if args.data else None
    evaluate = Path(args.eval_data) if args.eval_data else None
    if train and (train / "train" / "nshards.txt").is_file() and evaluate and (evaluate / "test").is_dir():
        return train, evaluate
    size = 64 if args.dry_run else 256
    counts = (256, 128) if args.dry_run else (8192, 4096)
    root = write_synthetic(common.WORK / "gpu" / "synthetic", *counts, size)
    return (train if train and (train / "train" / "nshards.txt").is_file() else root,
            evaluate if evaluate and (evaluate / "test").is_dir() else root)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--eval-batch", type=int, default=512)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--workers", type=int, default=None, help="default: cores - 2, at most 12")
    p.add_argument("--data", default=None, help="training dataset folder (default: synthetic shards)")
    p.add_argument("--eval-data", default=None, help="classification dataset folder with a test split")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak (default: from its name)")
    p.add_argument("--run-limit", type=float, default=180.0, help="seconds allowed per training process")
    p.add_argument("--step-limit", type=float, default=420.0,
                   help="seconds allowed per in-memory step process (compiling included)")
    p.add_argument("--dry-run", action="store_true", help="tiny model, CPU allowed, a few steps")
    p.add_argument("--only", nargs="+", choices=STAGES, default=list(STAGES), help="run only these parts")
    p.add_argument("--out", default=None, help="default: gpu_check.json (gpu_check_dry_run.json with --dry-run)")
    args = p.parse_args(argv)
    args.out = args.out or ("gpu_check_dry_run.json" if args.dry_run else "gpu_check.json")
    if args.dry_run:
        args.batch_size, args.eval_batch, args.warmup, args.steps, args.log_every = 16, 64, 2, 4, 2
    if args.workers is None:
        args.workers = 2 if args.dry_run else max(1, min(12, (os.cpu_count() or 4) - 2))
    return args


def stage(report: dict, name: str, fn, *fn_args) -> None:
    """Run one part; a failure is recorded and the others still run (the lease is short)."""
    common.say(f"gpu check: {name}")
    start = time.perf_counter()
    try:
        report[name] = fn(*fn_args)
    except Exception as err:  # noqa: BLE001 - recorded in the JSON, the script goes on
        report[name] = {"status": f"failed: {type(err).__name__}: {err}"[:2000]}
    report[name]["seconds"] = time.perf_counter() - start
    common.say(f"  {json.dumps(report[name], default=str)[:300]}")


def add_mfu(report: dict, peak) -> None:
    """Achieved TFLOP/s and MFU of every measured rate (several processes: against the peak of all their GPUs)."""
    flops = report.get("in_memory", {}).get("flops_per_sample")
    rows = [report.get(name, {}) for name in ("in_memory", "mmcl_end_to_end", "open_clip_train_end_to_end")]
    for part in ("in_memory", "scale_out"):
        rows += list(report.get(part, {}).get("variants", {}).values())
    for row in rows:
        rate = row.get("samples_per_s")
        if flops and rate:
            row["achieved_tflops"] = flops * rate / 1e12
            row["mfu"] = flops * rate / (peak * row.get("world", 1)) if peak else None


def not_run(out: str) -> dict:
    """No GPU here: keep the results of an earlier GPU run, else record that the check was not run."""
    earlier = common.read_json(common.result_path(out))
    if earlier and earlier.get("status") == "ok":
        common.say(f"no GPU here; keeping the GPU results of {earlier['machine'].get('date')} in {out}")
        return earlier
    report = {"status": "not run: no GPU lent in this session (the script is tested with --dry-run)",
              "machine": common.machine_info()}
    common.write_json(out, report)
    return report


STAGES = {"in_memory": in_memory, "scale_out": scale_out, "mmcl_end_to_end": end_to_end_mmcl,
          "open_clip_train_end_to_end": end_to_end_openclip, "evaluation": evaluation}


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available() and not args.dry_run:
        return not_run(args.out)
    train_data, eval_data = resolve_data(args)
    machine = common.machine_info()
    peak = peak_flops(machine["gpu"], args.peak_tflops)
    report = {"status": "dry run (CPU, tiny model)" if args.dry_run else "ok", "machine": machine,
              "settings": {"model": "tiny" if args.dry_run else args.model, "batch_size": args.batch_size,
                           "precision": "bf16", "warmup_steps": args.warmup, "measured_steps": args.steps,
                           "workers": args.workers, "train_data": str(train_data), "eval_data": str(eval_data),
                           "peak_flops": peak}}
    for name in args.only:
        stage(report, name, STAGES[name], args, eval_data if name == "evaluation" else train_data)
    add_mfu(report, peak)
    e2e = report.get("mmcl_end_to_end", {}).get("samples_per_s")
    anchor = report.get("open_clip_train_end_to_end", {}).get("samples_per_s")
    report["mmcl_vs_open_clip_train"] = e2e / anchor if e2e and anchor else None
    ceiling = report.get("in_memory", {}).get("samples_per_s")
    report["pipeline_efficiency"] = e2e / ceiling if e2e and ceiling else None
    path = common.write_json(args.out, report)
    common.say(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
