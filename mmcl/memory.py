"""Keep memory that torch frees inside the process, so the next step's tensors reuse it (glibc malloc).

glibc serves a large request with a fresh `mmap` and hands it back to the kernel on free (above 32 MB always,
e.g. the 101 MB gradient of ViT-B/32's token embedding; below that depending on its history), and trims the
heap's top once a few tens of MB are free there, as at the end of every backward pass. The next step asks
for the same memory again and the kernel zero-fills every 4 KB page on first touch: on mmcl's tiny recipes
that was 22,000 page faults and a fifth of every CPU step. Raising glibc's mmap and trim thresholds keeps the
freed blocks in the heap, as jemalloc or tcmalloc would (torch's `torch.backends.xeon.run_cpu` launcher
preloads one of those for the same reason). The cost: memory freed after a peak stays with the process until it exits, instead of going back to
the system. Linux with glibc only; elsewhere this does nothing.

The trainer applies it unless `train.keep_freed_memory: false`; evaluation, `mmcl embed` and search apply it
on their first batch. `MMCL_KEEP_FREED_MEMORY=0` in the environment turns it off everywhere.
"""
from __future__ import annotations

import ctypes
import os
import sys
from typing import Optional

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
MMAP_THRESHOLDS = (1 << 30, 32 << 20)  # glibc before 2.35 refuses thresholds above 32 MB on 64-bit machines
TRIM_THRESHOLD = (1 << 31) - 1  # the largest int: never trim the heap's top

_state: Optional[bool] = None


def glibc() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl or another C library
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); True when glibc took them."""
    global _state
    if _state is None:
        libc = glibc() if os.environ.get("MMCL_KEEP_FREED_MEMORY", "1") != "0" else None
        _state = bool(libc and any(libc.mallopt(M_MMAP_THRESHOLD, size) for size in MMAP_THRESHOLDS)
                      and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _state
