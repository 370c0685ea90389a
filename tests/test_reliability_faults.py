"""Faults found by trying mmcl from outside, each injected through the `mmcl` command: a caption that would
stall the tokenizer, a shard of random bytes that one loader worker gets alone, damaged shards counted by one
rule in training and evaluation, bad input that must be one line `mmcl: error: ...`, refused runs that must
leave nothing, a full disk while the run files are written, and `mmcl train --dry-run`.
"""
from __future__ import annotations

import io
import json
import random
import shutil
import tarfile
from pathlib import Path

import pytest
import yaml

from conftest import TINY_MODEL
from mmcl.data_pipelines.stream import SampleSpec, ShardStream, make_loader
from mmcl.data_pipelines.transforms import clip_transform
from mmcl import runs
from mmcl.cli import main
from shard_faults import read_samples, small_digits, write_samples
from test_reliability_inputs import write_payload
from test_reliability_runs import file_size_limit, finish, start_mmcl

BATCH = 16


def recipe(path: Path, data: Path, output_dir: Path, **changes) -> Path:
    """A tiny CLIP over `data`: one epoch of (samples // 16) steps, 2 loader workers unless changed."""
    tree = {"model": {"config": TINY_MODEL}, "objective": {"name": "clip"}, "optim": {"lr": 1e-3},
            "data": {"train": [str(data)], "workers": 2, "shuffle_buffer": 0},
            "train": {"output_dir": str(output_dir), "batch_size": BATCH, "epochs": 1, "save_every": 0,
                      "progress": False}}
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        tree[section][key] = value
    path.write_text(yaml.safe_dump(tree))
    return path


def error_line(capfd) -> str:
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mmcl: error: "), err[-3000:]
    return lines[0]


