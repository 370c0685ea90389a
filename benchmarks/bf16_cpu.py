"""bf16 autocast on a CPU against fp32: the time each needs to reach the same zero-shot accuracy on the digits.

    python benchmarks/bf16_cpu.py [--repeats 1]

`mmcl train digits_clip_tiny` runs whole (16 epochs, its own schedule), once with `train.precision=fp32` and
once with `train.precision=bf16` (torch.autocast on the CPU: oneDNN's bf16 matmuls, AVX512-BF16 or AMX where
the CPU has them), in fresh processes, alternating, and saves a checkpoint every epoch (all kept). Every
checkpoint is scored by mmcl's evaluator in fp32 (benchmarks/accuracy_curve.py): zero-shot top-1 on the
held-out digits, against seconds since the process started. Reported per precision: the first time at or
above each target (0.5, 0.75, 0.9), the final accuracy, the whole run's seconds and the CPU's bf16 flags.

Writes benchmarks/results/bf16_cpu.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy_curve  # noqa: E402
import common  # noqa: E402

RECIPE = "digits_clip_tiny"
PRECISIONS = ("fp32", "bf16")


def cpu_flags() -> list:
    """The CPU features bf16 speed depends on (lscpu's flags: AMX tiles, AVX512-BF16)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith("amx") or f in ("avx512_bf16", "avx512f", "avx512_vnni"))


def train(precision: str, tag: str, steps_per_epoch: int) -> dict:
    out = common.WORK / "bf16_cpu" / tag
    cmd = [sys.executable, "-m", "mmcl", "train", RECIPE, f"data.train=[{common.DIGITS}]", f"train.precision={precision}",
           f"train.output_dir={out}", "train.resume=none", "train.progress=false", f"train.save_every={steps_per_epoch}",
           "train.keep_last=1000", "eval.datasets=[]", "eval.retrieval=[]"]
    log = out.with_suffix(".log")
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    started = time.time()
    result = common.run_logged(cmd, log)
    common.check_ok(result, log, f"mmcl train ({tag})")
    return {"run_dir": out, "started": started, "seconds": result["seconds"]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", default="bf16_cpu.json")
    args = p.parse_args(argv)
    common.ensure_digits()
    from mmcl.config import load_recipe
    from mmcl.models.factory import resolve_model_cfg

    recipe = load_recipe(str(common.REPO / "recipes" / f"{RECIPE}.yaml"), [f"data.train=[{common.DIGITS}]"])
    steps_per_epoch = common.split_samples(common.DIGITS) // recipe.train.batch_size
    machine, runs = common.machine_info(), {}
    for repeat in range(args.repeats):
        order = PRECISIONS if repeat % 2 == 0 else PRECISIONS[::-1]
        for precision in order:
            tag = f"{precision}_r{repeat}"
            common.say(f"bf16 vs fp32: {tag}")
            done = train(precision, tag, steps_per_epoch)
            points = {tag: accuracy_curve.mmcl_points(done["run_dir"], done["started"])}
            curve = accuracy_curve.score(points, resolve_model_cfg(recipe.model), common.DIGITS,
                                         common.WORK / "bf16_cpu")[tag]
            reached = accuracy_curve.time_to_target({tag: curve})
            runs.setdefault(precision, []).append(
                {"seconds": done["seconds"], "final_acc1": curve[-1]["acc1"], "curve": curve,
                 "time_to": {str(r["target"]): r["reached"][tag] for r in reached["targets"]}})
            common.say(f"  {done['seconds']:.0f} s, final top-1 {curve[-1]['acc1']:.3f}, "
                       f"0.9 at {runs[precision][-1]['time_to']['0.9']}")
    report = {"machine": {**machine, "cpu_flags": cpu_flags()}, "load_average_end": os.getloadavg(),
              "settings": {"recipe": RECIPE, "repeats": args.repeats, "checkpoint_every": steps_per_epoch},
              "runs": runs, "summary": summarize(runs)}
    path = common.write_json(args.out, report)
    common.say(f"wrote {path}")
    return report


def summarize(runs: dict) -> dict:
    """Median over repeats of each precision's time to each target (None when a run never reached it)."""
    out = {}
    for precision, results in runs.items():
        times = {}
        for target in map(str, accuracy_curve.TARGETS):
            seconds = [r["time_to"][target]["seconds"] for r in results if r["time_to"][target]]
            times[target] = statistics.median(seconds) if len(seconds) == len(results) else None
        out[precision] = {"time_to": times, "final_acc1": statistics.median(r["final_acc1"] for r in results),
                          "run_seconds": statistics.median(r["seconds"] for r in results)}
    return out


if __name__ == "__main__":
    main()
