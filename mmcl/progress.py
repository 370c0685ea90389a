"""Progress bars that suit where they are written: a live tqdm bar on a terminal, whole lines in a log file.

On a terminal tqdm redraws its bar in place with `\\r` about ten times a second. Written to a file (CI, `cmd >
log 2>&1`) the same redraws pile up as one endless line of `\\r`-separated bars, 80 of them for one CIFAR-10
evaluation pass. When the stream is not a terminal, `progress_bar` returns a `LogProgress` instead: it writes
one plain line each time another 10% is done or a minute has passed, never more than one line per 5 seconds,
and a last line when it closes (done, rate, elapsed time).
"""
from __future__ import annotations

import sys
import time
from typing import Dict, Optional, TextIO

from tqdm import tqdm


class LogProgress:
    """tqdm's update / set_postfix / close interface, written as whole lines for logs."""

    def __init__(self, total: Optional[int] = None, desc: str = "", unit: str = "it", initial: int = 0,
                 file: Optional[TextIO] = None, step: float = 0.1, min_interval: float = 5.0,
                 max_interval: float = 60.0, clock=time.monotonic):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.file, self.step, self.clock = file, step, clock
        self.min_interval, self.max_interval = min_interval, max_interval
        self.start = self.last = clock()
        self.start_n, self.last_n, self.postfix, self.closed = initial, initial, "", False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last < self.min_interval:
            return
        if now - self.last >= self.max_interval or self._crossed_step():
            self._write(now)

    def _crossed_step(self) -> bool:
        if not self.total:
            return False
        return int(self.n / (self.total * self.step)) > int(self.last_n / (self.total * self.step))

    def set_postfix(self, postfix: Optional[Dict[str, object]] = None, refresh: bool = False) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in (postfix or {}).items())

    def line(self, now: float) -> str:
        elapsed = now - self.start
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        done = f"{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)" if self.total else \
            f"{self.n} {self.unit}"
        text = f"{self.desc + ': ' if self.desc else ''}{done}, {rate:.1f} {self.unit}/s, {elapsed:.0f} s"
        return text + (f", {self.postfix}" if self.postfix else "")

    def _write(self, now: float) -> None:
        print(self.line(now), file=self.file or sys.stderr, flush=True)
        self.last, self.last_n = now, self.n

    def close(self) -> None:
        if not self.closed and self.n != self.last_n:
            self._write(self.clock())
        self.closed = True

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_terminal(stream: Optional[TextIO] = None) -> bool:
    stream = stream or sys.stderr
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def progress_bar(total: Optional[int] = None, desc: str = "", unit: str = "it", enabled: bool = True,
                 leave: bool = False, initial: int = 0, file: Optional[TextIO] = None):
    """A live tqdm bar on a terminal, a LogProgress elsewhere; a disabled tqdm when not `enabled`."""
    if not enabled:
        return tqdm(total=total, disable=True)
    if is_terminal(file):
        return tqdm(total=total, desc=desc, unit=unit, leave=leave, initial=initial, dynamic_ncols=True, file=file)
    return LogProgress(total, desc, unit, initial, file)
