"""Label-aware, hard-negative, mixing and margin losses: parity with references, chunked == dense.

References on the same inputs, values and gradients to 1e-5: lightly's DCLLoss (decoupled) and NTXentLoss
(SupCon with all-distinct labels), torch.nn.TripletMarginLoss on independently mined triplets, and per-row
formulas written out here for SupCon, HCL / DCL (the authors' released code), VSE++ (the paper's definition),
the pairwise margin loss and i-Mix's soft targets.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import DCLLoss as LightlyDCLLoss
from lightly.loss import NTXentLoss as LightlyNTXentLoss

from mmcl.losses import (ClipLoss, MoCoLoss, NegativeWeighting, NTXentLoss, PairwiseMarginLoss, SupConLoss,
                         TripletLoss, VSELoss, info_nce, inverse_permutation, mochi_negatives)

TOL = dict(atol=1e-5, rtol=1e-5)


def leaves(*shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator).requires_grad_() for shape in shapes]


def loss_and_grads(loss_fn, inputs):
    for tensor in inputs:
        tensor.grad = None
    loss = loss_fn(*inputs)
    loss.backward()
    return [loss.detach()] + [t.grad.clone() if t.grad is not None else torch.zeros_like(t) for t in inputs]


def assert_all_close(actual, expected, **tolerance):
    assert torch.isfinite(expected[0])
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, **(tolerance or TOL))


def same_class_labels(rows, classes=3, seed=0):
    return torch.randint(classes, (rows,), generator=torch.Generator().manual_seed(seed))


# ---- SupCon --------------------------------------------------------------------------------------------------

def supcon_reference(out0, out1, labels, temperature):
    """Khosla et al.'s L_out, anchor by anchor."""
    z = F.normalize(torch.cat([out0, out1]), dim=-1)
    y = torch.cat([labels, labels])
    terms = []
    for i in range(len(z)):
        others = [a for a in range(len(z)) if a != i]
        log_denominator = torch.logsumexp(torch.stack([z[i] @ z[a] / temperature for a in others]), 0)
        positives = [p for p in others if y[p] == y[i]]
        terms.append(-sum(z[i] @ z[p] / temperature - log_denominator for p in positives) / len(positives))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_supcon_matches_per_row_reference(chunk_size):
    inputs = leaves((12, 8), (12, 8), seed=1)
    labels = same_class_labels(12)
    expected = loss_and_grads(lambda a, b: supcon_reference(a, b, labels, 0.3), inputs)
    actual = loss_and_grads(lambda a, b: SupConLoss(0.3, chunk_size=chunk_size)(a, b, labels), inputs)
    assert_all_close(actual, expected)


@pytest.mark.parametrize("batch,temperature", [(2, 0.5), (16, 0.1)])
def test_supcon_with_distinct_labels_is_lightly_ntxent(batch, temperature):
    inputs = leaves((batch, 16), (batch, 16), seed=batch)
    expected = loss_and_grads(LightlyNTXentLoss(temperature=temperature), inputs)
    actual = loss_and_grads(lambda a, b: SupConLoss(temperature)(a, b, torch.arange(batch)), inputs)
    assert_all_close(actual, expected)


def test_supcon_rejects_labels_of_the_wrong_shape():
    out0, out1 = leaves((4, 3), (4, 3))
    with pytest.raises(ValueError, match="labels must be"):
        SupConLoss()(out0, out1, torch.zeros(3, dtype=torch.long))


# ---- HCL / DCL / decoupled --------------------------------------------------------------------------------

