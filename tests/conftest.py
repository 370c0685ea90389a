"""Shared fixtures: the embedded digits built once per session, a tiny CLIP recipe factory, an `mmcl` runner."""
from __future__ import annotations

import copy
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]

# Tiny models run fastest on one thread, and a busy 2-core CI box thrashes with more (tens of times slower).
torch.set_num_threads(1)

TINY_MODEL = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2, "mlp_ratio": 2.0},
}

DELETE = object()  # a recipe change that removes the key

WORDS = ["red", "green", "blue", "white", "black", "gray"]
COLOURS = [(220, 20, 20), (20, 220, 20), (20, 20, 220), (240, 240, 240), (10, 10, 10), (128, 128, 128)]


def write_pictures(root: Path, count: int = 48, split: str = "train") -> Path:
    """Coloured noisy 40 px squares with 1-3 caption lines each, 24 a shard, in CLIP_benchmark's layout."""
    import io

    import numpy as np
    from PIL import Image

    from mmcl.data_pipelines.writers import ShardWriter

    rng = np.random.default_rng(0)
    with ShardWriter(str(root / split), shard_size=24, overwrite=True) as writer:
        for i in range(count):
            colour = i % 6
            pixels = np.clip(np.array(COLOURS[colour]) + rng.integers(-40, 40, (40, 40, 3)), 0, 255)
            buf = io.BytesIO()
            Image.fromarray(pixels.astype(np.uint8)).save(buf, format="JPEG", quality=90)
            lines = [f"a {WORDS[colour]} square", f"picture number {i} in {WORDS[colour]}", "noise"][:1 + i % 3]
            writer.write({"__key__": f"pic{i:04d}", "jpg": buf.getvalue(), "txt": "\n".join(lines)})
    return root


def write_shards(folder: Path, samples: List[dict], shard_size: int) -> Path:
    """Samples (webdataset dicts) written as shards `folder/0.tar`, `folder/1.tar`, ... with nshards.txt."""
    from mmcl.data_pipelines.writers import ShardWriter

    with ShardWriter(str(folder), shard_size=shard_size) as writer:
        for sample in samples:
            writer.write(sample)
    return folder


def export_open_clip(folder: Path, model_cfg: Dict[str, Any], seed: int = 0) -> Path:
    """A seeded random open_clip CLIP saved as a `local-dir:` export (config + safetensors) in `folder`."""
    import json

    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    return folder


def tiny_tree(digits_root: str, output_dir: Path) -> Dict[str, Any]:
    """A tiny CLIP on the digits: 6 steps of batch 32, one process, no worker processes, no eval."""
    return {
        "model": {"config": copy.deepcopy(TINY_MODEL)},
        "data": {"train": [str(digits_root)], "split": "train", "shuffle_buffer": 200, "workers": 0},
        "objective": {"name": "clip"},
        "optim": {"lr": 2.0e-3, "weight_decay": 0.1, "warmup_steps": 2},
        "train": {"output_dir": str(output_dir), "batch_size": 32, "max_steps": 6, "log_every": 2, "save_every": 0,
                  "keep_last": 2, "progress": False},
    }


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = tree
    for key in parents:
        node = node.setdefault(key, {})
    if value is DELETE:
        node.pop(last, None)
    else:
        node[last] = value


def subprocess_env(**extra: str) -> Dict[str, str]:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", **extra)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(nproc: int = 2) -> List[str]:
    """Arguments that start `nproc` real processes (`accelerate launch --cpu` would start only one)."""
    return ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port())]


# Several processes on one CPU box: keep them off any GPU so that each gets the gloo CPU backend.
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> str:
    """The embedded digits (MNIST-5k: 4000 train / 1000 test in CLIP_benchmark's layout), built once."""
    from mmcl.data_pipelines.digits import build_digits

    root = tmp_path_factory.mktemp("data") / "digits"
    build_digits(str(root))
    return str(root)


E2E_STEPS, E2E_SAVE_EVERY, E2E_KEEP = 300, 100, 2
E2E_OVERRIDES = [f"train.max_steps={E2E_STEPS}", "train.epochs=10", "train.batch_size=64", "optim.lr=2e-3",
                 "optim.warmup_steps=15", "train.log_every=10", f"train.save_every={E2E_SAVE_EVERY}",
                 f"train.keep_last={E2E_KEEP}", "data.workers=1"]


