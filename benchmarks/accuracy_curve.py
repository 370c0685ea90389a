"""Accuracy against wall-clock time for both trainers of a budget run, and the time each needs to reach the
same zero-shot accuracy.

Both trainers save a checkpoint every epoch-length of steps (open_clip_train at its epoch ends, mmcl with
`save_every`, all kept). A checkpoint's time is its file's modification time minus the moment the training
process was started, so start-up counts. All checkpoints are scored in one child process by mmcl's evaluator
(zero-shot top-1 on the test split). For each target accuracy (TARGETS, fixed in advance) a trainer's time is
that of its first checkpoint at or above it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MAX_POINTS = 16  # checkpoints scored per trainer (evenly spaced, the last always included)
TARGETS = (0.5, 0.75, 0.9)  # zero-shot top-1 on the held-out digits (chance 0.1; both trainers end near 0.95)


def mmcl_points(run_dir: Path, started_at: float) -> List[dict]:
    from mmcl import runs

    return [{"step": int(c.name.split("_")[1]), "seconds": (c / "meta.json").stat().st_mtime - started_at,
             "path": str(c), "kind": "mmcl"} for c in runs.complete_checkpoints(run_dir)]


def openclip_points(run_dir: Path, started_at: float, steps_per_epoch: int) -> List[dict]:
    found = sorted(run_dir.glob("checkpoints/epoch_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    return [{"step": int(p.stem.split("_")[1]) * steps_per_epoch, "seconds": p.stat().st_mtime - started_at,
             "path": str(p), "kind": "open_clip_train"} for p in found]


def thin(points: List[dict], limit: int = MAX_POINTS) -> List[dict]:
    if len(points) <= limit:
        return points
    stride = len(points) / limit
    picked = {int(i * stride) for i in range(limit)} | {len(points) - 1}
    return [points[i] for i in sorted(picked)]


def score(points: Dict[str, List[dict]], model_cfg: dict, data: Path, workdir: Path) -> Dict[str, List[dict]]:
    """Zero-shot top-1 of every point, from one child process (the model is built once)."""
    request = workdir / "curve_request.json"
    request.write_text(json.dumps({"points": points, "model_cfg": model_cfg, "data": str(data)}))
    log = workdir / "curve.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), str(request)]
    common.check_ok(common.run_logged(cmd, log), log, "accuracy curve")
    return json.loads(log.read_text().strip().splitlines()[-1])


def child(request_path: str) -> None:
    import open_clip

    import mmcl.eval as mmcl_eval
    import openclip_anchor
    from mmcl.models import factory
    from mmcl.models.loading import run_towers_state

    request = json.loads(Path(request_path).read_text())
    model = factory.instantiate(request["model_cfg"]).eval()
    preprocess = open_clip.image_transform(factory.image_size(request["model_cfg"]), is_train=False)
    tokenizer = factory.make_tokenizer(request["model_cfg"])
    out = {}
    for trainer, points in request["points"].items():
        for point in points:
            path = Path(point["path"])
            state = run_towers_state(path) if point["kind"] == "mmcl" else openclip_anchor.checkpoint_state(path)
            model.load_state_dict(state)
            result = mmcl_eval.evaluate_dataset(model, preprocess, tokenizer, request["data"], split="test",
                                                task="zeroshot_classification", workers=0, progress=False)
            out.setdefault(trainer, []).append({**point, "acc1": result["metrics"]["acc1"]})
    print(json.dumps(out))


def time_to_target(curves: Dict[str, List[dict]], targets=TARGETS) -> dict:
    """For each target top-1: each trainer's first checkpoint time at or above it (None: never reached)."""
    best = {trainer: max((p["acc1"] for p in points), default=None) for trainer, points in curves.items()}
    rows = []
    for target in targets:
        reached: Dict[str, Optional[dict]] = {}
        for trainer, points in curves.items():
            first = next((p for p in sorted(points, key=lambda p: p["seconds"]) if p["acc1"] >= target), None)
            reached[trainer] = {"seconds": first["seconds"], "step": first["step"]} if first else None
        ours, theirs = reached.get("mmcl"), reached.get("open_clip_train")
        speedup = theirs["seconds"] / ours["seconds"] if ours and theirs and ours["seconds"] > 0 else None
        rows.append({"target": target, "reached": reached, "speedup": speedup,
                     "mmcl_faster": bool(ours and (not theirs or ours["seconds"] < theirs["seconds"]))})
    return {"best": best, "targets": rows}


def curve_summary(mmcl_run: Path, mmcl_start: float, openclip_run: Path, openclip_start: float,
                  steps_per_epoch: int, model_cfg: dict, data: Path, workdir: Path) -> dict:
    points = {"mmcl": thin(mmcl_points(mmcl_run, mmcl_start)),
              "open_clip_train": thin(openclip_points(openclip_run, openclip_start, steps_per_epoch))}
    curves = score(points, model_cfg, data, workdir)
    for values in curves.values():
        for p in values:
            p.pop("path", None)
    return {"curves": curves, **time_to_target(curves)}


if __name__ == "__main__":
    child(sys.argv[1])
