"""The wheel installs one top-level package, mmcl, with eval/ and data_pipelines/ inside it as mmcl.eval and
mmcl.data_pipelines (no `eval` package shadowing the builtin), and the public API at the top."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO

PROBE = """
import json
import mmcl, mmcl.eval, mmcl.data_pipelines, mmcl.data_pipelines.tarstream, mmcl.eval.cli, mmcl.trainer.loop
import mmcl.search.serve
from mmcl.cli import find_recipe
print(json.dumps({"recipe": find_recipe("digits_clip_tiny"), "mmcl": mmcl.__file__, "eval": mmcl.eval.__file__, "data": mmcl.data_pipelines.__file__,
                  "api": [callable(getattr(mmcl, n)) for n in mmcl.__all__ if n != "__version__"],
                  "builtin_eval": eval("1 + 1")}))
"""


@pytest.mark.slow
def test_wheel_installs_mmcl_eval_and_mmcl_data_pipelines_in_a_fresh_venv(tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info next to pyproject.toml
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("mmcl", "eval", "data_pipelines", "recipes"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(source)], check=True, capture_output=True, text=True, timeout=300)
    wheel = next(wheels.glob("mmcl-*.whl"))
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist() if not name.split("/")[0].endswith(
        (".dist-info", ".data"))}
    assert tops == {"mmcl"}, tops  # nothing named eval or data_pipelines at the top of site-packages

    venv, target = tmp_path / "venv", tmp_path / "target"
    # the venv sees the system's packages for torch & co; mmcl itself comes from the --target folder only
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)
    env = dict(os.environ, PYTHONPATH=str(target), OMP_NUM_THREADS="1")  # not the checkout: only the wheel
    done = subprocess.run([str(python), "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["mmcl"].startswith(str(target)) and found["eval"] == str(target / "mmcl" / "eval" / "__init__.py")
    assert found["data"] == str(target / "mmcl" / "data_pipelines" / "__init__.py")
    assert all(found["api"]) and len(found["api"]) == 5 and found["builtin_eval"] == 2
    assert (target / "mmcl" / "search" / "static" / "index.html").is_file()  # package data travels too
    assert found["recipe"] == str(target / "mmcl" / "recipes" / "digits_clip_tiny.yaml")  # `mmcl train NAME` works
