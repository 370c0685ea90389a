"""What every side-by-side benchmark shares: paths, the machine and versions, statistics, runs, JSON.

The benchmark scripts are plain scripts (``python benchmarks/NAME.py``); they import this module from
their own folder. Results go to ``benchmarks/results/NAME.json``; scratch runs to ``runs/benchmarks/``.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
RESULTS = BENCH / "results"
SHARED_DATA = REPO.parent / "shared" / "data"
# where benchmarks keep their runs and scratch files (tests point it at a temporary folder)
WORK = Path(os.environ.get("MMCL_BENCH_WORK") or REPO / "runs" / "benchmarks")
DIGITS = REPO / "data" / "digits"
OPENCLIP_ENV = BENCH / ".openclip_env"  # webdataset 0.2.86 for open_clip_train's own pipeline
OPENCLIP_WEBDATASET = "0.2.86"


# ---- machine and versions -----------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def openclip_webdataset_version() -> Optional[str]:
    """The webdataset that open_clip_train runs with (the separate --target folder), if installed."""
    found = sorted(OPENCLIP_ENV.glob("webdataset-*.dist-info"))
    return found[0].name[len("webdataset-"):-len(".dist-info")] if found else None


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def gpu_name() -> Optional[str]:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def machine_info() -> dict:
    """CPU model, cores, memory, GPU, load and every version a reader needs to compare runs."""
    import torch

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "memory_gib": round(memory, 1), "gpu": gpu_name(),
        "load_average": [round(x, 2) for x in os.getloadavg()], "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__,
        "open_clip": package_version("open_clip_torch"), "webdataset": package_version("webdataset"),
        "webdataset_open_clip_train": openclip_webdataset_version(),
        "clip_benchmark": package_version("clip_benchmark"), "lightly": package_version("lightly"),
        "accelerate": package_version("accelerate"), "mmcl_commit": git_commit(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


# ---- statistics ---------------------------------------------------------------------------------

def summarize(values: Sequence[float]) -> dict:
    """Median, min and max of repeated measurements (the spread is (max - min) / median)."""
    values = [float(v) for v in values]
    if not values:
        return {"values": [], "median": None, "min": None, "max": None, "spread": None}
    median = statistics.median(values)
    spread = (max(values) - min(values)) / median if median else None
    return {"values": values, "median": median, "min": min(values), "max": max(values), "spread": spread}


def ratio(ours: dict, theirs: dict) -> Optional[float]:
    """Ratio of the medians of two summaries."""
    if not ours.get("median") or not theirs.get("median"):
        return None
    return ours["median"] / theirs["median"]


def paired_ratios(ours: Sequence[float], theirs: Sequence[float]) -> dict:
    """Ratios of interleaved repeats taken pairwise (repeat i of one against repeat i of the other)."""
    return summarize([a / b for a, b in zip(ours, theirs) if b])


# ---- files --------------------------------------------------------------------------------------

def result_path(out: str) -> Path:
    """A bare file name goes to benchmarks/results/; a path (with a folder) is taken as it is."""
    return Path(out) if os.sep in str(out) else RESULTS / out


def write_json(out: str, payload: dict) -> Path:
    path = result_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return path


def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_doc_section(doc: Path, start: str, end: str, table: str) -> None:
    """Replace the text between the markers `start` and `end` of `doc` (a README table) with `table`."""
    text = doc.read_text()
    if start not in text or end not in text:
        raise RuntimeError(f"{doc} lacks the {start} / {end} markers")
    head, rest = text.split(start, 1)
    doc.write_text(head + start + "\n" + table + "\n" + end + rest.split(end, 1)[1])


def ensure_digits(folder: Path = DIGITS) -> Path:
    """The embedded digits set, built with `mmcl data digits` when it is not there yet."""
    if not (folder / "train" / "sizes.json").is_file():
        subprocess.run([sys.executable, "-m", "mmcl", "data", "digits", "--out", str(folder), "--overwrite"],
                       cwd=REPO, check=True)
    return folder


def train_root(recipe_path: str, data: Optional[str] = None) -> Path:
    """The training data folder of a recipe (or `data`), relative paths taken from the repository; the embedded
    digits are built first when that is them, since loading a recipe checks that its shards exist."""
    from mmcl.config import load_tree

    root = Path(data) if data else Path(load_tree(recipe_path)["data"]["train"][0])
    root = root if root.is_absolute() else REPO / root
    return ensure_digits(root) if root.resolve() == DIGITS.resolve() else root


def shard_pattern(root: Path, split: str = "train") -> str:
    """`ROOT/SPLIT/{0..N-1}.tar` from nshards.txt: the brace pattern open_clip_train expects."""
    count = int((Path(root) / split / "nshards.txt").read_text().strip())
    return str(Path(root) / split / f"{{0..{count - 1}}}.tar")


def split_samples(root: Path, split: str = "train") -> int:
    return int(json.loads((Path(root) / split / "sizes.json").read_text())["samples"])


# ---- child processes ----------------------------------------------------------------------------

def child_env(**extra: str) -> Dict[str, str]:
    """The environment of a benchmark child: the repo importable, output unbuffered."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(extra)
    return env


def run_logged(cmd: List[str], log: Path, env: Optional[dict] = None, deadline: Optional[float] = None) -> dict:
    """Run `cmd` with stdout+stderr to `log`; stop its process group after `deadline` seconds.

    Returns {"returncode", "seconds", "stopped"}; `stopped` is True when the deadline ended it.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env or child_env(), cwd=REPO,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=deadline)
            stopped = False
        except subprocess.TimeoutExpired:
            stop_group(proc)
            code, stopped = proc.returncode, True
    return {"returncode": code, "seconds": time.perf_counter() - start, "stopped": stopped}


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the child's own process group (its DataLoader workers too), SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 20)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def check_ok(result: dict, log: Path, what: str) -> None:
    if result["returncode"] != 0 and not result["stopped"]:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:]) if log.is_file() else ""
        raise RuntimeError(f"{what} failed with exit code {result['returncode']}; end of {log}:\n{tail}")


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
