"""Files of an embedding folder (`mmcl embed --out EMB/`) and of an index folder (`mmcl index build --out INDEX/`).

EMB/ is written part by part; a part covers a fixed group of shards and is complete when its marker
`parts/part_NNNNN.json` exists (it is written last, after its arrays and tables):

    EMB/embed.json                        what was embedded: model, shards, part size, dtype; totals when done
    EMB/img_emb/part_NNNNN.npy            [images, D] L2-normalised image embeddings (float32 or float16)
    EMB/text_emb/part_NNNNN.npy           [captions, D] one embedding per caption line
    EMB/metadata/part_NNNNN.parquet       one row per image: key, caption (first line), captions, shard, offset
    EMB/text_metadata/part_NNNNN.parquet  one row per caption: image (row in the part), caption
    EMB/parts/part_NNNNN.json             images, captions, skipped samples by kind, seconds

`offset` is the byte offset of the sample's first tar header in `shard`: mmcl.data_pipelines.tarstream.sample_at
reads the sample back from there without unpacking anything.

INDEX/ holds `index.json` (model, width, statistics of each index), `image.faiss`, `text.faiss` (when there
are captions), `images.parquet` (image_id, key, caption, shard, offset) and `texts.parquet` (text_id,
image_id, caption).

Every file is written to a temporary name and renamed into place, so a killed run leaves whole files only.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

EMBED_FILE, INDEX_FILE = "embed.json", "index.json"
IMAGE_EMB, TEXT_EMB, IMAGE_META, TEXT_META, PART_MARKS = "img_emb", "text_emb", "metadata", "text_metadata", "parts"
IMAGE_TABLE, TEXT_TABLE = "images.parquet", "texts.parquet"
FORMAT = 1


def part_name(part: int) -> str:
    return f"part_{part:05d}"


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _commit(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _tmp(path).write_text(json.dumps(data, indent=1) + "\n")
    _commit(_tmp(path), path)


def read_json(path: Path, what: str) -> dict:
    """A JSON object; FileNotFoundError / ValueError naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"no {what}: {path} is missing")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}): the {what} is damaged") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a format-{FORMAT} {what}")
    return data


def write_array(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(_tmp(path), "wb") as f:
        np.save(f, array)
    _commit(_tmp(path), path)


def read_array(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read embeddings {path}: {err}") from None


def write_table(path: Path, columns: Dict[str, list]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), str(_tmp(path)))
    _commit(_tmp(path), path)


def read_table(path: Path) -> Dict[str, list]:
    """A Parquet table as {column: list}; ValueError naming the file when it cannot be read."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise FileNotFoundError(f"missing table: {path}")
    try:
        return pq.read_table(str(path)).to_pydict()
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ...
        raise ValueError(f"cannot read table {path}: {type(err).__name__}: {err}") from None


def done_parts(emb: Path, parts: int) -> List[int]:
    """Parts whose marker exists (written after everything else of the part)."""
    return [p for p in range(parts) if (emb / PART_MARKS / f"{part_name(p)}.json").is_file()]


def load_embeddings(emb: Path) -> dict:
    """Everything a complete EMB/ folder holds, concatenated in part order with global ids.

    Returns {"info", "image" [N, D] float32, "text" [T, D] float32, "images": columns, "texts": columns};
    `texts["image_id"]` indexes `images`. Raises ValueError when parts are missing (embedding not finished).
    """
    info = read_json(emb / EMBED_FILE, "embedding folder (run `mmcl embed` first)")
    parts = int(info["parts"])
    missing = sorted(set(range(parts)) - set(done_parts(emb, parts)))
    if missing:
        raise ValueError(f"{emb} is incomplete: {len(missing)} of {parts} parts missing (first: "
                         f"{part_name(missing[0])}); run the same `mmcl embed` again to finish it")
    image, text, images, texts = [], [], {}, {}
    for part in range(parts):
        name = part_name(part)
        image.append(read_array(emb / IMAGE_EMB / f"{name}.npy"))
        text.append(read_array(emb / TEXT_EMB / f"{name}.npy"))
        rows, caps = read_table(emb / IMAGE_META / f"{name}.parquet"), read_table(emb / TEXT_META / f"{name}.parquet")
        start = sum(len(block) for block in image[:-1])
        caps["image_id"] = [start + i for i in caps.pop("image")]
        for columns, new in ((images, rows), (texts, caps)):
            for key, values in new.items():
                columns.setdefault(key, []).extend(values)
    return {"info": info, "image": _stack(image), "text": _stack(text), "images": images, "texts": texts}


def _stack(blocks: List[np.ndarray]) -> np.ndarray:
    dims = {block.shape[1] for block in blocks if block.size}
    if len(dims) > 1:
        raise ValueError(f"parts disagree on the embedding width: {sorted(dims)}")
    dim = dims.pop() if dims else 0
    blocks = [block for block in blocks if block.size]
    return np.ascontiguousarray(np.concatenate(blocks).astype(np.float32) if blocks else np.zeros((0, dim), np.float32))


def index_files(index_dir: Path) -> Optional[dict]:
    """index.json of an index folder, or None when the folder holds none."""
    path = Path(index_dir) / INDEX_FILE
    return read_json(path, "mmcl index") if path.exists() else None
