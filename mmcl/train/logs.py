"""Training logs: JSONL metrics (the source of truth), TensorBoard, and a progress bar on the main process."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Dict, Optional

from tqdm import tqdm


class RunLog:
    """Appends metric records to RUN/metrics.jsonl and mirrors scalars to TensorBoard (main process only)."""

    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int, progress: bool):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        self.bar = None
        if not enabled:
            return
        keep_until(self.path, start_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start_step + 1)
        except ImportError:  # tensorboard is optional at run time; JSONL always works
            self.tb = None
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def write(self, record: Dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(clean) + "\n")
        if self.tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(key, value, step)

    def warn(self, step: int, message: str) -> None:
        """One line `mmcl: warning: step N: ...` on stderr (main process), above the progress bar."""
        if self.enabled:
            tqdm.write(f"mmcl: warning: step {step}: {message}", file=sys.stderr)

    def progress(self, steps: int, postfix: Optional[Dict[str, str]] = None) -> None:
        if self.bar is not None:
            self.bar.update(steps)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


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
