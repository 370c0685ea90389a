"""Shared fixtures: the embedded digits built once per session, a tiny CLIP recipe factory, an `mmcl` runner."""
from __future__ import annotations

import copy
import os
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
    from data_pipelines.digits import build_digits

    root = tmp_path_factory.mktemp("data") / "digits"
    build_digits(str(root))
    return str(root)


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
