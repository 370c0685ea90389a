"""The trainer's faster paths compute what the plain ones do: packed attention, the two-part train transform,
the tokenizer memo, the fast tar reader in training streams, one-pass gradient norm / clipping, fused AdamW."""
from __future__ import annotations

import copy

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.transforms import functional as TF

from mmcl.data_pipelines.stream import SampleSpec, ShardStream, make_loader
from mmcl.data_pipelines.tokens import CachedTokenizer
from mmcl.data_pipelines.transforms import ClipTrainTransform, clip_transform
from mmcl.config import ModelConfig, OptimConfig
from mmcl.models import factory
from mmcl.models.attention import PackedSelfAttention, use_packed_attention
from mmcl.trainer import step as T
from mmcl.trainer.optim import make_optimizer
from test_stream import write_shards

TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 16, "patch_size": 4, "width": 32, "layers": 2, "head_width": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}}


def tiny_pair():
    torch.manual_seed(0)
    plain, _ = factory.build_model(ModelConfig(config=TINY, packed_attention=False))
    packed = copy.deepcopy(plain)
    assert use_packed_attention(packed) == 4  # two vision and two text blocks
    return plain, packed


def loss_and_grads(model, images, texts):
    model.zero_grad()
    image, text, scale = model(images, texts)[:3]
    loss = (image @ text.T * scale).logsumexp(1).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_attention_gives_the_same_loss_and_gradients_as_open_clips():
    plain, packed = tiny_pair()
    images, texts = torch.randn(6, 3, 16, 16), torch.randint(1, 400, (6, 8))
    loss_a, grads_a = loss_and_grads(plain, images, texts)
    loss_b, grads_b = loss_and_grads(packed, images, texts)
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 20
    for name in grads_a:  # vision (no mask) and text (causal mask) attention alike
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4), name


def test_packed_attention_keeps_names_weights_and_the_inference_path():
    plain, packed = tiny_pair()
    assert plain.state_dict().keys() == packed.state_dict().keys()
    attn = packed.visual.transformer.resblocks[0].attn
    assert isinstance(attn, nn.MultiheadAttention) and type(attn) is PackedSelfAttention
    plain.eval(), packed.eval()
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():  # no-grad calls take PyTorch's own fused kernel
        assert torch.allclose(plain.encode_image(images), packed.encode_image(images), atol=1e-6)


def test_packed_attention_leaves_other_calls_to_multihead_attention():
    torch.manual_seed(1)
    plain = nn.MultiheadAttention(16, 4, batch_first=True)
    packed = copy.deepcopy(plain)
    packed.__class__ = PackedSelfAttention
    x, y = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    mask3d = torch.randn(8, 5, 5)  # one mask per (batch x head): not the packed case
    pad = torch.tensor([[False] * 5, [False] * 4 + [True]])
    for args, kwargs in [((x, y, y), {}), ((x, x, x), {"attn_mask": mask3d, "need_weights": False}),
                         ((x, x, x), {"key_padding_mask": pad}), ((x, x, x), {"need_weights": True})]:
        want, got = plain(*args, **kwargs), packed(*args, **kwargs)
        assert torch.allclose(want[0], got[0], atol=1e-6)
        assert (want[1] is None) == (got[1] is None)


def test_recipe_switch_turns_packed_attention_off():
    model, _ = factory.build_model(ModelConfig(config=TINY, packed_attention=False))
    assert not any(type(m) is PackedSelfAttention for m in model.modules())
    model, _ = factory.build_model(ModelConfig(config=TINY))
    assert sum(type(m) is PackedSelfAttention for m in model.modules()) == 4


@pytest.mark.parametrize("size", [(28, 28), (64, 48), (333, 500), (20, 90)])
def test_train_transform_pixels_equal_open_clips_for_the_same_crop(size):
    width, height = size
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8))
    ours = ClipTrainTransform(32, (0.8, 1.0))
    theirs = open_clip.image_transform(32, is_train=True, aug_cfg={"scale": (0.8, 1.0)})
    crop = theirs.transforms[0]
    torch.manual_seed(0)
    for _ in range(6):
        left, top, w, h = ours.box(width, height)
        want = TF.resized_crop(image, top, left, h, w, crop.size, crop.interpolation, antialias=True)
        for t in theirs.transforms[1:]:
            want = t(want)
        got = ours.finish(ours.crop(image, (left, top, w, h))[None])[0]
        assert torch.equal(got, want)  # bit for bit


def test_train_transform_boxes_follow_the_random_resized_crop_rule():
    ours = ClipTrainTransform(32, (0.5, 1.0))
    torch.manual_seed(0)
    boxes = [ours.box(100, 80) for _ in range(400)]
    for left, top, w, h in boxes:
        assert 0 <= left <= 100 - w and 0 <= top <= 80 - h
        assert 0.5 * 8000 * 0.95 <= w * h <= 8000 * 1.05  # area within the scale (rounding aside)
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    assert len(set(boxes)) > 300  # random, not a fixed crop
    assert ClipTrainTransform(8, (0.99, 1.0)).box(10, 100) == (0, 43, 10, 13)  # centre-crop fallback
    torch.manual_seed(3)
    first = [ours.box(100, 80) for _ in range(5)]
    torch.manual_seed(3)
    assert [ours.box(100, 80) for _ in range(5)] == first  # a function of torch's RNG (exact resume)