def hcl_reference(out0, out1, temperature, beta, tau_plus):
    """Robinson et al.'s released HCL loss (the DCL of Chuang et al. at beta = 0), with normalised features."""
    out = F.normalize(torch.cat([out0, out1]), dim=-1)
    rows = out0.shape[0]
    neg = torch.exp(out @ out.T / temperature)
    mask = ~torch.eye(2 * rows, dtype=torch.bool)
    for i in range(rows):
        mask[i, i + rows] = mask[i + rows, i] = False
    neg = neg.masked_select(mask).view(2 * rows, -1)
    pos = torch.exp((out[:rows] * out[rows:]).sum(-1) / temperature)
    pos = torch.cat([pos, pos])
    count = 2 * rows - 2
    imp = (beta * neg.log()).exp()
    reweight_neg = (imp * neg).sum(-1) / imp.mean(-1)
    ng = (-tau_plus * count * pos + reweight_neg) / (1 - tau_plus)
    ng = torch.clamp(ng, min=count * math.e ** (-1 / temperature))
    return (-torch.log(pos / (pos + ng))).mean()


@pytest.mark.parametrize("beta,tau_plus", [(0.0, 0.0), (0.0, 0.1), (1.0, 0.0), (0.5, 0.1), (1.0, 0.6)])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_ntxent_hard_negatives_match_the_authors_code(beta, tau_plus, chunk_size):
    inputs = leaves((9, 8), (9, 8), seed=2)
    expected = loss_and_grads(lambda a, b: hcl_reference(a, b, 0.5, beta, tau_plus), inputs)
    loss = NTXentLoss(0.5, chunk_size=chunk_size, weighting=NegativeWeighting(beta, tau_plus))
    assert_all_close(loss_and_grads(loss, inputs), expected)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_the_weighted_path_with_zero_weights_is_plain_infonce(chunk_size):
    """beta = 0, tau_plus = 0: the weighted path (forced here by zero extra negatives) gives plain InfoNCE."""
    query, keys = leaves((9, 8), (12, 8), seed=3)
    options = dict(labels=(torch.arange(9) + 2) % 12, exclude=torch.arange(9), chunk_size=chunk_size)
    plain = loss_and_grads(lambda q, k: info_nce(q, k, 3.0, **options), [query, keys])
    weighted = loss_and_grads(lambda q, k: info_nce(q, k, 3.0, row_negatives=torch.zeros(9, 0, 8),
                                                    weighting=NegativeWeighting(0.0, 0.0), **options), [query, keys])
    assert_all_close(weighted, plain)


@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("batch,temperature", [(3, 0.5), (16, 0.1)])
def test_decoupled_ntxent_is_lightly_dcl(batch, temperature, chunk_size):
    inputs = leaves((batch, 16), (batch, 16), seed=batch)
    expected = loss_and_grads(LightlyDCLLoss(temperature=temperature), inputs)
    ours = NTXentLoss(temperature, chunk_size=chunk_size, weighting=NegativeWeighting(decoupled=True))
    assert_all_close(loss_and_grads(ours, inputs), expected)


def moco_weighted_reference(query, key, queue, temperature, w, extra=None):
    """The per-row formula for MoCo: positive key apart, the queue (and per-row extra negatives) negatives."""
    q, k = F.normalize(query, dim=-1), F.normalize(key, dim=-1)
    terms = []
    for i in range(len(q)):
        negs = queue if extra is None else torch.cat([queue, extra[i]])
        pos, neg = q[i] @ k[i] / temperature, negs @ q[i] / temperature
        weights = torch.exp(w.beta * neg) / torch.exp(w.beta * neg).mean()
        ng = ((weights * neg.exp()).sum() - w.tau_plus * len(negs) * pos.exp()) / (1 - w.tau_plus)
        ng = torch.clamp(ng, min=len(negs) * math.exp(-1 / temperature))
        terms.append(ng.log() - pos if w.decoupled else torch.log(pos.exp() + ng) - pos)
    return torch.stack(terms).mean()


