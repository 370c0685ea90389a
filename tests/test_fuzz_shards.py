"""Fuzz: seeded corruptions of digits shards (byte flips, cuts, inserted bytes, junk after the end, random
shards, size fields that lie, oversized members, decompression bombs, huge captions) through the training
stream with 2 loader workers, `mmcl train` (2 workers) and `mmcl eval`.

What must hold in every case: the run completes (or stops with one line), every sample that decodes is used,
and the counts by kind are those of the reference reader in tests/shard_faults.py (tarfile + PIL + the
README's rules), so that used + skipped adds up to what the shards hold. Case i is `random.Random(SEED * 1000
+ i)`: a failure names its case and what was done to which shard, and reruns alone with `-k "case-i"`.
"""
from __future__ import annotations

import json
import random
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import open_clip
import pytest
import yaml

from conftest import TINY_MODEL
from mmcl.data_pipelines.stream import SampleSpec, ShardStream, make_loader
from mmcl.data_pipelines.transforms import clip_transform
from mmcl.cli import main
from shard_faults import CORRUPTIONS, SHARD_LEVEL, corrupt, expected, read_samples, small_digits

SEED = 13
STREAM_CASES = 32  # random corruptions of one or two shards, through the training stream (about 0.4 s each)
RUN_CASES = 3  # every corruption, three shards at a time, through `mmcl train` and `mmcl eval` (about 5 s each)
SHARDS, PER_SHARD, BATCH = 4, 24, 16


@pytest.fixture(scope="module")
def clean_set(tmp_path_factory, digits_root) -> Path:
    return small_digits(digits_root, tmp_path_factory.mktemp("fuzz") / "clean", SHARDS, PER_SHARD)


def damaged_copy(clean_set: Path, dest: Path, case: int, names=None) -> tuple:
    shutil.copytree(clean_set, dest)
    return dest, corrupt(dest, random.Random(SEED * 1000 + case), names)


def recipe(path: Path, data: Path, output_dir: Path) -> Path:
    """A tiny CLIP over the damaged set: one epoch of 6 steps, so each worker reads past its first pass."""
    tree = {"model": {"config": TINY_MODEL}, "objective": {"name": "clip"}, "optim": {"lr": 1e-3},
            "data": {"train": [str(data)], "workers": 2, "shuffle_buffer": 0},
            "train": {"output_dir": str(output_dir), "batch_size": BATCH, "epochs": 1, "save_every": 0,
                      "progress": False}}
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture(scope="module")
def eval_model(clean_set, tmp_path_factory) -> Path:
    """A tiny CLIP trained on the clean set: the model `mmcl eval` scores the damaged sets with."""
    from accelerate.state import AcceleratorState

    folder = tmp_path_factory.mktemp("model")
    assert main(["train", str(recipe(folder / "recipe.yaml", clean_set, folder / "run"))]) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    return folder / "run"


def stream_pass(urls: list) -> tuple:
    """Keys and skip counts of one pass of the training stream over `urls`, read by 2 loader workers."""
    spec = SampleSpec(image_transform=clip_transform(32, train=True),
                      tokenizer=open_clip.tokenizer.SimpleTokenizer(context_length=16))
    stream = ShardStream(urls, spec, BATCH, repeat=False, partial=True, shuffle_buffer=0, rank=0, world=1)
    keys, skipped = [], Counter()
    for batch in make_loader(stream, workers=2):
        keys += batch["key"]
        skipped.update(batch["skipped"])
    return sorted(keys), skipped


@pytest.mark.parametrize("case", range(STREAM_CASES), ids=lambda i: f"case-{i}")
def test_training_stream_uses_every_sample_that_decodes(case, clean_set, tmp_path):
    root, done = damaged_copy(clean_set, tmp_path / "data", case)
    keys, counts = expected(root, label=False, caption=True)
    got_keys, got_counts = stream_pass(sorted(str(p) for p in (root / "train").glob("*.tar")))
    assert got_keys == keys, done
    assert got_counts == counts, done
    sample_kinds = sum(n for kind, n in got_counts.items() if kind not in SHARD_LEVEL)
    assert len(got_keys) + sample_kinds == sum(len(read_samples(p)) for p in (root / "train").glob("*.tar")), done  # used + skipped = what was read


def one_line_or_none(err: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert not any("Traceback" in line for line in lines), err[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("case", range(RUN_CASES), ids=lambda i: f"case-{i}")
def test_mmcl_train_and_eval_on_damaged_shards(case, clean_set, eval_model, tmp_path, capsys, fresh_accelerate_state):
    root, done = damaged_copy(clean_set, tmp_path / "data", case, sorted(CORRUPTIONS)[case::RUN_CASES])
    for task, label, caption in (("zeroshot", True, False), ("retrieval", False, True)):
        keys, counts = expected(root, label=label, caption=caption)
        out = tmp_path / f"eval_{task}"
        code = main(["eval", task, "--model", str(eval_model), "--data", str(root), "--split", "train",
                     "--workers", "2", "--batch-size", "32", "--out", str(out), "--no-progress"])
        one_line_or_none(capsys.readouterr().err)
        assert code == 0, done
        result = json.loads(next(out.glob("*.json")).read_text())["mmcl"]
        assert result["samples"] == len(keys), (task, done)
        assert {k: v for k, v in result["skipped"].items() if v} == dict(counts), (task, done)

    keys, counts = expected(root, label=False, caption=True)
    code = main(["train", str(recipe(tmp_path / "recipe.yaml", root, tmp_path / "run"))])
    one_line_or_none(capsys.readouterr().err)
    assert code == 0, done
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    skipped = {k: v for k, v in summary["skipped_samples"].items() if v}
    assert summary["steps"] == SHARDS * PER_SHARD // BATCH and summary["samples"] == summary["steps"] * BATCH
    # each worker read its shards at least once: every kind the reference finds is counted at least as often
    assert set(skipped) == set(counts), (skipped, dict(counts), done)
    assert all(skipped[kind] >= n for kind, n in counts.items()), (skipped, dict(counts), done)


def test_every_byte_of_a_member_s_headers_flipped_reads_like_the_reference(clean_set, tmp_path):
    """Not random: each of the 1,024 bytes of the pax and ustar headers of one member, flipped in turn."""
    from mmcl.data_pipelines.tarstream import shard_samples
    from shard_faults import reference_samples

    shard = tmp_path / "0.tar"
    data = (clean_set / "train" / "0.tar").read_bytes()
    with tarfile.open(clean_set / "train" / "0.tar") as tar:
        member = tar.getmembers()[4]  # the second sample's second file
    wrong = []
    for at in list(range(member.offset, member.offset + 512)) + list(range(member.offset_data - 512, member.offset_data)):
        shard.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:])
        damage = []
        keys = [s["__key__"] for s in shard_samples(str(shard), damage.append)]
        samples, end = reference_samples(shard)
        if keys != [s["__key__"] for s in samples] or [d.kind for d in damage] != ([end] if end else []):
            wrong.append((at - member.offset, keys, [d.kind for d in damage], end))
    assert not wrong, wrong[:5]
