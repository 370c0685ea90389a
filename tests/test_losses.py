"""Single-process tests of mmcl.losses: parity with open_clip and lightly, chunked == dense, MoCo queue."""

import math

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss as LightlyNTXentLoss
from open_clip.loss import ClipLoss as OpenClipLoss
from open_clip.loss import SigLipLoss as OpenClipSigLipLoss

from mmcl.distributed import all_gather_no_grad, all_gather_with_grad, all_reduce_mean_, get_rank, get_world_size
from mmcl.losses import (INIT_LOGIT_SCALE, SIGLIP_INIT_LOGIT_BIAS, SIGLIP_INIT_LOGIT_SCALE, ClipLoss,
                         MoCoLoss, MoCoV3Loss, NTXentLoss, SigLipLoss, alignment, clamp_logit_scale,
                         info_nce, init_logit_scale, uniformity)

TOL = dict(atol=1e-5, rtol=1e-5)


def leaves(*shapes, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator, dtype=dtype).requires_grad_() for shape in shapes]


def loss_and_grads(loss_fn, inputs):
    """Loss value and the gradient of every input (inputs are leaves; grads are reset first)."""
    for tensor in inputs:
        tensor.grad = None
    loss = loss_fn(*inputs)
    loss.backward()
    return [loss.detach()] + [tensor.grad.clone() for tensor in inputs]


def assert_all_close(actual, expected, **tolerance):
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, **(tolerance or TOL))


def clip_call(loss):
    """Normalise outside the loss so the gradient reaches the raw leaves for both implementations."""
    return lambda image, text, t: loss(F.normalize(image, dim=-1), F.normalize(text, dim=-1), t.exp())


def clip_inputs(batch, dim=32, seed=0):
    image, text = leaves((batch, dim), (batch, dim), seed=seed)
    return [image, text, torch.tensor(INIT_LOGIT_SCALE, requires_grad=True)]


# ---- CLIP ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 8, 64])
@pytest.mark.parametrize("chunk_size", [None, 3, 16])
def test_clip_matches_open_clip(batch, chunk_size):
    inputs = clip_inputs(batch)
    expected = loss_and_grads(clip_call(OpenClipLoss()), inputs)
    actual = loss_and_grads(clip_call(ClipLoss(chunk_size=chunk_size)), inputs)
    assert_all_close(actual, expected)


@pytest.mark.parametrize("batch,chunk_size", [(1, 1), (7, 2), (33, 8), (64, 64), (50, 128), (129, 32)])
def test_clip_chunked_equals_dense(batch, chunk_size):
    inputs = clip_inputs(batch, seed=batch)
    dense = loss_and_grads(clip_call(ClipLoss()), inputs)
    chunked = loss_and_grads(clip_call(ClipLoss(chunk_size=chunk_size)), inputs)
    assert_all_close(chunked, dense)


def test_clip_chunked_float64_is_exact():
    image, text = leaves((40, 16), (40, 16), seed=3, dtype=torch.float64)
    inputs = [image, text, torch.tensor(2.5, dtype=torch.float64, requires_grad=True)]
    dense = loss_and_grads(clip_call(ClipLoss()), inputs)
    chunked = loss_and_grads(clip_call(ClipLoss(chunk_size=7)), inputs)
    assert_all_close(chunked, dense, atol=1e-12, rtol=1e-12)


def test_clip_chunked_bfloat16_close_to_float32():
    image, text, t = clip_inputs(48)
    reference = ClipLoss()(image, text, t.exp())
    low = ClipLoss(chunk_size=16)(image.bfloat16(), text.bfloat16(), t.exp())
    assert low.dtype == torch.bfloat16
    assert abs(low.float().item() - reference.item()) < 0.05


def test_clip_normalises_its_inputs():
    image, text, t = clip_inputs(16)
    scaled = ClipLoss()(3.0 * image, 0.5 * text, t.exp())
    torch.testing.assert_close(scaled, ClipLoss()(image, text, t.exp()), **TOL)


def test_clip_perfect_alignment_loss_is_small():
    features = F.normalize(torch.eye(8), dim=-1)
    loss = ClipLoss()(features, features, torch.tensor(100.0))
    assert loss.item() < 1e-6


def test_clip_output_dict():
    image, text, t = clip_inputs(4)
    assert set(ClipLoss()(image, text, t.exp(), output_dict=True)) == {"contrastive_loss"}


