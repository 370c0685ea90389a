"""Seeded corruptions of small digits shards, and what an independent reader says the damaged shards hold.

The reference reader is Python's `tarfile` (which stops quietly at the first bad header) and PIL, with the
rules the README states for what mmcl counts: after the last member tarfile can read in full, a block of 512
zero bytes is a clean end, a short block (or the end of the file) is `truncated_tar`, anything else is
`read_error`; a member whose data runs past the end of the file is `truncated_tar`. Samples are grouped by
webdataset's own `group_by_keys`.
"""
from __future__ import annotations

import functools
import io
import json
import os
import random
import shutil
import tarfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import webdataset as wds
from PIL import Image
from webdataset.tariterators import group_by_keys

from mmcl.data_pipelines import decode

BLOCK = 512
SHARD_LEVEL = ("read_error", "truncated_tar")


# ---- a small digits set ------------------------------------------------------------------------------

def small_digits(digits_root: str, dest: Path, shards: int = 4, per_shard: int = 24) -> Path:
    """`shards` x `per_shard` digits (from the embedded set) in CLIP_benchmark's layout, split `train`."""
    with tarfile.open(Path(digits_root) / "train" / "0.tar") as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()[: 3 * shards * per_shard]]
    samples: Dict[str, dict] = {}
    for name, data in members:
        key, ext = name.split(".", 1)
        samples.setdefault(key, {"__key__": key})[ext] = data
    ordered = list(samples.values())
    (dest / "train").mkdir(parents=True)
    for i in range(shards):
        write_samples(dest / "train" / f"{i}.tar", ordered[i * per_shard:(i + 1) * per_shard])
    (dest / "train" / "nshards.txt").write_text(f"{shards}\n")
    (dest / "train" / "sizes.json").write_text(json.dumps({"samples": shards * per_shard}))
    for name in ("classnames.txt", "zeroshot_classification_templates.txt"):
        shutil.copyfile(Path(digits_root) / name, dest / name)
    return dest


def write_samples(path: Path, samples: List[dict]) -> None:
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def read_samples(path: Path) -> List[dict]:
    return reference_samples(path)[0]


# ---- corruptions -------------------------------------------------------------------------------------