@pytest.mark.parametrize("w", [NegativeWeighting(1.0, 0.1), NegativeWeighting(0.5, 0.2, True)])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_moco_hard_negatives_and_mochi_match_the_formula(w, chunk_size):
    query, key = leaves((5, 6), (5, 6), seed=4)
    queue = F.normalize(torch.randn(11, 6, generator=torch.Generator().manual_seed(5)), dim=-1)
    loss = MoCoLoss(0.5, 11, 6, chunk_size=chunk_size, weighting=w, mochi=(4, 3, 2))
    loss.queue.copy_(queue)
    torch.manual_seed(9)
    actual = loss_and_grads(lambda q, k: loss(q, k, update=False), [query, key])
    torch.manual_seed(9)  # the same synthetic negatives, drawn again
    extra = mochi_negatives(F.normalize(query, dim=-1), queue, 4, 3, 2)
    expected = loss_and_grads(lambda q, k: moco_weighted_reference(q, k, queue, 0.5, w, extra), [query, key])
    assert_all_close(actual, expected)


# ---- the core: chunked == dense for the new options ---------------------------------------------------------

WEIGHTINGS = [NegativeWeighting(1.0), NegativeWeighting(0.5, 0.1), NegativeWeighting(decoupled=True),
              NegativeWeighting(2.0, 0.3, True)]
CORE_CASES = {
    "labels_exclude": lambda n, m: dict(labels=(torch.arange(n) + 1) % m, exclude=torch.arange(n)),
    "symmetric": lambda n, m: dict(symmetric=True),
    "pos_keys": lambda n, m: dict(pos_keys=leaves((n, 8), seed=7)[0]),
    "row_negatives": lambda n, m: dict(labels=torch.arange(n), row_negatives=torch.randn(n, 4, 8)),
}


@pytest.mark.parametrize("case", sorted(CORE_CASES))
@pytest.mark.parametrize("w", WEIGHTINGS)
@pytest.mark.parametrize("rows,chunk_size", [(13, 4), (13, 1)])
def test_weighted_core_chunked_equals_dense(case, w, rows, chunk_size):
    torch.manual_seed(rows)
    cols = rows if case == "symmetric" else rows + 5
    query, keys = (F.normalize(x, dim=-1).detach().requires_grad_() for x in leaves((rows, 8), (cols, 8), seed=rows))
    scale = torch.tensor(4.0, requires_grad=True)
    options = CORE_CASES[case](rows, cols)
    extra = [options["pos_keys"]] if "pos_keys" in options else []

    def call(chunk):
        return lambda q, k, s, *rest: -1.5 * info_nce(q, k, s, chunk_size=chunk, weighting=w, **options)

    assert_all_close(loss_and_grads(call(chunk_size), [query, keys, scale] + extra),
                     loss_and_grads(call(None), [query, keys, scale] + extra))


def soft_target_reference(logits, targets):
    return (-(targets * logits.log_softmax(1)).sum(1)).mean()


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_mixed_labels_are_soft_targets(chunk_size):
    query, keys = leaves((10, 6), (14, 6), seed=8)
    scale = torch.tensor(2.0, requires_grad=True)
    labels, mixed = torch.arange(10), torch.randperm(14, generator=torch.Generator().manual_seed(1))[:10]
    lam = torch.rand(10, generator=torch.Generator().manual_seed(2))
    targets = lam[:, None] * F.one_hot(labels, 14) + (1 - lam)[:, None] * F.one_hot(mixed, 14)
    expected = loss_and_grads(lambda q, k, s: soft_target_reference(s * q @ k.T, targets), [query, keys, scale])
    actual = loss_and_grads(lambda q, k, s: info_nce(q, k, s, labels, mix_labels=mixed, mix_weight=lam,
                                                     chunk_size=chunk_size), [query, keys, scale])
    assert_all_close(actual, expected)