def test_logit_scale_init_and_clamp():
    assert INIT_LOGIT_SCALE == pytest.approx(math.log(1 / 0.07))
    assert init_logit_scale() == pytest.approx(2.659260036932778)
    param = torch.nn.Parameter(torch.tensor(7.0))
    clamp_logit_scale(param)
    assert param.exp().item() == pytest.approx(100.0)
    clamp_logit_scale(param, max_scale=50.0)
    assert param.exp().item() == pytest.approx(50.0)
    below = torch.nn.Parameter(torch.tensor(3.0))
    clamp_logit_scale(below)
    assert below.item() == 3.0


# ---- InfoNCE core: chunked == dense for every target kind ---------------------------------------------

def random_pos_mask(rows, cols):
    """About 30% positives per row, and at least the diagonal one."""
    mask = torch.rand(rows, cols, generator=torch.Generator().manual_seed(1)) < 0.3
    return mask | torch.eye(rows, cols, dtype=torch.bool)


CORE_CASES = {
    "labels_offset": lambda q, k: dict(labels=torch.arange(5, 5 + q.shape[0])),
    "exclude": lambda q, k: dict(labels=(torch.arange(q.shape[0]) + 1) % k.shape[0],
                                 exclude=torch.arange(q.shape[0])),
    "pos_mask": lambda q, k: dict(pos_mask=random_pos_mask(q.shape[0], k.shape[0])),
    "pos_keys": lambda q, k: dict(pos_keys=leaves(q.shape, seed=2)[0]),
}


@pytest.mark.parametrize("case", sorted(CORE_CASES))
@pytest.mark.parametrize("rows,chunk_size", [(13, 4), (20, 1), (20, 64)])
def test_core_chunked_equals_dense(case, rows, chunk_size):
    query, keys = leaves((rows, 8), (rows + 9, 8), seed=rows)
    scale = torch.tensor(4.0, requires_grad=True)
    options = CORE_CASES[case](query, keys)
    extra = [options["pos_keys"]] if "pos_keys" in options else []

    def call(chunk):
        return lambda q, k, s, *rest: info_nce(q, k, s, chunk_size=chunk, **options)

    dense = loss_and_grads(call(None), [query, keys, scale] + extra)
    chunked = loss_and_grads(call(chunk_size), [query, keys, scale] + extra)
    assert_all_close(chunked, dense)


@pytest.mark.parametrize("case", ["symmetric", "pos_keys"])
def test_chunked_backward_scales_with_upstream_gradient(case):
    query, keys, positives = leaves((10, 6), (10, 6), (10, 6), seed=4)
    scale = torch.tensor(3.0, requires_grad=True)
    options = {"symmetric": dict(symmetric=True), "pos_keys": dict(pos_keys=positives)}[case]

    def weighted(chunk):  # a negative upstream gradient, as from a loss weight in a sum of objectives
        return lambda q, k, s, p: -2.5 * info_nce(q, k, s, chunk_size=chunk, **options)

    inputs = [query, keys, scale, positives]
    dense = loss_and_grads(lambda *x: weighted(None)(*x) + 0 * positives.sum(), inputs)
    chunked = loss_and_grads(lambda *x: weighted(4)(*x) + 0 * positives.sum(), inputs)
    assert_all_close(chunked, dense)


def test_core_pos_keys_matches_explicit_cross_entropy():
    query, positive, negatives = (F.normalize(x, dim=-1) for x in leaves((6, 8), (6, 8), (11, 8)))
    logits = torch.cat([(query * positive).sum(1, keepdim=True), query @ negatives.T], dim=1) / 0.2
    expected = F.cross_entropy(logits, torch.zeros(6, dtype=torch.long))
    torch.testing.assert_close(info_nce(query, negatives, 5.0, pos_keys=positive), expected, **TOL)


def test_core_rejects_conflicting_targets():
    query, keys = leaves((4, 3), (4, 3))
    with pytest.raises(ValueError, match="at most one"):
        info_nce(query, keys, 1.0, torch.arange(4), pos_keys=keys)
    with pytest.raises(ValueError, match="square"):
        info_nce(query, keys[:3], 1.0, symmetric=True)
    with pytest.raises(ValueError, match="chunk_size"):
        info_nce(query, keys, 1.0, chunk_size=0)


