"""Faults in what mmcl is given: corrupt samples in a real run, missing or remote shards, pickle payloads."""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from mmcl.models import weights

GOOD_PNG = io.BytesIO()
Image.new("RGB", (28, 28), (200, 10, 10)).save(GOOD_PNG, format="PNG")
GOOD_PNG = GOOD_PNG.getvalue()


def bomb_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (12000, 12000)).save(buf, format="PNG")  # 144 Mpx, ~150 kB on disk
    return buf.getvalue()


CORRUPT = [
    ("truncated_jpeg", {"jpg": b"\xff\xd8\xff\xe0" + b"\x00" * 40, "txt": b"a digit"}, "corrupt_image"),
    ("zero_byte", {"png": b"", "txt": b"a digit"}, "empty_image"),
    ("not_an_image", {"jpg": b"<html>not found</html>", "txt": b"a digit"}, "corrupt_image"),
    ("no_caption", {"png": GOOD_PNG}, "missing_caption"),
    ("empty_caption", {"png": GOOD_PNG, "txt": b"   \n"}, "empty_caption"),
    ("latin1_caption", {"png": GOOD_PNG, "txt": "un chiffre \xe9crit".encode("latin-1")}, "bad_caption_encoding"),
    ("bomb", {"png": bomb_png(), "txt": b"a digit"}, "too_many_pixels"),
]


def copy_digits_with_faults(digits_root: str, dest: Path, truncate_last: bool = False) -> Path:
    """A copy of the digits whose first train shard also holds every kind of corrupt sample."""
    shutil.copytree(digits_root, dest)
    shard = dest / "train" / "0.tar"
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with wds.TarWriter(str(shard)) as sink:
        for name, sample, _ in CORRUPT:  # first, so the few steps of the run certainly read them
            sink.write({"__key__": f"bad_{name}", **sample})
        for key in sorted({n.split(".")[0] for n, _ in members}):
            sink.write({"__key__": key, **{n.split(".", 1)[1]: d for n, d in members if n.split(".")[0] == key}})
    if truncate_last:
        last = dest / "train" / "3.tar"
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])
    return dest


@pytest.mark.slow
def test_corrupt_samples_are_skipped_counted_and_logged_in_a_real_run(tmp_path, digits_root, tiny_recipe, run_mmcl):
    data = copy_digits_with_faults(digits_root, tmp_path / "faulty", truncate_last=True)
    recipe = tiny_recipe({"data.train": [str(data)], "data.max_pixels": 50_000_000, "data.shuffle_buffer": 0,
                          "train.max_steps": 8, "train.batch_size": 500})  # one whole pass
    result = run_mmcl(["train", recipe], timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    expected = {}
    for _, _, kind in CORRUPT:
        expected[kind] = expected.get(kind, 0) + 1
    skipped = summary["skipped_samples"]
    for kind, count in expected.items():
        assert skipped.get(kind, 0) >= count, (kind, skipped)
    assert skipped.get("truncated_tar", 0) >= 1  # the rest of the cut shard was still read
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["skipped/corrupt_image"] >= 2
    assert "skipped samples" in result.stdout


def test_missing_shard_at_start_up_is_a_one_line_error(tmp_path, digits_root, tiny_recipe, run_mmcl):
    data = tmp_path / "gappy"
    shutil.copytree(digits_root, data)
    (data / "train" / "2.tar").unlink()
    result = run_mmcl(["train", tiny_recipe({"data.train": [str(data)]})])
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "data.train[0]" in result.stderr and "2.tar" in result.stderr
    assert not (tmp_path / "run").exists()


def test_pipe_urls_are_refused_unless_the_recipe_allows_them(tmp_path, digits_root, tiny_recipe, run_mmcl):
    shard = Path(digits_root) / "train" / "0.tar"
    source = [f"pipe:cat {shard}"]
    refused = run_mmcl(["train", tiny_recipe({"data.train": source, "data.samples_per_epoch": 1000})])
    assert refused.returncode == 2
    assert "data.train[0]" in refused.stderr and "allow_remote" in refused.stderr
    allowed = run_mmcl(["train", tiny_recipe({"data.train": source, "data.samples_per_epoch": 1000,
                                              "data.allow_remote": True, "train.max_steps": 2})])
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert (tmp_path / "run" / "summary.json").is_file()


class Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_payload(path: Path, marker: Path) -> Path:
    with open(path, "wb") as fh:
        pickle.dump({"visual.weight": Payload(marker)}, fh)
    return path


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = write_payload(tmp_path / "model.pt", marker)
    with pytest.raises(weights.UnsafeCheckpointError, match="refused"):
        weights.read_state_dict(str(path))
    assert not marker.exists()


def test_payload_as_pretrained_weights_or_eval_model_is_refused(tmp_path, digits_root, tiny_recipe, run_mmcl):
    marker = tmp_path / "pwned"
    path = write_payload(tmp_path / "weights.bin", marker)
    train = run_mmcl(["train", tiny_recipe({"model.pretrained": str(path)})])
    assert train.returncode == 2 and "refused" in train.stderr
    evaluate = run_mmcl(["eval", "zeroshot", "--model", f"ViT-B-32:{path}", "--data", digits_root])
    assert evaluate.returncode == 2 and "refused" in evaluate.stderr
    assert not marker.exists()
    assert not (tmp_path / "run").exists()


def test_tampered_training_state_is_refused_on_resume(tmp_path, tiny_recipe, run_mmcl):
    recipe = tiny_recipe({"train.max_steps": 2, "train.save_every": 1})
    assert run_mmcl(["train", recipe]).returncode == 0
    latest = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))[-1]
    marker = tmp_path / "pwned"
    write_payload(latest / "state.pt", marker)
    again = run_mmcl(["train", tiny_recipe({"train.max_steps": 4, "train.save_every": 1})])
    assert again.returncode != 0
    assert not marker.exists()
    assert torch.load(sorted((tmp_path / "run" / "checkpoints").glob("step_*"))[0] / "state.pt",
                      weights_only=True)["train_state"]["step"] == 1
