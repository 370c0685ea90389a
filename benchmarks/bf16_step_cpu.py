"""bf16 autocast against fp32 on a CPU: mmcl's training step at three model sizes, per CPU kind.

    python benchmarks/bf16_step_cpu.py [--repeats 3] [--sizes tiny small vit_s]

Each (size, precision) runs benchmarks/step_speed.py in a fresh process (the trainer's own step on random
in-memory batches: no data pipeline), the precisions alternating within each repeat; the median samples/s of
the repeats is reported with bf16's ratio to fp32. Whether bf16 pays off depends on the CPU (oneDNN uses AMX
tiles or AVX512-BF16 where present) and on the model: autocast casts every weight on every step, which a
tiny model's matrix products do not repay. Results are kept per CPU model and flags in
benchmarks/results/bf16_step_cpu.json, so that runs on different machines sit side by side.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bf16_cpu  # noqa: E402
import common  # noqa: E402
import scale_out_cpu  # noqa: E402

RESULT = "bf16_step_cpu.json"
SMALL = {"embed_dim": 192,
         "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 192, "layers": 4, "head_width": 64},
         "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 192, "heads": 3, "layers": 4}}
# size -> (what it is, batch, model.config override or None for the recipe's own tower)
SIZES = {"tiny": ("digits_clip_tiny (ViT 32 px, width 64, 2 layers)", 128, None),
         "small": ("ViT 64 px patch 8, width 192, 4 + 4 layers", 128, SMALL),
         "vit_s": ("ViT-S-like 32 px patch 4, width 384, 12 + 6 layers", 32, scale_out_cpu.model_config(384))}


def step(size: str, precision: str, steps: int) -> dict:
    """One fresh process: the median step of `steps` after warm-up, as step_speed.py prints it."""
    _, batch, config = SIZES[size]
    out = common.WORK / "bf16_step" / f"{size}_{precision}"
    overrides = [f"train.precision={precision}", f"train.batch_size={batch}", f"train.output_dir={out}",
                 f"data.train=[{common.DIGITS}]"] + ([f"model.config={json.dumps(config)}"] if config else [])
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "step_speed.py"),
           str(common.REPO / "recipes" / "digits_clip_tiny.yaml"), "--steps", str(steps)]
    cmd += [f"--override={o}" for o in overrides]
    log = out.with_suffix(".log")
    result = common.run_logged(cmd, log, env=common.child_env())
    common.check_ok(result, log, f"step speed {size} {precision}")
    return json.loads(log.read_text().strip().splitlines()[-1])


def measure(sizes: list, repeats: int, steps: int) -> dict:
    rows = {}
    for size in sizes:
        runs = {"fp32": [], "bf16": []}
        for repeat in range(repeats):
            for precision in (("fp32", "bf16") if repeat % 2 == 0 else ("bf16", "fp32")):
                runs[precision].append(step(size, precision, steps)["samples_per_s"])
                common.say(f"{size} {precision}: {runs[precision][-1]:.1f} samples/s")
        median = {p: statistics.median(v) for p, v in runs.items()}
        rows[size] = {"model": SIZES[size][0], "batch": SIZES[size][1], "samples_per_s": runs,
                      "median": median, "bf16_over_fp32": median["bf16"] / median["fp32"]}
    return rows


def table(machines: dict) -> str:
    lines = ["| CPU (bf16 flags) | model | batch | fp32 samples/s | bf16 samples/s | bf16 / fp32 |",
             "|---|---|---|---|---|---|"]
    for entry in machines.values():
        cpu = f"{entry['machine']['cpu']} ({', '.join(entry['machine']['cpu_flags']) or 'none'})"
        for row in entry["sizes"].values():
            lines.append(f"| {cpu} | {row['model']} | {row['batch']} | {row['median']['fp32']:.1f} | "
                         f"{row['median']['bf16']:.1f} | {row['bf16_over_fp32']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    args = p.parse_args(argv)
    common.ensure_digits()
    machine = {**common.machine_info(), "cpu_flags": bf16_cpu.cpu_flags()}
    path = common.result_path(RESULT)
    machines = json.loads(path.read_text())["machines"] if path.is_file() else {}
    key = f"{machine['cpu']} [{' '.join(machine['cpu_flags'])}]"
    machines[key] = {"machine": machine, "repeats": args.repeats, "steps": args.steps,
                     "sizes": measure(args.sizes, args.repeats, args.steps)}
    common.write_json(RESULT, {"machines": machines})
    print(table(machines))
    return machines


if __name__ == "__main__":
    main()