def test_chunked_scale_as_float_and_frozen_keys():
    query, keys = leaves((9, 4), (12, 4))
    frozen = keys.detach()
    dense = info_nce(query, frozen, 3.0, torch.arange(9))
    chunked = info_nce(query, frozen, 3.0, torch.arange(9), chunk_size=4)
    torch.testing.assert_close(chunked, dense, **TOL)
    chunked.backward()
    assert query.grad is not None and keys.grad is None


# ---- SigLIP ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 9, 32])
def test_siglip_matches_open_clip(batch):
    image, text = leaves((batch, 16), (batch, 16), seed=batch)
    t = torch.tensor(SIGLIP_INIT_LOGIT_SCALE, requires_grad=True)
    bias = torch.tensor(SIGLIP_INIT_LOGIT_BIAS, requires_grad=True)

    def call(loss):
        return lambda i, x, s, b: loss(F.normalize(i, dim=-1), F.normalize(x, dim=-1), s.exp(), b)

    expected = loss_and_grads(call(OpenClipSigLipLoss()), [image, text, t, bias])
    actual = loss_and_grads(call(SigLipLoss()), [image, text, t, bias])
    assert_all_close(actual, expected)


def test_siglip_init_values_and_bad_impl():
    assert math.exp(SIGLIP_INIT_LOGIT_SCALE) == pytest.approx(10.0)
    assert SIGLIP_INIT_LOGIT_BIAS == -10.0
    with pytest.raises(ValueError, match="dist_impl"):
        SigLipLoss(dist_impl="bidir")


# ---- NT-Xent ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch,temperature", [(2, 0.5), (16, 0.1), (33, 1.0)])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_ntxent_matches_lightly(batch, temperature, chunk_size):
    inputs = leaves((batch, 24), (batch, 24), seed=batch)
    expected = loss_and_grads(LightlyNTXentLoss(temperature=temperature), inputs)
    actual = loss_and_grads(NTXentLoss(temperature=temperature, chunk_size=chunk_size), inputs)
    assert_all_close(actual, expected)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_ntxent_memory_bank_matches_lightly_over_steps(chunk_size):
    reference = LightlyNTXentLoss(temperature=0.2, memory_bank_size=(12, 8))
    ours = NTXentLoss(temperature=0.2, memory_bank_size=(12, 8), chunk_size=chunk_size)
    ours.queue.copy_(reference.memory_bank.bank)
    for step in range(5):  # 5 steps of 4 rows through a bank of 12: wraps around once
        inputs = leaves((4, 8), (4, 8), seed=step)
        assert_all_close(loss_and_grads(ours, inputs), loss_and_grads(reference, inputs))
        torch.testing.assert_close(ours.queue, reference.memory_bank.bank, **TOL)
    assert int(ours.queue_ptr) == int(reference.memory_bank.bank_ptr)


def test_ntxent_bank_is_kept_without_grad_and_in_state_dict():
    loss = NTXentLoss(memory_bank_size=(8, 4))
    before = loss.queue.clone()
    with torch.no_grad():
        loss(torch.randn(4, 4), torch.randn(4, 4))
    torch.testing.assert_close(loss.queue, before)
    assert {"queue", "queue_ptr"} <= set(loss.state_dict())


def test_ntxent_rejects_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(temperature=0.0)
    with pytest.raises(ValueError, match="dimension"):
        NTXentLoss(memory_bank_size=128)


# ---- MoCo ------------------------------------------------------------------------------------------------

def moco_reference(query, key, queue, temperature):
    query, key = F.normalize(query, dim=-1), F.normalize(key, dim=-1)
    positive = (query * key).sum(1, keepdim=True)
    logits = torch.cat([positive, query @ queue.T], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(query.shape[0], dtype=torch.long))


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_moco_loss_value_and_grads(chunk_size):
    loss = MoCoLoss(temperature=0.2, queue_size=16, dim=8, chunk_size=chunk_size)
    queue = loss.queue.clone()
    inputs = leaves((6, 8), (6, 8))
    expected = loss_and_grads(lambda q, k: moco_reference(q, k, queue, 0.2), inputs)
    assert_all_close(loss_and_grads(loss, inputs), expected)


