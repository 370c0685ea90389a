"""Text features without the padding (mmcl/models/text.py): the same features as open_clip's full-length pass."""
from __future__ import annotations

import open_clip
import pytest
import torch

from mmcl.models.text import causal, needed_length, text_encoder, trimmable

CAPTIONS = ["a photo of a cat.", "two dogs run through the snow beside a red fence while a man in a blue coat watches",
            "x", "a child in a pink dress is climbing up a set of stairs in an entry way ."]


def tiny_clip(context: int = 77, **text) -> open_clip.CLIP:
    torch.manual_seed(0)
    text_cfg = {"context_length": context, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2, **text}
    vision_cfg = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "head_width": 32}
    return open_clip.CLIP(embed_dim=32, vision_cfg=vision_cfg, text_cfg=text_cfg).eval()


def tokens(context: int = 77, captions=CAPTIONS) -> torch.Tensor:
    return open_clip.tokenizer.SimpleTokenizer(context_length=context)(captions)


def test_cut_after_the_last_end_of_text_token():
    model, batch = tiny_clip(), tokens()
    ends = (batch == 49407).int().argmax(dim=-1)
    assert needed_length(model, batch) == int(ends.max()) + 1 < 77
    assert needed_length(model, batch[:1]) == 8  # <start> a photo of a cat . <end>: positions 0..7


@pytest.mark.parametrize("normalize", [True, False])
def test_features_equal_the_full_length_pass(normalize):
    model, batch = tiny_clip(), tokens()
    with torch.no_grad():
        full = model.encode_text(batch, normalize=normalize)
        cut = text_encoder(model)(batch, normalize=normalize)
    assert cut.shape == full.shape
    torch.testing.assert_close(cut, full, rtol=1e-5, atol=1e-6)  # the products change shape: rounding only


def test_features_equal_under_bf16_autocast():
    model, batch = tiny_clip(), tokens()
    with torch.no_grad(), torch.autocast("cpu"):
        full = model.encode_text(batch, normalize=True).float()
        cut = text_encoder(model)(batch, normalize=True).float()
    torch.testing.assert_close(cut, full, rtol=0, atol=2e-2)  # bf16 keeps 8 bits: both round alike, not equal


def test_eos_pooling_and_a_full_caption():
    model = tiny_clip(context=16)
    model.text_pool_type, model.text_eos_id = "eos", 49407
    long = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"
    batch = tokens(16, CAPTIONS[:1] + [long])
    assert needed_length(model, batch) == 16  # the long caption is cut by the tokenizer: its end is the last slot
    short = batch[:1]
    assert needed_length(model, short) == 8
    with torch.no_grad():
        torch.testing.assert_close(text_encoder(model)(short), model.encode_text(short), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(text_encoder(model)(batch), model.encode_text(batch), rtol=0, atol=0)


def test_towers_where_the_padding_matters_run_unchanged():
    last = tiny_clip()
    last.text_pool_type = "last"  # reads the final position: every position counts
    bidirectional = tiny_clip(no_causal_mask=True)  # pad tokens are seen by every position
    for model in (last, bidirectional):
        assert not trimmable(model)
        assert text_encoder(model) == model.encode_text
    assert trimmable(tiny_clip())
    assert not trimmable(torch.nn.Linear(2, 2))


def test_causal_mask_check():
    mask = torch.full((4, 4), float("-inf")).triu(1)
    assert causal(mask)
    assert not causal(torch.zeros(4, 4))
    assert not causal(torch.full((4, 4), float("-inf")).triu(2))
    assert not causal(None)
