"""Safe decoding of webdataset samples: images, captions and class labels.

Every failure raises `BadSample(kind, detail)` so that the streams can skip the sample and count it by kind.
Nothing here trusts the bytes: images are size-checked from their header before the pixels are decoded
(decompression bombs), captions must be UTF-8, non-empty and of bounded length (open_clip's BPE tokenizer
takes time quadratic in the length of a word: 0.65 s for one 4,000-letter word, minutes for a megabyte).
"""
from __future__ import annotations

import io
import random
import warnings
from typing import List, Optional

from PIL import Image

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
DEFAULT_MAX_PIXELS = 1 << 26  # 64 Mpx; far above any training image, far below a decompression bomb
# A `txt` (all its lines) over this many characters, or holding a word (a run without whitespace) over
# MAX_WORD_CHARS, is skipped as `long_caption` before any tokenizer sees it. Real captions are far shorter
# (CLIP reads 77 tokens); a 128-letter word tokenizes in about a millisecond.
MAX_CAPTION_CHARS = 8192
MAX_WORD_CHARS = 128

# Kinds of bad sample, the names under which the streams count them. The last two count damaged shards
# (once each time the shard is read; mmcl.data_pipelines.tarstream decides which), the others samples.
KINDS = (
    "missing_image",
    "empty_image",
    "corrupt_image",
    "too_many_pixels",
    "missing_caption",
    "empty_caption",
    "bad_caption_encoding",
    "long_caption",
    "bad_label",
    "read_error",
    "truncated_tar",
)


class BadSample(Exception):
    """A sample that cannot be used. `kind` is one of KINDS; `detail` says what was wrong."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail


def find_image_key(sample: dict) -> Optional[str]:
    """The first key of `sample` that holds an image, or None."""
    for key in IMAGE_KEYS:
        if key in sample:
            return key
    return None


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes to an RGB PIL image, refusing empty, corrupt or oversized images."""
    if not data:
        raise BadSample("empty_image", "zero bytes")
    try:
        with warnings.catch_warnings():
            # PIL warns (and at 2x raises) on bombs by its own global limit; we apply ours instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size  # header only: no pixels decoded yet
            if width * height > max_pixels:
                raise BadSample("too_many_pixels", f"{width}x{height} > {max_pixels} pixels")
            img.load()
            return img if img.mode == "RGB" else img.convert("RGB")  # convert() would copy an RGB image
    except BadSample:
        raise
    except Image.DecompressionBombError as err:
        raise BadSample("too_many_pixels", str(err)) from None
    except Exception as err:  # PIL raises many types for broken files: OSError, SyntaxError, ValueError...
        raise BadSample("corrupt_image", f"{type(err).__name__}: {err}") from None


def sample_image(sample: dict, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The decoded image of a raw webdataset sample (bytes values)."""
    key = find_image_key(sample)
    if key is None:
        raise BadSample("missing_image", f"sample {sample.get('__key__')} has no {'/'.join(IMAGE_KEYS)}")
    return decode_image(sample[key], max_pixels)


def decode_captions(data: Optional[bytes]) -> List[str]:
    """All non-empty caption lines of a `txt` value."""
    if data is None:
        raise BadSample("missing_caption", "no txt")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else str(data)
    except UnicodeDecodeError as err:
        raise BadSample("bad_caption_encoding", str(err)) from None
    check_caption_length(text)
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise BadSample("empty_caption", "txt has no non-empty line")
    return lines


def check_caption_length(text: str) -> None:
    if len(text) > MAX_CAPTION_CHARS:
        raise BadSample("long_caption", f"{len(text)} characters > {MAX_CAPTION_CHARS}")
    longest = max(map(len, text.split()), default=0)
    if longest > MAX_WORD_CHARS:
        raise BadSample("long_caption", f"a word of {longest} characters > {MAX_WORD_CHARS}")


def sample_captions(sample: dict) -> List[str]:
    return decode_captions(sample.get("txt"))


def pick_caption(captions: List[str], rng: random.Random) -> str:
    """One caption at random: training sees every line of `txt` over many epochs."""
    return captions[0] if len(captions) == 1 else captions[rng.randrange(len(captions))]


def sample_label(sample: dict) -> int:
    """The class index stored under `cls`."""
    data = sample.get("cls")
    if data is None:
        raise BadSample("bad_label", "no cls")
    try:
        return int(data.decode("utf-8").strip() if isinstance(data, bytes) else data)
    except (ValueError, UnicodeDecodeError) as err:
        raise BadSample("bad_label", str(err)) from None
