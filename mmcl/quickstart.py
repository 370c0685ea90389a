"""`mmcl quickstart`: the whole job on the embedded digits, from nothing to a results table and plots."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import mmcl

RECIPE = "digits_clip_tiny"


def quickstart(out: Path, steps: Optional[int] = None, overrides: Optional[List[str]] = None) -> dict:
    """Build the digit shards (once), train the tiny CLIP, evaluate zero-shot and retrieval, plot."""
    data = out / "data" / "digits"
    if not (data / "train" / "nshards.txt").is_file():
        mmcl.build_shards("digits", data, overwrite=True)
        print(f"built the embedded digits shards in {data}")
    run_dir = out / "run"
    settings = [f"data.train=[{data}]", f"eval.datasets=[{data}]", f"eval.retrieval=[{data}]",
                f"train.output_dir={run_dir}", *(overrides or [])]
    if steps is not None:
        settings.append(f"train.max_steps={steps}")
    summary = mmcl.train(RECIPE, overrides=settings)
    print(f"\nrun directory: {run_dir}\nplots: {', '.join(summary.get('plots', {}).values())}")
    return summary
