"""A memo in front of a tokenizer: captions that come back (every epoch, every repeated phrasing) are
tokenized once.

open_clip's tokenizer spends ~100 us per caption in Python (ftfy, regex, BPE), a quarter of the loading work of
a tiny CLIP. A caption's tokens never change, so each DataLoader worker keeps the rows of the captions it has
seen, up to `size` of them (least recently used first out); a web-scale stream that never repeats a caption
pays one dictionary lookup per caption.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Callable, List, Optional

import torch
from open_clip import tokenizer as open_clip_tokenizer
from open_clip.tokenizer import SimpleTokenizer

# Printable ASCII without '&', plus tab and newline: text that ftfy and HTML unescaping leave unchanged
# (no mojibake, entity, control character or line break for them to fix; tests/test_tokens.py checks it against
# the installed ftfy on seeded random text).
PLAIN_TEXT = re.compile(r"[\t\n\x20-\x25\x27-\x7e]*")
# open_clip's default cleaning rule ("lower"), the one the shortcut stands in for; None if open_clip renames it,
# and then every text goes through open_clip's own cleaning
CLEAN_LOWER = getattr(open_clip_tokenizer, "_clean_lower", None)


class TokenizerWrapper:
    """A tokenizer in front of `self.tokenizer`: attributes it does not have (context_length, vocab_size,
    decode, ...) are the wrapped tokenizer's."""

    def __getattr__(self, name: str):
        if name == "tokenizer":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.tokenizer, name)


class CachedTokenizer(TokenizerWrapper):
    """Call as the wrapped tokenizer (a list of captions -> a [N, context] tensor); same output, less work."""

    def __init__(self, tokenizer: Callable, size: int = 65536):
        self.tokenizer, self.size = tokenizer, size
        self.rows: "OrderedDict[str, torch.Tensor]" = OrderedDict()

    def __call__(self, texts: List[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        missing = list(dict.fromkeys(t for t in texts if t not in self.rows))
        if missing:
            for text, row in zip(missing, self.tokenizer(missing)):
                self.rows[text] = row.clone()  # not a view: it must not keep the whole batch alive
        out = []
        for text in texts:
            self.rows.move_to_end(text)
            out.append(self.rows[text])
        while len(self.rows) > self.size:
            self.rows.popitem(last=False)
        return torch.stack(out)


class WordMemoTokenizer(TokenizerWrapper):
    """open_clip's SimpleTokenizer, the same ids for less Python per caption.

    open_clip memoizes each word's BPE string but still, for every word of every caption, re-encodes the word
    to bytes, maps the bytes to BPE characters, splits the BPE string and looks each piece up, then builds one
    tensor per caption. Here each distinct word maps straight to its ids (computed once by open_clip's own
    `bpe`, `byte_encoder` and `encoder`), and a batch becomes one tensor. Cleaning (ftfy, HTML entities,
    whitespace, lower case) and the word split are open_clip's own calls, except that plain ASCII text
    (PLAIN_TEXT) skips ftfy, which leaves it unchanged; so the ids cannot differ.
    """

    MAX_WORDS = 1 << 20  # a bound for web-scale text; the memo starts over when it is reached

    def __init__(self, tokenizer: Callable):
        self.tokenizer = tokenizer
        self.words: dict = {}

    def word_ids(self, word: str) -> List[int]:
        tok = self.tokenizer
        ids = self.words.get(word)
        if ids is None:
            pieces = tok.bpe("".join(tok.byte_encoder[b] for b in word.encode("utf-8"))).split(" ")
            ids = [tok.encoder[piece] for piece in pieces]
            if len(self.words) >= self.MAX_WORDS:
                self.words.clear()
            self.words[word] = ids
        return ids

    def clean(self, text: str) -> str:
        """open_clip's cleaning; for plain text under the default `lower` rule, without the ftfy call (a third of
        the time per caption) that cannot change it."""
        if self.tokenizer.clean_fn is CLEAN_LOWER and PLAIN_TEXT.fullmatch(text):  # never when CLEAN_LOWER is None
            return " ".join(text.split()).lower()
        return self.tokenizer.clean_fn(text)

    def encode(self, text: str) -> List[int]:
        ids: List[int] = []
        for word in self.tokenizer.pat.findall(self.clean(text)):
            ids += self.word_ids(word)
        return ids

    def __call__(self, texts, context_length: Optional[int] = None) -> torch.Tensor:
        tok = self.tokenizer
        texts = [texts] if isinstance(texts, str) else texts
        length = context_length or tok.context_length
        if not length:
            raise ValueError("a context length is needed to tokenize")
        rows = []
        for text in texts:
            ids = [tok.sot_token_id] + self.encode(text) + [tok.eot_token_id]
            if len(ids) > length:  # truncate, keeping the end-of-text token last (open_clip's rule)
                ids = ids[:length - 1] + [tok.eot_token_id]
            rows.append(ids + [0] * (length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).view(len(rows), length)  # [0, length] for no texts too


def fast_tokenizer(tokenizer: Callable) -> Callable:
    """`tokenizer` wrapped in WordMemoTokenizer when it is open_clip's plain SimpleTokenizer (no reduction
    mask); any other tokenizer (HF, open_clip's reductions) as it is."""
    if type(tokenizer) is SimpleTokenizer and tokenizer.reduction_fn is None:
        return WordMemoTokenizer(tokenizer)
    return tokenizer
