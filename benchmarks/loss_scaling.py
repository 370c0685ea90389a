"""CLIP loss forward+backward time and peak memory vs batch size: mmcl dense, mmcl chunked, open_clip.

    PYTHONPATH=. python benchmarks/loss_scaling.py                # all sizes, writes the JSON and the table
    PYTHONPATH=. python benchmarks/loss_scaling.py --sizes 1024 4096 --no-docs

Every (mode, batch) runs in its own subprocess so that peak memory is that configuration's alone. Method:
the child creates the features, reads its peak resident set size (``ru_maxrss``), runs forward+backward,
and reads ``ru_maxrss`` again; ``loss_peak_mb`` is the difference (logits, softmax, gradients of the
features: everything the loss adds), ``process_peak_mb`` the whole process (Python, torch, features).
No tracemalloc (it does not see torch's allocator). Time is the best of ``repeats`` runs, as CPU time of
the process (user + system) and as wall clock. Runs use one thread by default: on a machine shared with
other jobs the CPU time of one thread is what the loss costs, while wall time and multi-thread CPU time
depend on the neighbours (OpenMP threads spin while they wait for a descheduled peer).

Dense configurations whose B x B matrices cannot fit the memory limit are recorded as skipped (out of
memory) without being started: the machine is shared and the OOM killer picks its own victims. A child
also runs under RLIMIT_AS, so an underestimate turns into a clean "out of memory" record, not a crash.
"""

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("dense", "chunked", "open_clip")
REFERENCE_BATCH = 8192
DOCS_BEGIN, DOCS_END = "<!-- loss_scaling:begin -->", "<!-- loss_scaling:end -->"
# The dense loss holds at least the logits, their log-softmax and the logits' gradient (B x B each).
DENSE_MATRICES = 3


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def build_loss(mode: str, chunk_size: int):
    """loss(image, text, scale) for one mode; the two mmcl modes normalise inside the loss."""
    import torch.nn.functional as F

    if mode == "open_clip":
        from open_clip.loss import ClipLoss as OpenClipLoss
        loss = OpenClipLoss()
        return lambda image, text, scale: loss(F.normalize(image, dim=-1), F.normalize(text, dim=-1), scale)
    from mmcl.losses import ClipLoss
    return ClipLoss(chunk_size=chunk_size if mode == "chunked" else None)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(mode: str, batch: int, dim: int, chunk_size: int, repeats: int, threads: int) -> dict:
    """Child process: time and peak memory of forward+backward for one configuration."""
    import torch

    torch.set_num_threads(threads)
    loss_fn = build_loss(mode, chunk_size)
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(batch, dim, generator=generator).requires_grad_()
    text = torch.randn(batch, dim, generator=generator).requires_grad_()
    logit_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    baseline = peak_rss_mb()
    seconds, cpu = [], []
    for _ in range(repeats):
        image.grad = text.grad = logit_scale.grad = None
        start, start_cpu = time.perf_counter(), cpu_seconds()
        loss = loss_fn(image, text, logit_scale.exp())
        loss.backward()
        seconds.append(time.perf_counter() - start)
        cpu.append(cpu_seconds() - start_cpu)
    return {"status": "ok", "seconds": min(seconds), "cpu_seconds": min(cpu), "seconds_all": seconds,
            "cpu_seconds_all": cpu, "loss": loss.item(),
            "loss_peak_mb": peak_rss_mb() - baseline, "process_peak_mb": peak_rss_mb(),
            "threads": torch.get_num_threads()}


def child_main(args) -> None:
    limit = int(args.memory_limit_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        result = measure(args.one, args.batch, args.dim, args.chunk_size, args.repeats, args.threads)
    except (RuntimeError, MemoryError) as error:
        if "memory" not in str(error).lower() and not isinstance(error, MemoryError):
            raise
        result = {"status": "skipped (out of memory)", "detail": str(error).splitlines()[0][:200]}
    print(json.dumps(result))


def dense_needs_gb(batch: int) -> float:
    return DENSE_MATRICES * batch * batch * 4 / 2**30


def run_config(mode: str, batch: int, args) -> dict:
    """One configuration in a fresh subprocess, or a skip record when dense cannot fit."""
    record = {"mode": mode, "batch": batch, "dim": args.dim,
              "chunk_size": args.chunk_size if mode == "chunked" else None}
    if mode != "chunked" and dense_needs_gb(batch) > args.memory_limit_gb:
        return {**record, "status": "skipped (out of memory)",
                "detail": f"the {batch} x {batch} logits need >= {dense_needs_gb(batch):.0f} GB "
                          f"(logits, log-softmax, gradient); limit {args.memory_limit_gb:g} GB"}
    repeats = args.repeats if batch <= REFERENCE_BATCH else 1
    command = [sys.executable, __file__, "--one", mode, "--batch", str(batch), "--dim", str(args.dim),
               "--chunk-size", str(args.chunk_size), "--repeats", str(repeats),
               "--memory-limit-gb", str(args.memory_limit_gb), "--threads", str(args.threads)]
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=python_path)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {**record, "status": f"failed (exit {done.returncode})", "detail": done.stderr[-500:]}
    return {**record, **json.loads(done.stdout.strip().splitlines()[-1])}