def test_moco_queue_order_and_wrap_around():
    loss = MoCoLoss(queue_size=10, dim=4)
    keys = [F.normalize(torch.randn(4, 4), dim=-1) for _ in range(3)]
    initial = loss.queue.clone()
    loss(torch.randn(4, 4), keys[0])
    torch.testing.assert_close(loss.queue[:4], keys[0])
    torch.testing.assert_close(loss.queue[4:], initial[4:])
    loss(torch.randn(4, 4), keys[1])
    assert int(loss.queue_ptr) == 8
    loss(torch.randn(4, 4), keys[2])  # rows 8, 9 then wraps to 0, 1
    torch.testing.assert_close(loss.queue[8:10], keys[2][:2])
    torch.testing.assert_close(loss.queue[0:2], keys[2][2:])
    torch.testing.assert_close(loss.queue[2:4], keys[0][2:])
    torch.testing.assert_close(loss.queue[4:8], keys[1])
    assert int(loss.queue_ptr) == 2


def test_moco_batch_larger_than_queue_keeps_newest():
    loss = MoCoLoss(queue_size=3, dim=4)
    keys = F.normalize(torch.randn(5, 4), dim=-1)
    loss(torch.randn(5, 4), keys)
    # Keys 0..4 go to rows 0,1,2,0,1: rows hold keys 3, 4, 2 and the pointer is at 5 % 3 = 2.
    torch.testing.assert_close(loss.queue, keys[[3, 4, 2]])
    assert int(loss.queue_ptr) == 2


def test_moco_eval_mode_does_not_enqueue():
    loss = MoCoLoss(queue_size=8, dim=4).eval()
    before = loss.queue.clone()
    loss(torch.randn(2, 4), torch.randn(2, 4))
    torch.testing.assert_close(loss.queue, before)
    loss(torch.randn(2, 4), torch.randn(2, 4), update=True)
    assert int(loss.queue_ptr) == 2


def test_moco_queue_survives_save_and_load(tmp_path):
    loss = MoCoLoss(queue_size=12, dim=4)
    for _ in range(4):
        loss(torch.randn(5, 4), torch.randn(5, 4))
    torch.save(loss.state_dict(), tmp_path / "moco.pt")
    restored = MoCoLoss(queue_size=12, dim=4)
    restored.load_state_dict(torch.load(tmp_path / "moco.pt"))
    torch.testing.assert_close(restored.queue, loss.queue)
    assert int(restored.queue_ptr) == 20 % 12
    query, key = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(restored(query, key), loss(query, key))


def test_moco_rejects_wrong_dimension():
    with pytest.raises(ValueError, match="queue"):
        MoCoLoss(queue_size=4, dim=8)(torch.randn(2, 4), torch.randn(2, 4))


def test_moco_v3_matches_formula():
    q1, q2, k1, k2 = leaves((6, 8), (6, 8), (6, 8), (6, 8))

    def contrast(q, k):
        logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).T / 0.2
        return F.cross_entropy(logits, torch.arange(6)) * 2 * 0.2

    expected = loss_and_grads(lambda a, b, c, d: contrast(a, d) + contrast(b, c), [q1, q2, k1, k2])
    assert_all_close(loss_and_grads(MoCoV3Loss(temperature=0.2), [q1, q2, k1, k2]), expected)


# ---- Geometry and single-process distributed helpers ---------------------------------------------------

def test_alignment_and_uniformity():
    x = F.normalize(torch.randn(20, 6), dim=-1)
    assert alignment(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert alignment(x, -x).item() == pytest.approx(4.0, abs=1e-5)
    pairs = torch.cdist(x, x).pow(2)[torch.triu_indices(20, 20, offset=1).unbind()]
    assert uniformity(5 * x).item() == pytest.approx(pairs.mul(-2).exp().mean().log().item(), abs=1e-5)
    opposite = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert uniformity(opposite).item() == pytest.approx(-8.0, abs=1e-5)  # log exp(-2 * 4)


def test_distributed_helpers_without_process_group():
    x = torch.randn(3, 2, requires_grad=True)
    assert get_rank() == 0 and get_world_size() == 1
    assert all_gather_with_grad(x) is x
    assert not all_gather_no_grad(x).requires_grad
    grads = [torch.ones(2)]
    all_reduce_mean_(grads)
    torch.testing.assert_close(grads[0], torch.ones(2))