@pytest.mark.parametrize("kind", ["mix", "pos_mask"])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_symmetric_mixed_labels_and_label_masks(kind, chunk_size):
    """Both directions of a square matrix with soft targets: rows by T, columns by T's columns."""
    query, keys = leaves((10, 6), (10, 6), seed=9)
    scale = torch.tensor(2.0, requires_grad=True)
    if kind == "mix":
        perm = torch.randperm(10, generator=torch.Generator().manual_seed(3))
        options, targets = dict(mix_labels=perm, mix_weight=0.3), 0.3 * torch.eye(10) + 0.7 * F.one_hot(perm, 10)
        col_targets = targets
    else:
        mask = same_class_labels(10)[:, None] == same_class_labels(10)[None, :]
        options, targets = dict(pos_mask=mask), mask / mask.sum(1, keepdim=True)
        col_targets = mask / mask.sum(0, keepdim=True)

    def reference(q, k, s):
        logits = s * q @ k.T
        return 0.5 * (soft_target_reference(logits, targets) + soft_target_reference(logits.T, col_targets.T))

    expected = loss_and_grads(reference, [query, keys, scale])
    actual = loss_and_grads(lambda q, k, s: info_nce(q, k, s, symmetric=True, chunk_size=chunk_size, **options),
                            [query, keys, scale])
    assert_all_close(actual, expected)


def test_core_refuses_combinations_it_cannot_do():
    query, keys = leaves((4, 3), (4, 3))
    with pytest.raises(ValueError, match="one positive per row"):
        info_nce(query, keys, 1.0, pos_mask=torch.eye(4, dtype=torch.bool), weighting=NegativeWeighting(1.0))
    with pytest.raises(ValueError, match="permutation"):
        info_nce(query, keys, 1.0, mix_labels=torch.zeros(4, dtype=torch.long), mix_weight=0.5, symmetric=True)
    with pytest.raises(ValueError, match="tau_plus"):
        NegativeWeighting(tau_plus=1.0)


# ---- i-Mix through the losses ---------------------------------------------------------------------------------

def test_ntxent_imix_is_the_soft_target_cross_entropy():
    out0, out1 = leaves((6, 5), (6, 5), seed=10)
    partner, lam = torch.tensor([2, 0, 1, 3, 5, 4]), torch.full((6,), 0.7)
    inverse = inverse_permutation(partner)
    assert torch.equal(partner[inverse], torch.arange(6))

    def reference(a, b):
        z = F.normalize(torch.cat([a, b]), dim=-1)
        logits = (z @ z.T / 0.5).fill_diagonal_(float("-inf"))
        targets = torch.zeros(12, 12)
        for i in range(6):
            targets[i, 6 + i] += 0.7
            targets[i, 6 + partner[i]] += 0.3
            targets[6 + i, i] += 0.7
            targets[6 + i, inverse[i]] += 0.3
        return (-(targets * logits.log_softmax(1).masked_fill(targets == 0, 0)).sum(1)).mean()

    expected = loss_and_grads(reference, [out0, out1])
    assert_all_close(loss_and_grads(lambda a, b: NTXentLoss(0.5, chunk_size=4)(a, b, mix=(partner, lam)),
                                    [out0, out1]), expected)


def test_clip_imix_local_and_global_agree_and_match_soft_targets():
    image, text = leaves((6, 5), (6, 5), seed=11)
    t = torch.tensor(1.5, requires_grad=True)
    partner, lam = torch.tensor([1, 0, 3, 2, 5, 4]), torch.full((6,), 0.6)
    targets = 0.6 * torch.eye(6) + 0.4 * F.one_hot(partner, 6)

    def reference(i, x, s):
        logits = s.exp() * F.normalize(i, dim=-1) @ F.normalize(x, dim=-1).T
        return 0.5 * (soft_target_reference(logits, targets) + soft_target_reference(logits.T, targets.T))

    expected = loss_and_grads(reference, [image, text, t])
    assert_all_close(loss_and_grads(lambda i, x, s: ClipLoss()(i, x, s.exp(), mix=(partner, lam)),
                                    [image, text, t]), expected)


