"""Fuzz: seeded random mutations of every shipped recipe through `mmcl train --dry-run`.

Each recipe has its data and eval folders pointed at the embedded digits and its output folder at a temporary
one (the mutations then reach past the data checks), and is mutated by tests/recipe_mutations.py: values,
types, keys, YAML syntax, command-line overrides. Every case must either dry-run (exit 0) or stop with exit 2
and exactly one line `mmcl: error: ...`; no traceback, and nothing written in either case. Cases run in
process through `mmcl.cli.main` (a fresh `python -m mmcl` costs seconds of imports); two also run through
the real command. Case i of recipe R is `random.Random(f"{SEED}:{R}:{i}")`.
"""
from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Dict, List

import pytest
import yaml
from transformers.utils import logging as hf_logging

from conftest import REPO
from mmcl.cli import main
from recipe_mutations import mutate

# transformers binds its log handler to sys.stderr as it is when it first logs: make that now, not inside a
# test whose captured stream pytest closes afterwards (a later test would then log into a closed file)
hf_logging.get_logger("transformers")

SEED = 7
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
# the GPU-scale towers take seconds to build on a CPU, so their recipes get fewer cases
HEAVY = {"clip_vit_b32": 10, "slip_vit_b16": 10, "moco_v2_resnet50": 14, "simclr_resnet50": 14, "lit_minilm": 16,
         "flickr8k_lit": 16, "byol_resnet50": 14, "swav_resnet50": 14, "vicreg_resnet50": 14, "supcon_resnet50": 14,
         "simclr_hcl_resnet50": 14}
CASES = 36


def base_tree(path: Path, digits_root: str, run_dir: Path) -> dict:
    tree = yaml.safe_load(path.read_text())
    tree["data"].update(train=[digits_root], split="train")
    for key in ("datasets", "retrieval"):
        if tree.get("eval", {}).get(key):
            tree["eval"][key] = [digits_root] * len(tree["eval"][key])
    tree["train"]["output_dir"] = str(run_dir)
    return tree


def snapshot(folder: Path, but: str = "recipe.yaml") -> Dict[str, tuple]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None for p in folder.rglob("*")
            if p.name != but}


def reset() -> None:
    """What a dry run leaves in the process: Accelerate's singletons, torch's determinism switch."""
    import torch
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    torch.use_deterministic_algorithms(False)


def outcome(code: int, out: str, err: str) -> str:
    """'ok', 'refused: <line>', or what broke the contract."""
    if "Traceback" in out + err:
        return f"BROKEN traceback: {err[-2000:]}"
    lines = [line for line in err.splitlines() if line.strip()]
    if code == 0 and "dry run: ok" in out:
        return "ok"
    if code == 2 and len(lines) == 1 and lines[0].startswith("mmcl: error: "):
        return f"refused: {lines[0]}"
    return f"BROKEN exit {code}: {err[-2000:]!r}"


def run_case(recipe: Path, overrides: List[str], capfd) -> str:
    try:
        code = main(["train", str(recipe), "--dry-run", *overrides])
    except SystemExit as stop:  # argparse
        code = stop.code
    except Exception as err:  # noqa: BLE001 - escaped mmcl's error path: the python -m mmcl user sees a traceback
        code = f"uncaught {type(err).__name__}: {err}"
    finally:
        reset()
    out, err = capfd.readouterr()
    return outcome(code, out, err)


def case_input(path: Path, base: dict, case: int) -> tuple:
    return mutate(base, random.Random(f"{SEED}:{path.stem}:{case}"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_mutated_recipe_dry_runs_or_fails_with_one_line_and_writes_nothing(path, digits_root, tmp_path, capfd,
                                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths a mutation makes up land here, where the snapshot sees them
    work = tmp_path / "work"
    work.mkdir()
    base = base_tree(path, digits_root, work / "run")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(base, sort_keys=False))
    assert run_case(recipe, [], capfd) == "ok"  # the recipe itself, on the digits
    data_before, counts, broken = snapshot(Path(digits_root)), Counter(), []
    for case in range(HEAVY.get(path.stem, CASES)):
        text, overrides, done = case_input(path, base, case)
        recipe.write_bytes(text.encode("utf-8", "surrogatepass"))
        before = snapshot(tmp_path)
        result = run_case(recipe, overrides, capfd)
        counts[result.split(":")[0]] += 1
        after = snapshot(tmp_path)
        if result.startswith("BROKEN") or after != before:
            broken.append(f"case {case} {done}: {result} (written: {sorted(set(after) ^ set(before))})")
    assert snapshot(Path(digits_root)) == data_before
    assert not broken, "\n".join(broken)
    assert counts["ok"] + counts["refused"] == HEAVY.get(path.stem, CASES), counts


@pytest.mark.slow
@pytest.mark.parametrize("stem, case", [("digits_clip_tiny", 0), ("cifar10_moco_tiny", 5)])  # refused; dry-runs
def test_mutated_recipe_through_the_real_command(stem, case, digits_root, tmp_path, capfd, monkeypatch, run_mmcl):
    """The same cases through `python -m mmcl`: the same outcome, the same line."""
    monkeypatch.chdir(tmp_path)
    path = REPO / "recipes" / f"{stem}.yaml"
    base = base_tree(path, digits_root, tmp_path / "run")
    text, overrides, done = case_input(path, base, case)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(text.encode("utf-8", "surrogatepass"))
    in_process = run_case(recipe, overrides, capfd)
    real = run_mmcl(["train", recipe, "--dry-run", *overrides], timeout=180)
    assert outcome(real.returncode, real.stdout, real.stderr) == in_process, done
    assert not (tmp_path / "run").exists()