def summarise(results: list, chunk_size: int) -> dict:
    """The two targets: chunked peak at the largest batch, and its time vs dense at 8192 scaled by B^2."""
    by_key = {(r["mode"], r["batch"]): r for r in results}
    largest = max(r["batch"] for r in results)
    chunked, reference = by_key.get(("chunked", largest)), by_key.get(("dense", REFERENCE_BATCH))
    summary = {"largest_batch": largest, "chunk_size": chunk_size}
    if chunked and chunked["status"] == "ok":
        summary["chunked_loss_peak_mb"] = round(chunked["loss_peak_mb"])
        summary["chunked_process_peak_mb"] = round(chunked["process_peak_mb"])
        summary["peak_under_2gb"] = chunked["loss_peak_mb"] < 2048
    if chunked and reference and chunked["status"] == reference["status"] == "ok":
        for clock in ("cpu_seconds", "seconds"):
            scaled = reference[clock] * (largest / REFERENCE_BATCH) ** 2
            summary[f"dense_8192_scaled_{clock}"] = round(scaled, 1)
            summary[f"time_ratio_{clock}"] = round(chunked[clock] / scaled, 3)
        summary["time_within_1_5x"] = summary["time_ratio_cpu_seconds"] <= 1.5
    return summary


def markdown_table(results: list) -> str:
    lines = ["| B | loss | fwd+bwd CPU time (s) | wall time (s) | loss peak memory (MB) | process peak (MB) "
             "| status |", "|---:|---|---:|---:|---:|---:|---|"]
    for r in results:
        name = f"mmcl chunked ({r['chunk_size']})" if r["mode"] == "chunked" else \
            {"dense": "mmcl dense", "open_clip": "open_clip ClipLoss"}[r["mode"]]
        ok = r["status"] == "ok"
        cells = [f"{r['cpu_seconds']:.2f}", f"{r['seconds']:.2f}", f"{r['loss_peak_mb']:.0f}",
                 f"{r['process_peak_mb']:.0f}"] if ok else ["-"] * 4
        lines.append(f"| {r['batch']:,} | {name} | " + " | ".join(cells) + f" | {r['status']} |")
    return "\n".join(lines)


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import torch
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "load_average_start": os.getloadavg()}


def update_docs(path: Path, table: str, summary: dict) -> None:
    """Replace the text between the loss_scaling markers in the docs page with the new table."""
    text = path.read_text()
    if DOCS_BEGIN not in text or DOCS_END not in text:
        raise SystemExit(f"{path} lacks the {DOCS_BEGIN} / {DOCS_END} markers")
    body = f"{DOCS_BEGIN}\n{table}\n\nSummary: `{json.dumps(summary)}`\n{DOCS_END}"
    head, rest = text.split(DOCS_BEGIN, 1)
    path.write_text(head + body + rest.split(DOCS_END, 1)[1])


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 8192, 16384, 65536])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per size up to 8192 (1 above)")
    parser.add_argument("--memory-limit-gb", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (default 1: CPU time stays meaningful on a shared machine)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "loss_scaling.json")
    parser.add_argument("--docs", type=Path, default=REPO / "README.md")
    parser.add_argument("--no-docs", action="store_true", help="do not update the table in --docs")
    parser.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.one:
        return child_main(args)
    info, results = machine(), []
    for batch in args.sizes:
        for mode in args.modes:
            results.append(run_config(mode, batch, args))
            print(json.dumps(results[-1]), flush=True)
    info["load_average_end"] = os.getloadavg()
    summary = summarise(results, args.chunk_size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": info, "summary": summary, "results": results}, indent=2) + "\n")
    table = markdown_table(results)
    print(table + "\n\n" + json.dumps(summary))
    if not args.no_docs:
        update_docs(args.docs, table, summary)


if __name__ == "__main__":
    main()
