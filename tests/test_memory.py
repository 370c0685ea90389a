"""train.keep_freed_memory (mmcl/memory.py): large freed blocks stay in the process for the next step.

Without it glibc returns a large freed tensor's pages to the kernel and the next allocation of the same size
faults every 4 KB page in again: 22,000 faults a step on digits_clip_tiny. Each case runs in a fresh process,
since the setting is process-wide and cannot be undone.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from mmcl import memory

pytestmark = pytest.mark.skipif(memory.glibc() is None, reason="needs Linux with glibc")

# a step's pattern: the 101 MB gradient of ViT-B/32's token embedding (49,408 x 512) and some activations, all
# freed at the end of the step. glibc's defaults map blocks over 32 MB afresh on every request and unmap them
# on free, so every step faults them in again.
CHILD = textwrap.dedent("""
    import json, resource, sys
    import torch
    from mmcl import memory
    took = memory.keep_freed_memory() if sys.argv[1] == "kept" else None

    def step():
        grad = torch.zeros(49408, 512)
        acts = [torch.ones(128, 65, 256) for _ in range(4)]
        grad.add_(acts[-1].sum())
        del acts, grad

    for _ in range(3):  # the heap grows to its size
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        step()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20
    print(json.dumps({"took": took, "faults_per_step": faults}))
""")


def faults_per_step(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kept_memory_removes_the_page_faults_of_each_step():
    kept, system = faults_per_step("kept"), faults_per_step("system")
    assert kept["took"] is True
    pages = 49408 * 512 * 4 // 4096  # 24,704 pages in the gradient alone
    assert system["faults_per_step"] > pages / 2  # glibc's defaults: the freed memory faults in again each step
    assert kept["faults_per_step"] < pages / 10  # kept: the same blocks again (0 to ~100 measured)


def test_keep_freed_memory_is_on_by_default_and_can_be_turned_off(tiny_recipe):
    from mmcl.config import load_recipe

    assert load_recipe(str(tiny_recipe())).train.keep_freed_memory is True
    assert load_recipe(str(tiny_recipe()), ["train.keep_freed_memory=false"]).train.keep_freed_memory is False
