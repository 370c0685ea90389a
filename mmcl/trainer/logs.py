"""Training logs: JSONL metrics (the source of truth), the experiment trackers, and a progress bar on the main
process (a live bar on a terminal, a line every 10% or minute in a log file: mmcl.progress)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Dict, Optional

from tqdm import tqdm

from mmcl.progress import progress_bar

from mmcl.trainer.trackers import scalars


class RunLog:
    """Appends metric records to RUN/metrics.jsonl and mirrors their numbers to the experiment trackers
    (`tracker`: an Accelerator whose trackers were started, see mmcl.trainer.trackers; None for none)."""

    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int, progress: bool,
                 tracker=None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tracker = tracker if enabled else None
        self.bar = None
        if not enabled:
            return
        keep_until(self.path, start_step)
        if progress:
            self.bar = progress_bar(total_steps, "train", "step", leave=True, initial=start_step)

    def write(self, record: Dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(clean) + "\n")
        if self.tracker is not None:
            self.tracker.log(scalars(clean), step=record["step"])

    def warn(self, step: int, message: str) -> None:
        """One line `mmcl: warning: step N: ...` on stderr (main process), above the progress bar."""
        if self.enabled:
            tqdm.write(f"mmcl: warning: step {step}: {message}", file=sys.stderr)

    def progress(self, steps: int, postfix: Optional[Dict[str, str]] = None) -> None:
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(steps)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tracker is not None:
            # Finish the trackers only: Accelerator.end_training would also destroy the process group, which
            # the caller (a test, a notebook running several runs) may still use.
            for tracker in self.tracker.trackers:
                tracker.finish()
            self.tracker.trackers = []
            self.tracker = None


def keep_until(path: Path, step: int) -> None:
    """Drop records after `step`: those of an interrupted run past its last checkpoint, which the resumed run
    writes again (a fresh run, step 0, starts an empty log), and a line torn by a kill."""
    if path.is_file():
        kept = [r for r in parse_records(path.read_text()) if r.get("step", 0) <= step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def parse_records(text: str) -> list:
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # empty, or cut short when the process was killed mid-write
            continue
    return records


def read_metrics(run_dir: Path) -> list:
    path = Path(run_dir) / "metrics.jsonl"
    return parse_records(path.read_text()) if path.is_file() else []