def tree(folder: Path) -> dict:
    return {str(p): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.fixture
def small(digits_root, tmp_path) -> Path:
    """96 digits in 4 shards of 24."""
    return small_digits(digits_root, tmp_path / "small")


def set_captions(shard: Path, captions: dict) -> None:
    samples = read_samples(shard)
    for index, text in captions.items():
        samples[index] = {k: v for k, v in samples[index].items() if k != "__url__"} | {"txt": text}
    write_samples(shard, samples)


# ---- 1: a caption that is one megabyte-long word -----------------------------------------------------

@pytest.mark.timeout(240)  # open_clip's BPE would take hours on the megabyte word
def test_megabyte_one_word_caption_is_skipped_in_training_and_evaluation(small, tmp_path, capfd,
                                                                         fresh_accelerate_state):
    set_captions(small / "train" / "0.tar", {0: b"w" * (1 << 20), 1: b"a " + b"q" * 129})
    assert main(["train", str(recipe(tmp_path / "r.yaml", small, tmp_path / "run"))]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_samples"] == {"long_caption": 2} and summary["steps"] == 6
    code = main(["eval", "retrieval", "--model", str(tmp_path / "run"), "--data", str(small), "--split", "train",
                 "--workers", "0", "--out", str(tmp_path / "eval"), "--no-progress"])
    assert code == 0
    result = json.loads(next((tmp_path / "eval").glob("*.json")).read_text())["mmcl"]
    assert result["samples"] == 94 and result["skipped"] == {"long_caption": 2}
    assert "mmcl: error" not in capfd.readouterr().err


# ---- 2: a shard of random bytes that a loader worker gets alone ---------------------------------------

@pytest.mark.slow
def test_random_shard_that_one_of_four_workers_gets_alone_does_not_stop_the_run(small, tmp_path, run_mmcl):
    (small / "train" / "3.tar").write_bytes(random.Random(0).randbytes(60_000))  # 4 shards, 4 workers: one each
    config = recipe(tmp_path / "r.yaml", small, tmp_path / "run", data__workers=4, data__samples_per_epoch=96)
    done = run_mmcl(["train", config], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # the starved worker reads every shard instead: the run takes all its steps, the bad shard is counted
    assert summary["steps"] == 6 and summary["samples"] == 96
    assert summary["skipped_samples"].get("read_error", 0) >= 1
    assert set(summary["skipped_samples"]) == {"read_error"}


def test_no_usable_sample_in_any_shard_is_one_line(small, tmp_path, capfd, fresh_accelerate_state):
    for shard in (small / "train").glob("*.tar"):
        shard.write_bytes(random.Random(shard.name).randbytes(20_000))
    assert main(["train", str(recipe(tmp_path / "r.yaml", small, tmp_path / "run"))]) == 1
    line = error_line(capfd)
    assert "no usable sample in a whole pass over all" in line and "Traceback" not in line


# ---- 3: one rule for damaged shards, in training and in evaluation ------------------------------------

def damage_three_ways(root: Path) -> int:
    """0.tar: junk after the end (all intact); 1.tar: random bytes; 2.tar: cut where sample 10 starts;
    3.tar intact. Returns the samples left whole."""
    with open(root / "train" / "0.tar", "ab") as fh:
        fh.write(b"garbage after the end of the archive " * 100)
    (root / "train" / "1.tar").write_bytes(random.Random(1).randbytes(40_000))
    cut = root / "train" / "2.tar"
    with tarfile.open(cut) as tar:
        first_of_sample_10 = [m for m in tar.getmembers() if m.name.startswith(read_samples(cut)[10]["__key__"])][0]
    cut.write_bytes(cut.read_bytes()[:first_of_sample_10.offset])
    return 24 + 10 + 24


def test_damaged_shards_are_counted_by_one_rule_in_training_and_evaluation(small, tmp_path, capfd,
                                                                           fresh_accelerate_state):
    whole = damage_three_ways(small)
    urls = sorted(str(p) for p in (small / "train").glob("*.tar"))
    spec = SampleSpec(image_transform=clip_transform(32, train=True), label=True)
    stream = ShardStream(urls, spec, BATCH, repeat=False, partial=True, shuffle_buffer=0, rank=0, world=1)
    keys, skipped = [], {}
    for batch in make_loader(stream, workers=2):
        keys += batch["key"]
        for kind, n in batch["skipped"].items():
            skipped[kind] = skipped.get(kind, 0) + n
    assert len(keys) == whole and skipped == {"read_error": 1, "truncated_tar": 1}

    assert main(["train", str(recipe(tmp_path / "r.yaml", small, tmp_path / "run",
                                     data__samples_per_epoch=whole))]) == 0
    trained = json.loads((tmp_path / "run" / "summary.json").read_text())["skipped_samples"]
    assert set(trained) == {"read_error", "truncated_tar"}

    out = tmp_path / "eval"
    assert main(["eval", "zeroshot", "--model", str(tmp_path / "run"), "--data", str(small), "--split", "train",
                 "--workers", "2", "--out", str(out), "--no-progress"]) == 0
    result = json.loads(next(out.glob("*.json")).read_text())["mmcl"]
    assert result["samples"] == whole and result["skipped"] == {"read_error": 1, "truncated_tar": 1}


# ---- 4: bad input is one line, and a refused run leaves nothing ---------------------------------------

@pytest.fixture
def trained(small, tmp_path_factory) -> Path:
    """A finished tiny run on the small digits (its checkpoint is what the cases below damage or reuse)."""
    from accelerate.state import AcceleratorState

    folder = tmp_path_factory.mktemp("trained")
    assert main(["train", str(recipe(folder / "r.yaml", small, folder / "run"))]) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    return folder / "run"


@pytest.mark.parametrize("override, expected", [
    ("optim.betas=[0.9,", "optim.betas: '[0.9,' is not a valid YAML value"),
    ("model.config.vision_cfg.width=-64", "model.config.vision_cfg.width: must be a positive integer"),
    ("model.config.text_cfg.heads=3", "model.config: open_clip cannot build these towers (AssertionError"),
    ("data.workers=6", "data.workers: 6 loader workers x 1 processes need at least 6 shards, data.train has 4"),
    ("train.resume={data}", "is not a complete checkpoint"),
], ids=["invalid-yaml-override", "negative-width", "heads-not-dividing-width", "more-workers-than-shards",
        "resume-from-a-non-checkpoint"])
def test_bad_input_is_one_line_and_writes_nothing(override, expected, small, tmp_path, capfd,
                                                  fresh_accelerate_state):
    config = recipe(tmp_path / "r.yaml", small, tmp_path / "run")
    before = tree(tmp_path)
    assert main(["train", str(config), override.format(data=small)]) == 2
    assert expected in error_line(capfd)
    assert tree(tmp_path) == before


@pytest.mark.slow
def test_invalid_yaml_override_through_the_real_command(small, tmp_path, run_mmcl):
    done = run_mmcl(["train", recipe(tmp_path / "r.yaml", small, tmp_path / "run"), "optim.betas=[0.9,"])
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "optim.betas:" in done.stderr, done.stderr
    assert not (tmp_path / "run").exists()


def test_pickle_payloads_renamed_as_weights_are_one_line_refusals(trained, small, tmp_path, capfd,
                                                                   fresh_accelerate_state):
    marker = tmp_path / "pwned"
    export = tmp_path / "export"
    assert main(["export", str(trained), "--out", str(export)]) == 0
    (export / "open_clip_model.safetensors").unlink()
    write_payload(export / "open_clip_pytorch_model.bin", marker)
    capfd.readouterr()
    assert main(["eval", "zeroshot", "--model", f"local-dir:{export}", "--data", str(small)]) == 2
    assert f"{export / 'open_clip_pytorch_model.bin'}: refused" in error_line(capfd)

    fake = write_payload(tmp_path / "weights.safetensors", marker)
    assert main(["train", str(recipe(tmp_path / "r.yaml", small, tmp_path / "new")), f"model.pretrained={fake}"]) == 2
    assert f"{fake}: refused, not a safetensors file" in error_line(capfd)
    assert not (tmp_path / "new").exists()

    checkpoint = runs.latest_checkpoint(trained)
    write_payload(checkpoint / runs.WEIGHTS, marker)
    before = tree(trained)
    for args in (["train", str(trained.parent / "r.yaml"), "train.epochs=2"], ["eval", "zeroshot", "--model",
                 str(trained), "--data", str(small)], ["export", str(trained), "--out", str(tmp_path / "again")]):
        assert main(args) == 2, args
        assert f"{checkpoint / runs.WEIGHTS}: refused, not a safetensors file" in error_line(capfd)
    assert tree(trained) == before and not marker.exists() and not (tmp_path / "again").exists()


def test_resume_from_a_checkpoint_of_another_model_writes_nothing(trained, small, tmp_path, capfd,
                                                                   fresh_accelerate_state):
    checkpoint = runs.latest_checkpoint(trained)
    config = recipe(tmp_path / "r.yaml", small, tmp_path / "run", objective__name="siglip")
    assert main(["train", str(config), f"train.resume={checkpoint}"]) == 2
    assert f"{checkpoint / runs.WEIGHTS}: weights do not match the model" in error_line(capfd)
    assert not (tmp_path / "run").exists()


# ---- 5: a full disk while the run files are written ---------------------------------------------------

@pytest.mark.slow
def test_disk_full_while_writing_the_run_files_names_the_file_and_leaves_no_torn_file(trained, small, tmp_path):
    log = tmp_path / "full.log"
    fresh = recipe(tmp_path / "r.yaml", small, tmp_path / "run")
    assert finish(start_mmcl(["train", fresh], log, preexec=file_size_limit(512))) == 1
    errors = [line for line in log.read_text().splitlines() if line.startswith("mmcl: error:")]
    assert errors == [f"mmcl: error: could not write {tmp_path / 'run' / runs.CONFIG} ([Errno 27] File too large)"]
    assert "Traceback" not in log.read_text() and not (tmp_path / "run").exists()

    before = tree(trained)
    resumed = trained.parent / "r.yaml"
    assert finish(start_mmcl(["train", resumed, "train.epochs=2"], log, preexec=file_size_limit(512))) == 1
    assert f"could not write {trained / runs.CONFIG}" in log.read_text()
    assert tree(trained) == before  # the old config.yaml is whole, no .tmp is left


# ---- 6: mmcl train --dry-run --------------------------------------------------------------------------

def test_dry_run_builds_everything_and_writes_nothing(trained, small, tmp_path, capfd, fresh_accelerate_state):
    config = recipe(tmp_path / "r.yaml", small, tmp_path / "run")
    assert main(["train", "--dry-run", str(config)]) == 0
    out = capfd.readouterr().out
    assert "dry run: ok;" in out and "4 shards, 6 steps per epoch, 6 steps, starting at step 0" in out
    assert not (tmp_path / "run").exists()

    before = tree(trained)  # an existing run: the checkpoint to resume from is loaded, nothing is touched
    assert main(["train", str(trained.parent / "r.yaml"), "--dry-run", "train.epochs=2"]) == 0
    out = capfd.readouterr().out
    assert f"starting at step 6 from {runs.latest_checkpoint(trained)}" in out and "12 steps" in out
    assert tree(trained) == before
