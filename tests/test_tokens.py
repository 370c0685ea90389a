"""WordMemoTokenizer gives open_clip's SimpleTokenizer ids exactly, on real captions and on seeded random text."""
from __future__ import annotations

import random
import string

import ftfy
import open_clip
import pytest
import torch

from mmcl.data_pipelines.tokens import PLAIN_TEXT, CachedTokenizer, WordMemoTokenizer, fast_tokenizer
from mmcl.models import factory

CAPTIONS = [
    "A black dog is running through the grass .",
    "Two children play on a swing set at the park while their parents watch from a bench nearby , "
    "holding coffee cups and talking about the weather on a cold morning in late November",  # over 32 tokens
    "the digit 7", "a photo of a 3", "", "   ", "&amp; Tom &amp;amp; Jerry &lt;3", "naïve café résumé – “quotes”",
    "Ã©tÃ© mojibake", "日本語のテキスト と English", "emoji 🐕🐕 dogs", "<start_of_text> inside <end_of_text>",
    "it's they're we've I'm you'll he'd", "1234567890 3.14159 x^2", "tab\tand\nnewline\r\nhere",
    "\x1b[31mred\x1b[0m terminal", "UPPER lower MiXeD",
]


def random_text(rng: random.Random, alphabet="abcdefghij XYZ 0123 .,!?'&;<>#\t\néüß中文😀\u200b\x00\x7f\r") -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 60)))


PLAIN_ALPHABET = string.printable.replace("&", "").replace("\r", "").replace("\x0b", "").replace("\x0c", "")


def test_plain_text_is_left_unchanged_by_ftfy_and_html_unescaping():
    """The ground for skipping ftfy: on PLAIN_TEXT, open_clip's cleaning is only whitespace and lower case."""
    rng = random.Random(0)
    texts = [random_text(rng, PLAIN_ALPHABET) for _ in range(2000)] + [c for c in CAPTIONS if PLAIN_TEXT.fullmatch(c)]
    assert all(PLAIN_TEXT.fullmatch(t) for t in texts)
    for text in texts:
        assert ftfy.fix_text(text) == text
        assert open_clip.tokenizer._clean_lower(text) == " ".join(text.split()).lower()
    for text in ("&amp;", "caf\u00e9", "a\rb", "\x1b[31m", "x\x0cy"):  # what ftfy or unescaping may change
        assert not PLAIN_TEXT.fullmatch(text)


@pytest.mark.parametrize("context", [8, 32, 77])
def test_word_memo_gives_open_clips_ids(context):
    plain = open_clip.tokenizer.SimpleTokenizer(context_length=context)
    memo = WordMemoTokenizer(open_clip.tokenizer.SimpleTokenizer(context_length=context))
    rng = random.Random(context)
    texts = CAPTIONS + [random_text(rng) for _ in range(300)] + [random_text(rng, PLAIN_ALPHABET) for _ in range(300)]
    for _ in range(2):  # the second pass reads every word from the memo
        want, got = plain(texts), memo(texts)
        assert got.dtype == want.dtype == torch.long and got.shape == want.shape == (len(texts), context)
        assert torch.equal(got, want)
    assert torch.equal(memo("a single caption"), plain("a single caption"))
    assert torch.equal(memo(CAPTIONS, context_length=5), plain(CAPTIONS, context_length=5))
    assert memo([]).shape == plain([]).shape == (0, context)
    assert memo.vocab_size == plain.vocab_size and memo.decode(plain.encode("a dog")) == "a dog "


def test_word_memo_starts_over_when_full(monkeypatch):
    monkeypatch.setattr(WordMemoTokenizer, "MAX_WORDS", 4)
    plain = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    memo = WordMemoTokenizer(plain)
    texts = ["one two three four five six", "seven eight one two", "nine ten"]
    assert torch.equal(memo(texts), plain(texts))
    assert 0 < len(memo.words) <= 4


def test_fast_tokenizer_wraps_only_the_plain_bpe_tokenizer():
    plain = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    assert isinstance(fast_tokenizer(plain), WordMemoTokenizer)
    reduced = open_clip.tokenizer.SimpleTokenizer(context_length=16, reduction_mask="simple")
    assert fast_tokenizer(reduced) is reduced  # open_clip's own reduction rules stay in charge
    assert isinstance(factory.make_tokenizer({"text_cfg": {"context_length": 16}}), WordMemoTokenizer)
    cached = CachedTokenizer(fast_tokenizer(plain))
    assert torch.equal(cached(CAPTIONS), plain(CAPTIONS)) and cached.context_length == 16


def test_word_memo_survives_pickling_for_spawned_loader_workers():
    import pickle

    memo = CachedTokenizer(WordMemoTokenizer(open_clip.tokenizer.SimpleTokenizer(context_length=16)))
    memo(CAPTIONS[:3])
    copy = pickle.loads(pickle.dumps(memo))
    assert torch.equal(copy(CAPTIONS), open_clip.tokenizer.SimpleTokenizer(context_length=16)(CAPTIONS))
