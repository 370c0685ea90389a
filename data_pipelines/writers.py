"""Shard writers: image-caption samples from a folder, a CSV or a JSONL into CLIP_benchmark's layout.

Output: `OUT/SPLIT/{0..N-1}.tar`, `OUT/SPLIT/nshards.txt`, `OUT/SPLIT/sizes.json` ({"samples": N}).
Each sample holds the image (`jpg`, `png` or `webp`), `txt` (its captions, one a line), `json`
({"source": where it came from}) and, when a label is given, `cls`.

A shard is written to `{i}.tar.tmp` and renamed to `{i}.tar` only when complete, so a crash never leaves a
truncated shard under a final name; `nshards.txt` and `sizes.json` are written last, when every shard is done.
Unreadable images, missing images and empty captions are skipped and counted by kind (the kinds of
`mmcl.data_pipelines.decode.KINDS`).
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

import webdataset as wds
from PIL import Image

from mmcl.data_pipelines.decode import DEFAULT_MAX_PIXELS, BadSample, decode_captions, decode_image
from mmcl.data_pipelines.shards import NSHARDS_FILE, SIZES_FILE

# Files a folder source reads as images. Formats outside jpg/png/webp are re-encoded to PNG.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
JPEG_QUALITY = 95
# Tar entry times: fixed, so the same input gives byte-identical shards. An int, because a float mtime
# makes tarfile add a PAX header (1 KiB) to every entry.
FIXED_MTIME = 0
MAX_REPORTED = 5  # skipped samples quoted in a summary; the rest are only counted


def _write_atomic(path: str, text: str) -> None:
    """Write a small text file under a temporary name, then rename it into place."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _is_shard_file(name: str) -> bool:
    return name.endswith((".tar", ".tar.tmp")) or name in (NSHARDS_FILE, SIZES_FILE)


class ShardWriter:
    """Write samples to `split_dir/{i}.tar`, `shard_size` samples a shard; use as a context manager.

    `overwrite=False` refuses a folder that already holds shards; `overwrite=True` deletes them first
    (so stale shards of an older, longer run cannot mix with the new ones). On an exception inside the
    `with` block the shard in progress is deleted and no `nshards.txt` / `sizes.json` is written.
    """

    def __init__(self, split_dir: str, shard_size: int = 1000, overwrite: bool = False):
        if not isinstance(shard_size, int) or isinstance(shard_size, bool) or shard_size < 1:
            raise ValueError(f"shard size should be a positive integer, got {shard_size!r}")
        self.split_dir = split_dir
        self.shard_size = shard_size
        self.shards = 0  # completed shards
        self.samples = 0  # samples written, in completed shards and the open one
        self._in_shard = 0
        self._file = None
        self._tar = None
        self._prepare(overwrite)

    def _prepare(self, overwrite: bool) -> None:
        os.makedirs(self.split_dir, exist_ok=True)
        old = sorted(n for n in os.listdir(self.split_dir) if _is_shard_file(n))
        if old and not overwrite:
            raise ValueError(f"{self.split_dir} already holds shards; pass --overwrite to replace them")
        # nshards.txt goes first, so that a reader never trusts a count that no longer matches the files.
        for name in sorted(old, key=lambda n: n != NSHARDS_FILE):
            os.remove(os.path.join(self.split_dir, name))

    def _final_path(self) -> str:
        return os.path.join(self.split_dir, f"{self.shards}.tar")

    def write(self, sample: Dict[str, Any]) -> None:
        """Add one sample: a dict with `__key__` and bytes / str / int values, keyed by extension."""
        if self._tar is None:
            self._file = open(self._final_path() + ".tmp", "wb")
            self._tar = wds.TarWriter(self._file, mtime=FIXED_MTIME)
        self._tar.write(sample)
        self._in_shard += 1
        self.samples += 1
        if self._in_shard >= self.shard_size:
            self._finish_shard()

    def _finish_shard(self) -> None:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())  # the data is on disk before the name says the shard is complete
        self._file.close()
        os.replace(self._final_path() + ".tmp", self._final_path())
        self._tar = self._file = None
        self._in_shard = 0
        self.shards += 1

    def close(self) -> Dict[str, int]:
        """Complete the open shard, write `nshards.txt` and `sizes.json`; return the counts."""
        if self._tar is not None:
            self._finish_shard()
        _write_atomic(os.path.join(self.split_dir, SIZES_FILE), json.dumps({"samples": self.samples}) + "\n")
        _write_atomic(os.path.join(self.split_dir, NSHARDS_FILE), f"{self.shards}\n")
        return {"shards": self.shards, "samples": self.samples}

    def abort(self) -> None:
        """Drop the shard in progress. Completed shards stay, but no count files vouch for them."""
        if self._tar is not None:
            try:
                self._tar.close()  # else the tar stream flushes into a closed file when collected
            except Exception:  # the shard is thrown away: a failure to finish it does not matter
                pass
        if self._file is not None:
            self._file.close()
            tmp = self._final_path() + ".tmp"
            if os.path.exists(tmp):
                os.remove(tmp)
        self._tar = self._file = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