def test_clip_label_positives_match_supcon_rows_and_reduce_to_clip():
    image, text = leaves((8, 5), (8, 5), seed=12)
    t = torch.tensor(1.0, requires_grad=True)
    classes = same_class_labels(8)
    mask = (classes[:, None] == classes[None, :]).float()

    def reference(i, x, s):
        logits = s.exp() * F.normalize(i, dim=-1) @ F.normalize(x, dim=-1).T
        rows = -(mask * logits.log_softmax(1)).sum(1) / mask.sum(1)
        cols = -(mask * logits.log_softmax(0)).sum(0) / mask.sum(0)
        return 0.5 * (rows.mean() + cols.mean())

    for chunk_size in (None, 3):
        actual = loss_and_grads(lambda i, x, s: ClipLoss(chunk_size=chunk_size)(i, x, s.exp(), classes=classes),
                                [image, text, t])
        assert_all_close(actual, loss_and_grads(reference, [image, text, t]))
    distinct = loss_and_grads(lambda i, x, s: ClipLoss()(i, x, s.exp(), classes=torch.arange(8)), [image, text, t])
    assert_all_close(distinct, loss_and_grads(lambda i, x, s: ClipLoss()(i, x, s.exp()), [image, text, t]))


# ---- MoCHi ----------------------------------------------------------------------------------------------------

def test_mochi_mixes_the_hardest_queue_entries():
    query = F.normalize(torch.randn(4, 6), dim=-1)
    queue = F.normalize(torch.randn(20, 6), dim=-1)
    hardest = queue[(query @ queue.T).argmax(1)]
    out = mochi_negatives(query, queue, top_k=1, s=3, s_prime=2)
    assert out.shape == (4, 5, 6) and not out.requires_grad
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(4, 5), **TOL)
    torch.testing.assert_close(out[:, :3], hardest[:, None].expand(-1, 3, -1), **TOL)  # a mix of one with itself
    closer = (out[:, 3:] * query[:, None]).sum(-1)  # the query mixed in: at least as close as the hardest
    assert (closer >= (hardest * query).sum(-1)[:, None] - 1e-6).all()
    assert mochi_negatives(query, queue, 4, 0, 0) is None


# ---- margins and rankings ----------------------------------------------------------------------------------------

def mined_triplets(out0, out1, mining, labels=None):
    """Anchors, positives and negatives picked one by one from the distances of the unit vectors (with labels:
    negatives of another class only; an anchor with none sits out)."""
    z = F.normalize(torch.cat([out0, out1]), dim=-1).detach()
    n = out0.shape[0]
    cls = None if labels is None else torch.cat([labels, labels]).tolist()
    triplets = []
    for a in range(2 * n):
        p = (a + n) % (2 * n)
        negatives = [j for j in range(2 * n) if j not in (a, p) and (cls is None or cls[j] != cls[a])]
        if not negatives:
            continue
        dist = {j: float((z[a] - z[j]).norm()) for j in negatives}
        if mining == "all":
            triplets += [(a, p, j) for j in negatives]
        elif mining == "hardest":
            triplets.append((a, p, min(negatives, key=dist.get)))
        else:
            d_ap = float((z[a] - z[p]).norm())
            outside = [j for j in negatives if dist[j] > d_ap]
            triplets.append((a, p, min(outside, key=dist.get) if outside else max(negatives, key=dist.get)))
    return torch.tensor(triplets)


@pytest.mark.parametrize("mining", ["semihard", "hardest", "all"])
def test_triplet_loss_is_torch_triplet_margin_loss_on_the_mined_triplets(mining):
    out0, out1 = leaves((7, 6), (7, 6), seed=13)
    index = mined_triplets(out0, out1, mining)

    def reference(a, b):
        z = F.normalize(torch.cat([a, b]), dim=-1)
        return torch.nn.TripletMarginLoss(margin=0.4)(z[index[:, 0]], z[index[:, 1]], z[index[:, 2]])

    expected = loss_and_grads(reference, [out0, out1])
    assert expected[0] > 0
    assert_all_close(loss_and_grads(TripletLoss(0.4, mining), [out0, out1]), expected)


