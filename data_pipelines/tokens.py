"""A memo in front of a tokenizer: captions that come back (every epoch, every repeated phrasing) are
tokenized once.

open_clip's tokenizer spends ~100 us per caption in Python (ftfy, regex, BPE), a quarter of the loading work of
a tiny CLIP. A caption's tokens never change, so each DataLoader worker keeps the rows of the captions it has
seen, up to `size` of them (least recently used first out); a web-scale stream that never repeats a caption
pays one dictionary lookup per caption.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, List

import torch


class CachedTokenizer:
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

    def __getattr__(self, name: str):  # context_length, vocab_size, ... of the wrapped tokenizer
        if name == "tokenizer":
            raise AttributeError(name)
        return getattr(self.tokenizer, name)