@dataclass
class Record:
    """One sample to write, before anything is read or checked.

    `image` is a file path ("" when the source had none); `captions` is a string (lines), a list of
    strings, raw bytes of a caption file, or None; `label` is the class index or None; `name` is the
    image as the source named it (stored in the sample's `json`); `where` locates the record for reports.
    """

    image: str
    captions: Any
    label: Any = None
    name: str = ""
    where: str = ""


def _sniff_format(data: bytes) -> Optional[str]:
    """The webdataset key for image bytes that decoders read as they are: jpg, png, webp; else None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def resized_size(size: Tuple[int, int], shorter_side: int) -> Tuple[int, int]:
    """The size with the shorter side scaled down to `shorter_side`, aspect kept; never scaled up."""
    width, height = size
    short = min(width, height)
    if short <= shorter_side:
        return size
    scale = shorter_side / short
    if width <= height:
        return shorter_side, max(1, round(height * scale))
    return max(1, round(width * scale)), shorter_side


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


def encode_image(data: bytes, img: Image.Image, resize: Optional[int]) -> Tuple[str, bytes]:
    """(key, bytes) to store: JPEG q95 when resized, else the original bytes (PNG for uncommon formats)."""
    if resize is not None:
        size = resized_size(img.size, resize)
        if size != img.size:
            return "jpg", _encode(img.resize(size, Image.BICUBIC, reducing_gap=3.0), "jpg")
    fmt = _sniff_format(data)
    if fmt is not None:
        return fmt, data
    return "png", _encode(img, "png")


def _read_image_bytes(path: str) -> bytes:
    if not path:
        raise BadSample("missing_image", "no image path")
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise BadSample("missing_image", f"no such file: {path}") from None
    except OSError as err:
        raise BadSample("read_error", f"{path}: {err.strerror or err}") from None


def _caption_lines(captions: Any) -> List[str]:
    """Caption lines from a string, bytes or a list; BadSample when none is usable."""
    if isinstance(captions, (list, tuple)):
        captions = "\n".join(str(c) for c in captions if c is not None)
    return decode_captions(captions)


def _label(label: Any) -> Optional[int]:
    if label is None:
        return None
    try:
        value = int(str(label).strip())
    except ValueError:
        raise BadSample("bad_label", f"not an integer: {str(label)[:40]!r}") from None
    if isinstance(label, bool) or value < 0:
        raise BadSample("bad_label", f"not a class index: {label!r}")
    return value


def make_sample(record: Record, key: str, resize: Optional[int] = None,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> Dict[str, Any]:
    """The webdataset sample for a record; BadSample when its image, captions or label are unusable."""
    captions = _caption_lines(record.captions)
    label = _label(record.label)
    data = _read_image_bytes(record.image)
    img = decode_image(data, max_pixels)  # validates the bytes even when they are copied as they are
    image_key, image_bytes = encode_image(data, img, resize)
    sample = {"__key__": key, image_key: image_bytes, "txt": "\n".join(captions),
              "json": json.dumps({"source": record.name or record.image}, ensure_ascii=False)}
    if label is not None:
        sample["cls"] = str(label)
    return sample


def _summary(out: str, split: str, counts: Dict[str, int], skipped: Dict[str, int],
             examples: List[str]) -> Dict[str, Any]:
    return {"out": out, "split": split, "split_dir": os.path.join(out, split), **counts,
            "skipped": dict(sorted(skipped.items())), "skipped_total": sum(skipped.values()),
            "skipped_examples": examples}


def _skip_text(skipped: Dict[str, int]) -> str:
    return ", ".join(f"{kind}: {n}" for kind, n in sorted(skipped.items()))


def write_records(records: Iterable[Record], out: str, split: str = "train", shard_size: int = 1000,
                  resize: Optional[int] = None, overwrite: bool = False,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> Dict[str, Any]:
    """Write records as shards of `out/split`, skipping and counting bad ones; return a summary dict.

    Raises ValueError when no record gives a usable sample (nothing is then marked complete).
    """
    if resize is not None and (not isinstance(resize, int) or resize < 1):
        raise ValueError(f"resize should be a positive integer (shorter side in pixels), got {resize!r}")
    skipped: Dict[str, int] = {}
    examples: List[str] = []
    with ShardWriter(os.path.join(out, split), shard_size, overwrite) as writer:
        for record in records:
            try:
                writer.write(make_sample(record, f"{writer.samples:09d}", resize, max_pixels))
            except BadSample as err:
                skipped[err.kind] = skipped.get(err.kind, 0) + 1
                if len(examples) < MAX_REPORTED:
                    examples.append(f"{record.where or record.image}: {err}")
        if writer.samples == 0:
            writer.abort()
            total = sum(skipped.values())
            raise ValueError(f"no usable samples: {total} skipped ({_skip_text(skipped) or 'no input'})")
    return _summary(out, split, {"shards": writer.shards, "samples": writer.samples}, skipped, examples)


def folder_records(folder: str) -> List[Record]:
    """Images under `folder` (recursive, sorted by relative path), captions from sidecar `name.txt`."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no such image folder: {folder}")
    paths = []
    for dirpath, dirnames, filenames in os.walk(folder):
        # Hidden entries are editor and OS clutter (.ipynb_checkpoints, macOS "._x.jpg" forks), not data.
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        paths += [os.path.join(dirpath, n) for n in filenames
                  if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")]
    records = []
    for path in sorted(paths, key=lambda p: os.path.relpath(p, folder)):
        sidecar = os.path.splitext(path)[0] + ".txt"
        captions = None
        if os.path.isfile(sidecar):
            with open(sidecar, "rb") as f:
                captions = f.read()
        relpath = os.path.relpath(path, folder)
        records.append(Record(path, captions, None, relpath, relpath))
    if not records:
        raise ValueError(f"no images ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}) under {folder}")
    return records


def _resolve(path: Any, base: str) -> str:
    """An image path from a table, relative paths taken from the table's folder."""
    if path is None or not str(path).strip():
        return ""
    path = os.path.expanduser(str(path).strip())
    return path if os.path.isabs(path) else os.path.join(base, path)


def _delimiter(sep: str) -> str:
    sep = {"\\t": "\t", "tab": "\t"}.get(sep, sep)
    if len(sep) != 1:
        raise ValueError(f"CSV separator should be one character, got {sep!r}")
    return sep


def csv_records(path: str, image_col: str = "image", caption_col: str = "caption",
                label_col: Optional[str] = None, sep: str = ",") -> List[Record]:
    """Records from a CSV with a header row; image paths relative to the CSV's folder."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such CSV file: {path}")
    base = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter=_delimiter(sep))
            columns = reader.fieldnames or []
            for col in [image_col, caption_col] + ([label_col] if label_col else []):
                if col not in columns:
                    raise ValueError(f"{path}: no column {col!r} (columns: {', '.join(columns) or 'none'})")
            name = os.path.basename(path)
            return [Record(_resolve(row[image_col], base), row[caption_col],
                           row[label_col] if label_col else None, row[image_col] or "",
                           f"{name} line {reader.line_num}")
                    for row in reader]
    except (UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{path}: unreadable CSV ({err})") from None


def _jsonl_record(obj: Any, where: str, base: str, image_key: str, caption_key: str,
                  label_key: Optional[str]) -> Record:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    image = obj.get(image_key)
    image = image if isinstance(image, str) else None
    return Record(_resolve(image, base), obj.get(caption_key), obj.get(label_key) if label_key else None,
                  image or "", where)


def jsonl_records(path: str, image_key: str = "image", caption_key: str = "caption",
                  label_key: Optional[str] = None) -> List[Record]:
    """Records from a JSONL file, one object a line; `caption_key` may hold a string or a list."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such JSONL file: {path}")
    base = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{name} line {line_no}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{where}: not JSON ({err.msg})") from None
                records.append(_jsonl_record(obj, where, base, image_key, caption_key, label_key))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 ({err.reason})") from None
    return records


def write_from_folder(folder: str, out: str, split: str = "train", **options) -> Dict[str, Any]:
    """Shards from a folder of images with sidecar captions. `options`: those of `write_records`."""
    return write_records(folder_records(folder), out, split, **options)


def write_from_csv(csv_path: str, out: str, split: str = "train", image_col: str = "image",
                   caption_col: str = "caption", label_col: Optional[str] = None, sep: str = ",",
                   **options) -> Dict[str, Any]:
    """Shards from a CSV (header row; `label_col` optional, written as `cls`)."""
    return write_records(csv_records(csv_path, image_col, caption_col, label_col, sep), out, split, **options)


def write_from_jsonl(path: str, out: str, split: str = "train", image_key: str = "image",
                     caption_key: str = "caption", label_key: Optional[str] = None,
                     **options) -> Dict[str, Any]:
    """Shards from a JSONL file (`label_key` optional, written as `cls`)."""
    return write_records(jsonl_records(path, image_key, caption_key, label_key), out, split, **options)