@pytest.fixture(scope="session")
def trained_digits_run(tmp_path_factory, digits_root) -> Path:
    """`mmcl train` of the tiny CLIP on the digits (4000 images, ~5 epochs) with the trainer's own final zero-shot
    evaluation: trained once a session, read (never changed) by the training and the search tests."""
    folder = tmp_path_factory.mktemp("e2e")
    tree = tiny_tree(digits_root, folder / "run")
    tree["eval"] = {"datasets": [digits_root], "split": "test"}
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    command = [sys.executable, "-m", "mmcl", "train", str(recipe)] + E2E_OVERRIDES
    done = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder / "run"


def run_main(*args) -> subprocess.CompletedProcess:
    """`mmcl ARGS` through mmcl's main() in this process (torch is imported once); output captured."""
    import contextlib
    import io

    from mmcl.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def digits_search_index(tmp_path_factory, trained_digits_run, digits_root) -> dict:
    """`mmcl embed` of the held-out digits by the trained run (float16 parts), an exact INDEX/ and an ANN one
    (`--exact-below 0`), made through mmcl's main() in this process; used by the search tests."""
    folder = tmp_path_factory.mktemp("search")
    done = run_main("embed", "--model", trained_digits_run, "--data", digits_root, "--split", "test",
                    "--out", folder / "emb", "--workers", "1", "--dtype", "float16", "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"embedded 1000 images and 5000 captions \(32-d, float16\)", done.stdout), done.stdout
    for name, extra in (("exact", []), ("ann", ["--exact-below", "0"])):
        done = run_main("index", "build", folder / "emb", "--out", folder / name, *extra)
        assert done.returncode == 0, done.stderr[-3000:]
    return {"emb": folder / "emb", "exact": folder / "exact", "ann": folder / "ann", "run": trained_digits_run}


@pytest.fixture
def tiny_recipe(tmp_path, digits_root) -> Callable[..., Path]:
    """`tiny_recipe({"train.max_steps": 10, "data.workers": DELETE}, name=...)` -> path of a YAML recipe.

    The run directory is `tmp_path / "run"` unless `train.output_dir` is changed.
    """

    def make(changes: Optional[Dict[str, Any]] = None, name: str = "recipe.yaml") -> Path:
        tree = tiny_tree(digits_root, tmp_path / "run")
        for dotted, value in (changes or {}).items():
            set_dotted(tree, dotted, value)
        path = tmp_path / name
        path.write_text(yaml.safe_dump(tree, sort_keys=False))
        return path

    return make


@pytest.fixture
def run_mmcl() -> Callable[..., subprocess.CompletedProcess]:
    """Run `python -m mmcl ARGS` (or `python -m torch.distributed.run ... -m mmcl ARGS`) in a subprocess."""

    def run(args: List[str], launcher: Optional[List[str]] = None, timeout: float = 300,
            env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
        command = [sys.executable] + (launcher or []) + ["-m", "mmcl"] + [str(a) for a in args]
        return subprocess.run(command, cwd=REPO, env=subprocess_env(**(env or {})), capture_output=True, text=True,
                              timeout=timeout)

    return run


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps its state in process-wide singletons: drop them after a test that made an Accelerator."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def load_worker(name: str):
    """Import tests/dist_workers/NAME.py as a module (its constants and single-process reference code)."""
    import importlib.util

    path = REPO / "tests" / "dist_workers" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_worker(name: str, out: Path, nproc: int = 2, timeout: float = 300) -> dict:
    """Run tests/dist_workers/NAME.py in `nproc` real gloo processes; it writes its results to `out` (JSON)."""
    import json

    script = REPO / "tests" / "dist_workers" / f"{name}.py"
    command = [sys.executable] + torchrun(nproc) + [str(script), str(out)]
    completed = subprocess.run(command, cwd=REPO, env=subprocess_env(**CPU_ONLY), capture_output=True, text=True,
                               timeout=timeout)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return json.loads(Path(out).read_text())


def assert_same_gradients(expected: torch.nn.Module, got: torch.nn.Module, **tolerance) -> None:
    """The two modules (copies of each other) hold the same gradients: None in the same places, equal elsewhere."""
    for (key, a), b in zip(expected.named_parameters(), got.parameters()):
        assert (a.grad is None) == (b.grad is None), key
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, **tolerance, msg=key)
