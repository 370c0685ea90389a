"""`mmcl data digits | shards | info` through the argparse entry point: output, exit codes, one-line errors."""
import argparse
import io
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from mmcl.data_pipelines import cli, shards

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(argv, capsys):
    """(exit status, stdout, stderr) of `mmcl data ...` run in this process."""
    status = cli.main(["data"] + argv)
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status, err, fragment):
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("mmcl: error: ") and fragment in err


def png_bytes(size, color):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
    """Two captioned images and one corrupt one."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "red.png").write_bytes(png_bytes((64, 32), "red"))
    (images / "red.txt").write_text("a red rectangle\na wide red shape\n")
    (images / "blue.png").write_bytes(png_bytes((16, 16), "blue"))
    (images / "blue.txt").write_text("a blue square")
    (images / "bad.jpg").write_bytes(b"not an image")
    (images / "bad.txt").write_text("never written")
    return images


def test_digits_command_writes_the_set_and_refuses_to_overwrite_silently(tmp_path, capsys):
    out = str(tmp_path / "digits")
    status, stdout, _ = run(["digits", "--out", out, "--source", "sklearn", "--seed", "1",
                             "--shard-size", "500"], capsys)
    assert status == 0
    assert stdout.splitlines() == [f"digits (sklearn, seed 1) -> {out}", "  train: 1438 samples in 3 shards",
                                   "  test: 359 samples in 1 shard"]
    assert len(shards.split_urls(out, "train")) == 3
    assert_one_line_error(*run(["digits", "--out", out, "--source", "sklearn"], capsys)[::2], "--overwrite")
    assert run(["digits", "--out", out, "--source", "sklearn", "--overwrite"], capsys)[0] == 0
    assert len(shards.split_urls(out, "train")) == 2


def test_shards_from_folder_reports_written_and_skipped(folder, tmp_path, capsys):
    out = str(tmp_path / "ds")
    status, stdout, _ = run(["shards", "--folder", str(folder), "--out", out, "--split", "val",
                             "--resize", "16"], capsys)
    assert status == 0
    lines = stdout.splitlines()
    assert lines[:2] == [f"wrote 2 samples in 1 shard to {os.path.join(out, 'val')}",
                         "skipped 1 (corrupt_image: 1)"]
    assert lines[2].startswith("  bad.jpg: corrupt_image")
    assert shards.split_size(out, "val") == 2


def test_shards_from_csv_and_jsonl_with_custom_keys(folder, tmp_path, capsys):
    (folder / "list.tsv").write_text("file\ttext\tlabel\nred.png\ta red thing\t1\nblue.png\ta blue thing\t0\n")
    status, stdout, _ = run(["shards", "--csv", str(folder / "list.tsv"), "--sep", "\\t", "--image-key", "file",
                             "--caption-key", "text", "--label-key", "label", "--out", str(tmp_path / "c")],
                            capsys)
    assert status == 0 and stdout.startswith("wrote 2 samples in 1 shard")
    (folder / "meta.jsonl").write_text(json.dumps({"src": "red.png", "caps": ["x", "y"]}) + "\n")
    status, stdout, _ = run(["shards", "--jsonl", str(folder / "meta.jsonl"), "--image-key", "src",
                             "--caption-key", "caps", "--out", str(tmp_path / "j"), "--shard-size", "1"], capsys)
    assert status == 0 and stdout.strip() == f"wrote 1 sample in 1 shard to {tmp_path / 'j' / 'train'}"


def test_bad_input_gives_one_line_error_and_exit_2(folder, tmp_path, capsys):
    (tmp_path / "broken.jsonl").write_text("{oops\n")
    (tmp_path / "cols.csv").write_text("path,caption\nx.png,y\n")
    cases = [
        (["shards", "--csv", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o")], "missing.csv"),
        (["shards", "--jsonl", str(tmp_path / "broken.jsonl"), "--out", str(tmp_path / "o")], "line 1"),
        (["shards", "--csv", str(tmp_path / "cols.csv"), "--out", str(tmp_path / "o")], "no column 'image'"),
        (["shards", "--folder", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")], "nowhere"),
        (["shards", "--folder", str(folder), "--out", str(tmp_path / "o"), "--shard-size", "0"], "shard size"),
        (["shards", "--folder", str(folder), "--out", str(tmp_path / "o"), "--resize", "-3"], "resize"),
        (["info", str(tmp_path / "nowhere")], "nowhere"),
        (["info", str(folder)], "no splits"),
        (["digits", "--out", str(folder)], "not empty"),
    ]
    for argv, fragment in cases:
        status, _, err = run(argv, capsys)
        assert_one_line_error(status, err, fragment)


def test_argparse_rejects_missing_or_conflicting_sources(tmp_path, capsys):
    for argv in (["shards", "--out", str(tmp_path)], ["shards", "--csv", "a", "--jsonl", "b", "--out", "o"],
                 ["digits", "--out", "o", "--source", "emnist"], []):
        with pytest.raises(SystemExit) as info:
            cli.main(["data"] + argv)
        assert info.value.code == 2
        assert "error:" in capsys.readouterr().err


def test_info_prints_splits_counts_keys_and_captions(folder, tmp_path, capsys):
    root = tmp_path / "ds"
    run(["shards", "--folder", str(folder), "--out", str(root)], capsys)
    (root / "classnames.txt").write_text("red\nblue\n")
    status, stdout, _ = run(["info", str(root)], capsys)
    assert status == 0
    assert stdout.splitlines() == [
        f"{root}: task classification, 2 class names, no zeroshot_classification_templates.txt",
        "train: 1 shard, samples: 2 in sizes.json, 2 counted",
        "  keys: json png txt",
        "  000000000: 'a blue square'",
        "  000000001: 'a red rectangle' (+1 more)",
    ]
    (root / "train" / "sizes.json").write_text('{"samples": 5}')
    stdout = run(["info", str(root)], capsys)[1]
    assert "problem: " in stdout and "sizes.json says 5 samples, the shards hold 2" in stdout


def test_subcommands_plug_into_another_parser(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="mmcl")
    cli.add_data_subcommands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "digits", "--out", str(tmp_path / "d"), "--source", "sklearn"])
    assert args.func is cli.run_digits and args.shard_size == 1000 and args.seed == 0
    assert args.func(args) == 0
    assert "train: 1438 samples" in capsys.readouterr().out


def test_module_entry_point_runs(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mmcl.data_pipelines.cli", "data", "info", str(tmp_path)],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": REPO_ROOT})
    assert result.returncode == 2
    assert result.stderr.strip().startswith("mmcl: error: no splits in")
    assert result.stderr.count("\n") == 1