def test_train_transform_handles_grey_and_palette_images_as_rgb():
    ours = ClipTrainTransform(16, (1.0, 1.0))
    for mode in ("L", "P", "RGBA"):
        image = Image.new(mode, (20, 20))
        out = ours.finish(ours(image)[None])
        assert out.shape == (1, 3, 16, 16) and out.dtype == torch.float32


def test_cached_tokenizer_gives_the_tokenizers_rows_and_stays_bounded():
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=12)
    cached = CachedTokenizer(tokenizer, size=3)
    captions = ["a photo of a 3", "the digit 7", "a photo of a 3", "seven", "a photo of a 3", "eight", "nine"]
    assert torch.equal(cached(captions), tokenizer(captions))
    assert len(cached.rows) == 3  # least recently used evicted
    assert torch.equal(cached(captions[::-1]), tokenizer(captions[::-1]))  # evicted ones are tokenized again
    assert cached.context_length == 12


def test_training_stream_reads_local_tars_like_webdataset(tmp_path):
    """Local paths go through mmcl's tar reader, URLs through webdataset: the same samples either way."""
    urls = write_shards(tmp_path, 2, 6)
    spec = SampleSpec(image_transform=clip_transform(16, train=False),
                      tokenizer=open_clip.tokenizer.SimpleTokenizer(context_length=16), label=True)

    def batches(shards):
        stream = ShardStream(shards, spec, batch_size=4, repeat=False, rank=0, world=1, shuffle_buffer=0)
        return list(make_loader(stream, 0))

    fast, slow = batches(urls), batches([f"file:{u}" for u in urls])
    assert len(fast) == len(slow) == 3
    for a, b in zip(fast, slow):
        assert a["key"] == b["key"] and a["caption"] == b["caption"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def with_grads(seed=0):
    torch.manual_seed(seed)
    params = [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True)]
    for p in params:
        p.grad = torch.randn_like(p) * 3
    return params


def test_grad_norm_and_clipping_match_torch():
    ours, theirs = with_grads(), with_grads()
    norm = T.grad_norm(ours)
    want = torch.nn.utils.clip_grad_norm_(theirs, 1.5)
    assert torch.allclose(norm, want)
    T.clip_gradients(ours, 1.5, norm)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a.grad, b.grad, atol=1e-7)
    assert torch.allclose(T.grad_norm(ours), torch.tensor(1.5), atol=1e-5)
    small = with_grads()
    before = [p.grad.clone() for p in small]
    T.clip_gradients(small, 1e6, T.grad_norm(small))  # under the limit: untouched
    assert all(torch.equal(p.grad, b) for p, b in zip(small, before))


def test_a_single_non_finite_gradient_fails_the_check():
    params = with_grads()
    assert T.all_finite(torch.tensor(1.0), T.grad_norm(params))
    params[1].grad[3] = float("inf")
    assert not T.all_finite(torch.tensor(1.0), T.grad_norm(params))
    params[1].grad[3] = float("nan")
    assert not T.all_finite(torch.tensor(1.0), T.grad_norm(params))
    assert not T.all_finite(torch.tensor(float("nan")))


def test_fused_adamw_is_the_default_and_steps_like_torchs_loop():
    def step(fused: bool):
        torch.manual_seed(0)
        module = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
        start = module[0].weight.detach().clone()
        optimizer = make_optimizer(module, OptimConfig(lr=1e-2, weight_decay=0.1, fused=fused))
        for _ in range(3):
            module(torch.randn(4, 8)).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        assert not torch.allclose(module[0].weight, start, atol=1e-3)  # it did train
        return optimizer, [p.detach().clone() for p in module.parameters()]

    fused_opt, fused_weights = step(True)
    plain_opt, plain_weights = step(False)
    assert fused_opt.defaults["fused"] is True and not plain_opt.defaults["fused"]
    for a, b in zip(fused_weights, plain_weights):
        assert torch.allclose(a, b, atol=1e-6)


def test_packed_attention_under_bf16_autocast_and_gradient_checkpointing():
    """The GPU recipes run bf16 with checkpointed blocks: the packed path must agree there too."""
    plain, packed = tiny_pair()
    for model in (plain, packed):
        model.set_grad_checkpointing(True)
    images, texts = torch.randn(4, 3, 16, 16), torch.randint(1, 400, (4, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_a, grads_a = loss_and_grads(plain, images, texts)
        loss_b, grads_b = loss_and_grads(packed, images, texts)
    assert torch.allclose(loss_a.float(), loss_b.float(), atol=2e-2)
    for name in grads_a:
        scale = grads_a[name].abs().max().clamp(min=1e-3)
        assert ((grads_a[name] - grads_b[name]).abs().max() / scale) < 0.1, name
