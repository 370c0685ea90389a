"""Every side-by-side comparison in one run on this machine, then the results table.

    python benchmarks/run_all.py                 # the suite (about 45-60 min on 2 busy CPU cores)
    python benchmarks/run_all.py --quick         # a smoke run (about 15 min); results in results/quick/
    python benchmarks/run_all.py --only ssl eval # some steps; the table still shows every JSON there is
    python benchmarks/run_all.py --render        # only redraw the table from the JSON files

Steps, in order (each a script of its own, run as a child process; a failing step is reported and the
others still run):
  throughput    train_throughput.py      mmcl vs open_clip_train samples/s; pipeline efficiency
  budget        learning_budget.py       same wall-clock budget, digits and Flickr8k, judged by one evaluator
  budget_threads  learning_budget.py --mmcl-threads N: the same with mmcl on cores - workers threads
                (a thread-policy variant; only with --only budget_threads)
  loss          loss_scaling.py          ClipLoss dense / chunked vs open_clip, B = 1k ... 65k (own script)
  eval          eval_vs_clip_benchmark.py  mmcl eval vs clip_benchmark and vs the model's ceiling, 3 model sizes,
                fp32 and bf16 (about 40 min; resumable, --sizes splits it)
  eval_threads  eval_threads.py          mmcl eval's images/s for workers 0-2 x threads 1-2: the thread policy
  ssl           ssl_throughput.py        SimCLR step vs a lightly NTXentLoss loop, samples/s and loss parity
  ssl_evidence  ssl_evidence.py          only with --with-ssl-evidence (long; its owner runs it)
  gpu           gpu_check.py             on a GPU; on a CPU it records "not run" (--quick: a CPU dry run)

Results: benchmarks/results/*.json; the table goes to benchmarks/README.md and README.md between
their `results:begin` / `results:end` markers. With --quick, results and table go to benchmarks/results/quick/.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import report  # noqa: E402

STEPS = ["throughput", "budget", "budget_threads", "loss", "eval", "eval_threads", "ssl", "ssl_evidence", "gpu",
         "lit"]
OPTIONAL = ("budget_threads", "ssl_evidence")  # run only when named with --only


def script(name: str) -> List[str]:
    return [sys.executable, str(common.BENCH / name)]


def commands(quick: bool, results: Path) -> Dict[str, List[str]]:
    """The command of every step, for the full suite or the quick smoke run."""
    out = lambda name: ["--out", str(results / name)]
    q = ["--quick"] if quick else []
    threads = max(1, (os.cpu_count() or 1) - 2)  # the recipes' 2 loader workers keep their cores
    cmds = {
        "throughput": script("train_throughput.py") + q + out("train_throughput.json"),
        "budget": script("learning_budget.py") + q + out("learning_budget.json"),
        "budget_threads": script("learning_budget.py") + q + ["--mmcl-threads", str(threads)] +
        out("learning_budget_threads.json"),
        "ssl": script("ssl_throughput.py") + q + out("ssl_throughput.json"),
        "ssl_evidence": script("ssl_evidence.py") + (["--max-steps", "5"] if quick else []),
        "gpu": script("gpu_check.py") + (["--dry-run"] if quick else []) + out("gpu_check.json"),
        "lit": script("lit_budget.py") + (["--quick", "--only", "lit"] if quick else []) + out("lit_budget.json"),
    }
    if quick:
        cmds["loss"] = script("loss_scaling.py") + ["--sizes", "1024", "4096", "--repeats", "1", "--no-docs"] + \
            out("loss_scaling.json")
        cmds["eval"] = script("eval_vs_clip_benchmark.py") + ["--sizes", "tiny32", "--repeats", "1"] + \
            out("eval_vs_clip_benchmark.json")
        cmds["eval_threads"] = script("eval_threads.py") + ["--sizes", "tiny32", "--repeats", "1"] + \
            out("eval_threads.json")
    else:
        cmds["loss"] = script("loss_scaling.py") + ["--no-docs"]
        cmds["eval"] = script("eval_vs_clip_benchmark.py")
        cmds["eval_threads"] = script("eval_threads.py")
    return cmds


def run_step(name: str, cmd: List[str], logs: Path) -> dict:
    """Run one step with its output streamed to the console and to its log."""
    common.say(f"step {name}: {' '.join(cmd[1:])}")
    log = logs / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=common.child_env(), cwd=common.REPO)
        for line in proc.stdout:
            f.write(line)
            if not line.startswith(("I1", "W1")):  # torch's verbose dynamo lines stay in the log only
                print(f"  {name} | {line}", end="", flush=True)
        code = proc.wait()
    seconds = time.perf_counter() - start
    common.say(f"step {name}: {'ok' if code == 0 else f'FAILED (exit {code}), see {log}'} in {seconds / 60:.1f} min")
    return {"returncode": code, "seconds": seconds, "log": str(log)}


def selected(args) -> List[str]:
    steps = args.only or [s for s in STEPS if s not in OPTIONAL or (s == "ssl_evidence" and args.with_ssl_evidence)]
    return [s for s in steps if s not in (args.skip or [])]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--quick", action="store_true", help="short settings; results in benchmarks/results/quick/")
    p.add_argument("--only", nargs="+", choices=STEPS, help="run these steps only")
    p.add_argument("--skip", nargs="+", choices=STEPS, help="leave these steps out")
    p.add_argument("--with-ssl-evidence", action="store_true", help="also run ssl_evidence.py (long)")
    p.add_argument("--render", action="store_true", help="only redraw the table from the JSON files")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    results = common.RESULTS / "quick" if args.quick else common.RESULTS
    status = {}
    if not args.render:
        cmds, logs = commands(args.quick, results), common.WORK / "run_all" / ("quick" if args.quick else "full")
        if args.quick and "ssl_evidence" in selected(args):
            common.say("ssl_evidence writes its own results and docs; --quick leaves it out")
        for name in selected(args):
            if args.quick and name == "ssl_evidence":
                continue
            status[name] = run_step(name, cmds[name], logs)
    targets = [results / "README.md"] if args.quick else [common.BENCH / "README.md", common.REPO / "README.md"]
    if args.quick:
        (results / "README.md").parent.mkdir(parents=True, exist_ok=True)
        (results / "README.md").write_text(f"# Quick run (smoke settings)\n\n{report.BEGIN}\n{report.END}\n")
    print(report.write_all(results, targets))
    failed = [name for name, s in status.items() if s["returncode"] != 0]
    for name, s in status.items():
        common.say(f"{name}: {'ok' if s['returncode'] == 0 else 'FAILED'} ({s['seconds'] / 60:.1f} min)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