@pytest.mark.parametrize("mining", ["semihard", "hardest", "all"])
def test_triplet_loss_with_labels_mines_other_classes_only(mining):
    out0, out1 = leaves((8, 6), (8, 6), seed=16)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3])
    index = mined_triplets(out0, out1, mining, labels)
    cls = torch.cat([labels, labels])
    assert (cls[index[:, 0]] != cls[index[:, 2]]).all()

    def reference(a, b):
        z = F.normalize(torch.cat([a, b]), dim=-1)
        return torch.nn.TripletMarginLoss(margin=0.4)(z[index[:, 0]], z[index[:, 1]], z[index[:, 2]])

    expected = loss_and_grads(reference, [out0, out1])
    assert expected[0] > 0
    assert_all_close(loss_and_grads(lambda a, b: TripletLoss(0.4, mining)(a, b, labels), [out0, out1]), expected)
    one_class = TripletLoss(0.4, mining)(out0, out1, torch.zeros(8, dtype=torch.long))  # no negative anywhere
    assert one_class.item() == 0.0 and one_class.requires_grad


def test_pairwise_margin_loss_matches_hadsell_per_pair():
    out0, out1 = leaves((5, 4), (5, 4), seed=14)

    def reference(a, b):
        z = F.normalize(torch.cat([a, b]), dim=-1)
        terms = []
        for i in range(10):
            p = (i + 5) % 10
            pull = 0.5 * (z[i] - z[p]).pow(2).sum()
            push = [0.5 * torch.clamp(1.2 - (z[i] - z[j]).norm(), min=0) ** 2 for j in range(10) if j not in (i, p)]
            terms.append(pull + torch.stack(push).mean())
        return torch.stack(terms).mean()

    assert_all_close(loss_and_grads(PairwiseMarginLoss(1.2), [out0, out1]), loss_and_grads(reference, [out0, out1]))


def test_pairwise_margin_loss_with_labels_pulls_the_whole_class():
    out0, out1 = leaves((5, 4), (5, 4), seed=17)
    labels = torch.tensor([0, 1, 0, 2, 1])
    cls = torch.cat([labels, labels]).tolist()

    def reference(a, b):
        z = F.normalize(torch.cat([a, b]), dim=-1)
        terms = []
        for i in range(10):
            pull = [0.5 * (z[i] - z[j]).pow(2).sum() for j in range(10) if j != i and cls[j] == cls[i]]
            push = [0.5 * torch.clamp(1.2 - (z[i] - z[j]).norm(), min=0) ** 2 for j in range(10) if cls[j] != cls[i]]
            terms.append(torch.stack(pull).mean() + torch.stack(push).mean())
        return torch.stack(terms).mean()

    got = loss_and_grads(lambda a, b: PairwiseMarginLoss(1.2)(a, b, labels), [out0, out1])
    assert_all_close(got, loss_and_grads(reference, [out0, out1]))


def vse_reference(image, text, margin, violation):
    """Faghri et al.: for each pair, the hinge over the other captions and over the other images."""
    s = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    terms = []
    for i in range(len(s)):
        to_texts = [torch.clamp(margin - s[i, i] + s[i, j], min=0) for j in range(len(s)) if j != i]
        to_images = [torch.clamp(margin - s[i, i] + s[j, i], min=0) for j in range(len(s)) if j != i]
        pick = (lambda v: torch.stack(v).max()) if violation == "max" else (lambda v: torch.stack(v).sum())
        terms.append(pick(to_texts) + pick(to_images))
    return torch.stack(terms).sum() / len(s)  # the paper's sum over the batch, per pair


@pytest.mark.parametrize("violation", ["max", "sum"])
def test_vse_matches_the_paper_definition(violation):
    image, text = leaves((9, 6), (9, 6), seed=15)
    expected = loss_and_grads(lambda i, x: vse_reference(i, x, 0.3, violation), [image, text])
    assert expected[0] > 0
    assert_all_close(loss_and_grads(VSELoss(0.3, violation), [image, text]), expected)


def test_margin_losses_reject_bad_options():
    with pytest.raises(ValueError, match="mining"):
        TripletLoss(mining="easy")
    with pytest.raises(ValueError, match="violation"):
        VSELoss(violation="mean")
