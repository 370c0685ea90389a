"""Semantic search on the digits: `mmcl embed` -> `mmcl index build` -> `mmcl search`, with the tiny CLIP trained
once a session (conftest's trained_digits_run, zero-shot top-1 >= 0.5).

Labels of results are read back from the shards through the byte offsets the index stores, so these tests also
check that every result points at the right sample.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, run_main, subprocess_env
from mmcl.data_pipelines import shards
from mmcl.data_pipelines.tarstream import sample_at, shard_samples
from mmcl.cli import main
from mmcl.search import index as ix
from mmcl.search import store
from mmcl.search.query import Searcher

pytestmark = pytest.mark.slow
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


mmcl = run_main


def mmcl_program(*args, timeout=300) -> subprocess.CompletedProcess:
    """`python -m mmcl ARGS` as a separate program."""
    return subprocess.run([sys.executable, "-m", "mmcl", *map(str, args)], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def built(digits_search_index) -> dict:
    return digits_search_index


@pytest.fixture(scope="module")
def searcher(built) -> Searcher:
    return Searcher(str(built["exact"]))


def label_of(searcher: Searcher, image_id: int) -> int:
    """The class of an indexed image, read from its shard at the stored byte offset."""
    return int(sample_at(searcher.images["shard"][image_id], searcher.images["offset"][image_id])["cls"])


def test_text_search_returns_sevens(built, searcher):
    done = mmcl_program("search", built["exact"], "--text", "a handwritten seven", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    assert [r["rank"] for r in results] == list(range(1, 11))
    assert all(r["score"] >= s["score"] for r, s in zip(results, results[1:]))
    labels = [label_of(searcher, r["image_id"]) for r in results]
    assert sum(label == 7 for label in labels) / 10 >= 0.7, labels  # chance: 0.1
    for r in results:  # key and caption are the sample's own
        sample = sample_at(searcher.images["shard"][r["image_id"]], searcher.images["offset"][r["image_id"]])
        assert sample["__key__"] == r["key"] and sample["txt"].decode().splitlines()[0] == r["caption"]
    table = mmcl("search", built["exact"], "--text", "a handwritten seven", "--k", "3")
    assert table.returncode == 0 and len(table.stdout.splitlines()) == 4 and results[0]["key"] in table.stdout


def test_every_digit_by_text(searcher):
    """precision@10 of "a handwritten <digit>" over the ten digits."""
    precision = [np.mean([label_of(searcher, r["image_id"]) == d
                          for r in searcher.text_search(f"a handwritten {word}", 10)])
                 for d, word in enumerate(WORDS)]
    assert np.mean(precision) >= 0.6, precision  # chance: 0.1


def test_image_to_image_returns_the_same_digit(built, searcher, tmp_path):
    queries = list(range(0, 1000, 25))  # 40 held-out digits as query images
    precision = []
    for image_id in queries:
        data, _ = searcher.image_bytes(image_id)
        results = searcher.image_search(data, 11)
        assert results[0]["image_id"] == image_id and results[0]["score"] > 0.999  # itself, first
        precision.append(np.mean([label_of(searcher, r["image_id"]) == label_of(searcher, image_id)
                                  for r in results[1:]]))
    assert np.mean(precision) >= 0.6, precision  # chance: 0.1
    photo = tmp_path / "query.png"  # and through the command line, from a file
    photo.write_bytes(searcher.image_bytes(queries[1])[0])
    done = mmcl("search", built["exact"], "--image", photo, "--json", "--k", "5")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)[0]["image_id"] == queries[1]


def test_image_to_text_names_the_digit(searcher):
    hits = []
    for image_id in range(0, 1000, 50):
        digit = label_of(searcher, image_id)
        results = searcher.image_search(searcher.image_bytes(image_id)[0], 10, target="text")
        assert all(searcher.texts["caption"][r["text_id"]] == r["caption"] for r in results)
        hits += [bool(re.search(rf"\b({WORDS[digit]}|{digit})\b", r["caption"])) for r in results]
    assert np.mean(hits) >= 0.5, np.mean(hits)  # chance: 0.1


def test_exact_and_ann_agree_within_the_stored_recall(built, searcher):
    info = json.loads((built["ann"] / store.INDEX_FILE).read_text())
    exact_info = json.loads((built["exact"] / store.INDEX_FILE).read_text())
    assert exact_info["indexes"]["image"]["kind"] == "exact" and exact_info["indexes"]["image"]["factory"] == "Flat"
    data = store.load_embeddings(built["emb"])
    ann = Searcher(str(built["ann"]))
    for target, vectors, queries in (("image", data["image"], data["text"]), ("text", data["text"], data["image"])):
        stats = info["indexes"][target]
        assert stats["kind"] == "ann" and stats["recall_at_10"] >= 0.9, stats
        assert set(stats["recall_by_queries"]) == {"captions", "images"}
        assert stats["memory_bytes"] > 0 and stats["latency_ms"] > 0 and stats["build_seconds"] >= 0
        truth = ix.QuerySet.of(searcher.indexes[target], queries)
        measured = ix.recall_at_k(ann.indexes[target].search(queries, 10)[1], truth, vectors)
        assert measured >= stats["recall_at_10"] - 0.03, (target, measured, stats["recall_at_10"])
    # the result lists of the two indexes for the test query agree as far as the recall says
    a = {r["image_id"] for r in ann.text_search("a handwritten seven", 10)}
    e = {r["image_id"] for r in searcher.text_search("a handwritten seven", 10)}
    assert len(a & e) >= 6, (a, e)


def test_embed_is_the_eval_readers_pass(built, digits_root):
    """The embeddings equal the evaluation reader's (same pipeline), rounded to float16; keys and offsets
    point at the samples; one text row per caption line."""
    from mmcl.eval.datasets import describe_split
    from mmcl.eval.features import split_features
    from mmcl import load_model

    model, preprocess, tokenizer = load_model(str(built["run"]))
    features = split_features(model, preprocess, tokenizer, describe_split(digits_root, "test", "retrieval"))
    data = store.load_embeddings(built["emb"])
    assert data["info"]["dtype"] == "float16" and data["info"]["complete"] and data["info"]["skipped"] == {}
    np.testing.assert_allclose(data["image"], features.image.numpy(), atol=2e-3)
    np.testing.assert_allclose(data["text"], features.text.numpy(), atol=2e-3)
    assert data["texts"]["image_id"] == features.text_to_image.tolist()
    for i in (0, 511, 999):
        sample = sample_at(data["images"]["shard"][i], data["images"]["offset"][i])
        assert sample["__key__"] == data["images"]["key"][i]
        lines = sample["txt"].decode().splitlines()
        assert [c for c, j in zip(data["texts"]["caption"], data["texts"]["image_id"]) if j == i] == lines


# ---- resuming, bad samples, bad input ------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_set(tmp_path_factory, digits_root):
    """Three shards of 20 digits; shard 1 holds a corrupt image and an image without captions."""
    from mmcl.data_pipelines.writers import ShardWriter

    root = tmp_path_factory.mktemp("small")
    samples = [s for url in shards.split_urls(digits_root, "test") for s in shard_samples(url, print)][:60]
    samples[25] = dict(samples[25], png=b"not a png")
    samples[30] = {k: v for k, v in samples[30].items() if k != "txt"}
    with ShardWriter(str(root / "test"), shard_size=20) as writer:
        for s in samples:
            writer.write({k: v for k, v in s.items() if k in ("__key__", "png", "txt", "cls")})
    return root


def test_embed_resumes_part_by_part(small_set, built, tmp_path, capsys):
    out = tmp_path / "emb"
    args = ["embed", "--model", str(built["run"]), "--data", str(small_set), "--out", str(out), "--part-shards", "1",
            "--workers", "0", "--no-progress"]
    assert main(args) == 0
    first = store.load_embeddings(out)
    assert first["info"]["parts"] == 3 and first["info"]["images"] == 59
    assert first["info"]["skipped"] == {"corrupt_image": 1}
    assert first["images"]["captions"][29] == 0 and first["info"]["captions"] == 58 * 5  # no txt: image kept
    kept = (out / store.IMAGE_EMB / "part_00000.npy").stat().st_mtime_ns
    (out / store.PART_MARKS / "part_00002.json").unlink()  # as if killed while writing part 2
    (out / store.IMAGE_EMB / "part_00002.npy").write_bytes(b"half written")
    capsys.readouterr()
    assert main(args) == 0
    assert ", 2 resumed" in capsys.readouterr().out
    again = store.load_embeddings(out)
    assert (out / store.IMAGE_EMB / "part_00000.npy").stat().st_mtime_ns == kept  # not redone
    np.testing.assert_array_equal(again["image"], first["image"])
    assert again["images"] == first["images"] and again["texts"] == first["texts"]


def one_line_error(capsys, args, *needles) -> None:
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmcl: error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err


def test_bad_input_is_one_line_and_exit_2(built, tmp_path, capsys):
    index = built["exact"]
    one_line_error(capsys, ["search", tmp_path / "nowhere", "--text", "a seven"], "no such index folder")
    one_line_error(capsys, ["search", index, "--text", "   "], "empty query")
    one_line_error(capsys, ["search", index, "--text", "a", "--image", "x.png"], "exactly one of --text or --image")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG but not really")
    one_line_error(capsys, ["search", index, "--image", junk], str(junk), "not an image that decodes")
    one_line_error(capsys, ["search", index, "--image", tmp_path / "missing.jpg"], "no such image file")
    broken = tmp_path / "broken"  # a copy of the index whose faiss file is cut short
    broken.mkdir()
    for f in index.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "image.faiss").write_bytes((index / "image.faiss").read_bytes()[:300])
    one_line_error(capsys, ["search", broken, "--text", "a seven"], "image.faiss", "not a readable faiss index")
    (broken / store.INDEX_FILE).write_text("{not json")
    one_line_error(capsys, ["search", broken, "--text", "a seven"], "index.json", "not valid JSON")


def test_model_of_another_width_is_refused(built, tmp_path, capsys):
    import open_clip
    from safetensors.torch import save_file

    from conftest import TINY_MODEL

    config = dict(TINY_MODEL, embed_dim=16)
    folder = tmp_path / "wide"
    folder.mkdir()
    model = open_clip.CLIP(**config)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
    one_line_error(capsys, ["search", built["exact"], "--text", "a seven", "--model", f"local-dir:{folder}"],
                   "embeds in 16 dimensions", "32-d")


def test_bad_embed_and_build_input(built, small_set, tmp_path, capsys):
    one_line_error(capsys, ["embed", "--model", built["run"], "--data", tmp_path / "none", "--out", tmp_path / "e"],
                   "no such dataset folder")
    one_line_error(capsys, ["embed", "--model", built["run"], "--data", small_set, "--out", built["emb"]],
                   "different set of shards")  # EMB/ of another embedding is never mixed or overwritten
    one_line_error(capsys, ["index", "build", tmp_path / "none", "--out", tmp_path / "i"], "embed.json")
    one_line_error(capsys, ["index", "build", built["emb"], "--out", tmp_path / "i", "--max-memory", "1KB"],
                   "too small")
    one_line_error(capsys, ["index", "build", built["emb"], "--out", tmp_path / "i", "--max-memory", "lots"],
                   "--max-memory")
    partial = tmp_path / "partial"
    partial.mkdir()
    for f in (built["emb"] / store.EMBED_FILE,):
        (partial / f.name).write_bytes(f.read_bytes())
    one_line_error(capsys, ["index", "build", partial, "--out", tmp_path / "i"], "incomplete", "mmcl embed")


def test_plan_follows_the_memory_budget():
    n, d = 1_000_000, 256
    assert ix.plan_index(5000, d, 2**40).key == "Flat"
    assert ix.plan_index(n, d, ix.parse_memory("2GB")).key == "HNSW32"
    assert ix.plan_index(n, d, ix.parse_memory("1.1GB")).key.startswith("HNSW")
    assert ix.plan_index(n, d, ix.parse_memory("1GB")).key == "IVF4096,Flat"
    assert ix.plan_index(n, d, ix.parse_memory("512MB")).key == "IVF4096,SQ8"
    assert ix.plan_index(n, d, ix.parse_memory("200MB")).key == "OPQ128_384,IVF4096,PQ128x8"
    assert ix.plan_index(n, d, ix.parse_memory("60MB")).key == "OPQ48_288,IVF4096,PQ48x8"
    for budget in ("2GB", "512MB", "60MB"):
        assert ix.plan_index(n, d, ix.parse_memory(budget)).estimated_bytes <= ix.parse_memory(budget)