def archive_end(data: bytes) -> int:
    """Offset of the end-of-archive marker of an intact tar."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        last = tar.getmembers()[-1]
    return last.offset_data + (last.size + BLOCK - 1) // BLOCK * BLOCK


def flip(path: Path, rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    at = rng.randrange(archive_end(bytes(data)) + BLOCK)  # headers, data, padding or the end marker
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    return f"flip@{at}"


def truncate(path: Path, rng: random.Random) -> str:
    data = path.read_bytes()
    at = rng.randrange(archive_end(data) + BLOCK)
    path.write_bytes(data[:at])
    return f"cut@{at}"


def insert(path: Path, rng: random.Random) -> str:
    data = path.read_bytes()
    at, size = rng.randrange(archive_end(data)), rng.randrange(1, BLOCK)
    path.write_bytes(data[:at] + rng.randbytes(size) + data[at:])
    return f"insert{size}@{at}"


def junk_after_end(path: Path, rng: random.Random) -> str:
    size = rng.randrange(1, 6000)
    with open(path, "ab") as fh:
        fh.write(rng.randbytes(size))
    return f"junk{size}"


def random_bytes(path: Path, rng: random.Random) -> str:
    path.write_bytes(rng.randbytes(path.stat().st_size))
    return "random"


def size_claim(path: Path, rng: random.Random) -> str:
    """A member header whose size field claims 8 GiB (checksum made valid): a lie the file cannot hold."""
    data = bytearray(path.read_bytes())
    with tarfile.open(fileobj=io.BytesIO(bytes(data)), mode="r:") as tar:
        member = rng.choice(tar.getmembers())
    at = member.offset_data - BLOCK  # the member's own header (a pax header may come before it)
    data[at + 124:at + 136] = b"77777777777\0"
    data[at + 148:at + 156] = b" " * 8
    data[at + 148:at + 156] = b"%06o\0 " % (sum(data[at:at + BLOCK]))
    path.write_bytes(bytes(data))
    return f"claim8G@{at}"


def replace_member(path: Path, rng: random.Random, ext: str, make: Callable[[random.Random], bytes]) -> str:
    samples = read_samples(path)
    index = rng.randrange(len(samples))
    samples[index] = {k: v for k, v in samples[index].items() if not k.startswith("__")} | \
        {"__key__": samples[index]["__key__"], ext: make(rng)}
    write_samples(path, samples)
    return f"{ext}@{index}"


def huge_caption(path: Path, rng: random.Random) -> str:
    return replace_member(path, rng, "txt", lambda r: b"w" * r.choice([decode.MAX_WORD_CHARS + 1, 1 << 20]))


def big_member(path: Path, rng: random.Random) -> str:
    return replace_member(path, rng, "png", lambda r: r.randbytes(3 << 20))


@functools.lru_cache(maxsize=1)
def bomb_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (9000, 9000)).save(buf, format="PNG")  # 81 Mpx > the default bound of 64 Mpx, 80 kB on disk
    return buf.getvalue()


def bomb(path: Path, rng: random.Random) -> str:
    return replace_member(path, rng, "png", lambda _: bomb_png())


CORRUPTIONS = {"flip": flip, "truncate": truncate, "insert": insert, "junk_after_end": junk_after_end,
               "random_bytes": random_bytes, "size_claim": size_claim, "huge_caption": huge_caption,
               "big_member": big_member, "bomb": bomb}


def corrupt(root: Path, rng: random.Random, names: Optional[List[str]] = None) -> List[str]:
    """Damage train shards of `root`, each once: with the corruptions `names` (one shard each), or with one
    or two drawn at random. Returns what was done, for failure messages."""
    urls = sorted((root / "train").glob("*.tar"))
    names = names or [rng.choice(sorted(CORRUPTIONS)) for _ in range(rng.choice([1, 1, 2]))]
    done = []
    for path, name in zip(rng.sample(urls, len(names)), names):
        done.append(f"{path.name}:{name}:{CORRUPTIONS[name](path, rng)}")
    return done


# ---- the reference reader ----------------------------------------------------------------------------

# tarfile reads a pax or GNU long-name header together with the header it describes (webdataset's writer puts
# a pax header before every member), and says which way the pair failed only in its message
CUT_SHORT = ("unexpected end of data", "truncated header", "empty header", "empty file")


def block_kind(path: Path, offset: int) -> Optional[str]:
    with open(path, "rb") as fh:
        fh.seek(offset)
        block = fh.read(BLOCK)
    if len(block) < BLOCK:
        return "truncated_tar"
    return None if block.count(0) == BLOCK else "read_error"


def error_kind(err: tarfile.ReadError, path: Path, offset: int) -> str:
    return "truncated_tar" if any(text in str(err) for text in CUT_SHORT) else block_kind(path, offset) or "read_error"


def intact_members(path: Path) -> Tuple[List[Tuple[str, bytes]], Optional[str]]:
    """(name, data) of the members tarfile reads in full, and how the archive ends (None: cleanly)."""
    size = os.path.getsize(path)
    try:
        tar = tarfile.open(path, mode="r:")
    except tarfile.ReadError as err:  # the first header is already bad
        return [], error_kind(err, path, 0)
    members = []
    with tar:
        while True:
            try:
                member = tar.next()
            except tarfile.ReadError as err:  # a bad header, or the previous member's padding runs past the end
                return members, error_kind(err, path, tar.offset)
            if member is None:
                return members, block_kind(path, tar.offset)
            if member.offset_data + member.size > size:
                return members, "truncated_tar"
            if member.isreg():
                members.append((member.name, tar.extractfile(member).read()))


def expected_kind(sample: dict, label: bool, caption: bool, max_pixels: int = decode.DEFAULT_MAX_PIXELS) -> Optional[str]:
    """The README's rules for one sample, checked in its order (label, caption, image); None when usable."""
    if label:
        try:
            int(sample["cls"].decode("utf-8").strip())
        except (KeyError, ValueError, UnicodeDecodeError):
            return "bad_label"
    if caption:
        kind = caption_kind(sample.get("txt"))
        if kind:
            return kind
    return image_kind(sample, max_pixels)


def caption_kind(data: Optional[bytes]) -> Optional[str]:
    if data is None:
        return "missing_caption"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "bad_caption_encoding"
    if len(text) > decode.MAX_CAPTION_CHARS or max(map(len, text.split()), default=0) > decode.MAX_WORD_CHARS:
        return "long_caption"
    return None if text.strip() else "empty_caption"


def image_kind(sample: dict, max_pixels: int) -> Optional[str]:
    key = next((k for k in ("jpg", "jpeg", "png", "webp") if k in sample), None)
    if key is None:
        return "missing_image"
    if not sample[key]:
        return "empty_image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the bound below is the one that counts
            with Image.open(io.BytesIO(sample[key])) as img:
                if img.size[0] * img.size[1] > max_pixels:
                    return "too_many_pixels"
                img.convert("RGB")
    except Image.DecompressionBombError:
        return "too_many_pixels"
    except Exception:  # noqa: BLE001 - whatever PIL raises, the image does not decode
        return "corrupt_image"
    return None


def reference_samples(path: Path) -> Tuple[List[dict], Optional[str]]:
    """The samples of one shard per the reference reader, and how the shard ends (None: cleanly)."""
    members, end = intact_members(path)
    return list(group_by_keys({"fname": n, "data": d, "__url__": str(path)} for n, d in members)), end


def expected(root: Path, label: bool = False, caption: bool = True) -> Tuple[List[str], Counter]:
    """Keys of the usable samples of `root/train` and the skip counts by kind, per the reference reader."""
    keys, counts = [], Counter()
    for path in sorted((root / "train").glob("*.tar")):
        samples, end = reference_samples(path)
        if end:
            counts[end] += 1
        for sample in samples:
            kind = expected_kind(sample, label, caption)
            if kind:
                counts[kind] += 1
            else:
                keys.append(sample["__key__"])
    return sorted(keys), counts
