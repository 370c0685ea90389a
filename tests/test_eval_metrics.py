"""eval's metric functions on toy inputs whose answers are worked out by hand."""
import math

import pytest
import torch
import torch.nn.functional as F

from mmcl.eval.geometry import alignment, geometry_metrics, modality_gap, uniformity
from mmcl.eval.probe import knn_metrics, knn_scores, linear_probe_metrics
from mmcl.eval.retrieval import captions_by_image, evaluate_retrieval, recall_curve, retrieval_metrics
from mmcl.eval.zeroshot import classification_metrics, per_class_recall, zeroshot_classifier, zeroshot_logits


# ---- classification ----------------------------------------------------------------------------

def test_classification_by_hand():
    logits = torch.tensor([
        [0.0, 1.0, 9.0, 2.0, 3.0, 4.0],  # target 2: first
        [5.0, 9.0, 1.0, 8.0, 2.0, 3.0],  # target 0: third -> in top 5, not top 1
        [6.0, 5.0, 4.0, 3.0, 2.0, 1.0],  # target 5: last
        [1.0, 9.0, 2.0, 3.0, 4.0, 5.0],  # target 1: first
    ])
    targets = torch.tensor([2, 0, 5, 1])
    m = classification_metrics(logits, targets)
    assert m["acc1"] == 0.5 and m["acc5"] == 0.75
    # classes present: 0 (recall 0), 1 (1), 2 (1), 5 (0) -> 0.5; classes 3 and 4 never occur
    assert m["mean_per_class_recall"] == 0.5
    recall = per_class_recall(logits.argmax(1), targets, 6)
    assert recall[[0, 1, 2, 5]].tolist() == [0.0, 1.0, 1.0, 0.0] and math.isnan(recall[3])


def test_fewer_than_five_classes_gives_nan_acc5():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0], [0.0, 2.0, 1.0]])
    m = classification_metrics(logits, torch.tensor([0, 1, 1]))
    assert m["acc1"] == pytest.approx(2 / 3) and math.isnan(m["acc5"])
    assert m["mean_per_class_recall"] == pytest.approx((1.0 + 0.5) / 2)


def test_one_class():
    m = classification_metrics(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long))
    assert m["acc1"] == 1.0 and math.isnan(m["acc5"]) and m["mean_per_class_recall"] == 1.0


def test_argmax_tie_takes_lowest_class():
    # every logit equal: argmax -> class 0, so class 0 has recall 1 and class 2 recall 0
    m = classification_metrics(torch.ones(2, 3), torch.tensor([0, 2]))
    assert m["mean_per_class_recall"] == 0.5


@pytest.mark.parametrize("logits, targets, message", [
    (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), "no samples"),
    (torch.zeros(2, 3), torch.tensor([0, 3]), "out of range"),
    (torch.zeros(2, 3), torch.tensor([0]), "should be"),
])
def test_classification_bad_input(logits, targets, message):
    with pytest.raises(ValueError, match=message):
        classification_metrics(logits, targets)


class LookupText(torch.nn.Module):
    """encode_text returns a fixed vector per prompt id (the tokenizer maps prompts to ids)."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor(table, dtype=torch.float32), requires_grad=False)

    def encode_text(self, tokens, normalize=False):
        out = self.table[tokens[:, 0]]
        return F.normalize(out, dim=-1) if normalize else out


def test_zeroshot_classifier_mean_of_normalised_prompts():
    prompts = ["a cat", "the cat", "a dog", "the dog"]
    model = LookupText([[3, 4], [2, 0], [0, 5], [0, 1]])  # "a cat" normalises to (0.6, 0.8)
    tokenizer = lambda texts: torch.tensor([[prompts.index(t)] for t in texts])  # noqa: E731
    w = zeroshot_classifier(model, tokenizer, ["cat", "dog"], ["a {c}", "the {c}"])
    # cat: mean((0.6, 0.8), (1, 0)) = (0.8, 0.4) -> (2, 1) / sqrt(5); dog: (0, 1)
    expected = torch.tensor([[2 / math.sqrt(5), 0.0], [1 / math.sqrt(5), 1.0]])
    assert torch.allclose(w, expected, atol=1e-6)
    logits = zeroshot_logits(torch.tensor([[1.0, 0.0]]), w)
    assert torch.allclose(logits, torch.tensor([[200 / math.sqrt(5), 0.0]]))


def test_zeroshot_classifier_rejects_bad_templates():
    model = LookupText([[1, 0]])
    with pytest.raises(ValueError, match="templates"):
        zeroshot_classifier(model, lambda t: torch.zeros(len(t), 1, dtype=torch.long), ["cat"], ["{x} {c}"])


# ---- retrieval ---------------------------------------------------------------------------------

IMAGES = torch.eye(3)
TEXTS = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.8, 0.5], [0.1, 0.3, 0.7], [0.0, 0.0, 1.0], [0.6, 0.5, 0.4]])
OWNERS = torch.tensor([0, 0, 1, 2, 2])  # several captions per image


def test_retrieval_by_hand():
    m, ranks = evaluate_retrieval(IMAGES, TEXTS, OWNERS, ks=(1, 2, 3))
    # caption -> image ranks: [1, 3, 2, 1, 3]
    assert ranks["image_retrieval"].tolist() == [1, 3, 2, 1, 3]
    assert m["image_retrieval_recall@1"] == 0.4 and m["image_retrieval_recall@2"] == 0.6
    assert m["image_retrieval_recall@3"] == 1.0
    assert m["image_retrieval_mean_rank"] == 2.0 and m["image_retrieval_median_rank"] == 2.0
    # image -> text: image 0 best caption 0 (rank 1); image 1's only caption is third; image 2 caption 3 first
    assert ranks["text_retrieval"].tolist() == [1, 3, 1]
    assert m["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert m["text_retrieval_recall@2"] == pytest.approx(2 / 3) and m["text_retrieval_recall@3"] == 1.0
    assert m["text_retrieval_mean_rank"] == pytest.approx(5 / 3) and m["text_retrieval_median_rank"] == 1.0


def test_retrieval_blocks_do_not_change_results():
    torch.manual_seed(0)
    images, texts = F.normalize(torch.randn(37, 8), dim=1), F.normalize(torch.randn(90, 8), dim=1)
    owners = torch.cat([torch.arange(37), torch.randint(0, 37, (53,))])[torch.randperm(90)]  # any order
    whole = retrieval_metrics(images, texts, owners, ks=(1, 5, 10), block_size=10_000)
    for block in (1, 7, 64):
        assert retrieval_metrics(images, texts, owners, ks=(1, 5, 10), block_size=block) == whole


def test_rank_ties_ordered_by_index():
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # images 0 and 1 identical
    texts = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    _, ranks = evaluate_retrieval(images, texts, torch.tensor([1, 0, 2]), ks=(1,))
    assert ranks["image_retrieval"].tolist() == [2, 1, 1]  # the tied image with the lower index comes first
    # image 1's caption 0 ties with caption 1 (image 0's), which has the higher index: rank 1
    assert ranks["text_retrieval"].tolist() == [2, 1, 1]


def test_k_beyond_candidates_is_a_hit():
    m = retrieval_metrics(IMAGES, TEXTS, OWNERS, ks=(10,))
    assert m["image_retrieval_recall@10"] == 1.0 and m["text_retrieval_recall@10"] == 1.0


def test_captions_by_image_pads_with_first_caption():
    table = captions_by_image(torch.tensor([1, 0, 1, 1]), 2)
    assert table.tolist() == [[1, 1, 1], [0, 2, 3]]


@pytest.mark.parametrize("owners, message", [
    (torch.tensor([0, 0, 0, 2, 2]), "image 1 has no caption"),
    (torch.tensor([0, 0, 1, 2, 3]), "outside"),
    (torch.tensor([0, 1]), "one image index per caption"),
])
def test_retrieval_bad_input(owners, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(IMAGES, TEXTS, owners)


def test_retrieval_empty():
    with pytest.raises(ValueError, match="0 images"):
        retrieval_metrics(torch.zeros(0, 3), TEXTS, OWNERS)


def test_recall_curve():
    curve = recall_curve(torch.tensor([1, 3, 2, 1, 7]), 4)
    assert curve["k"] == [1, 2, 3, 4] and curve["recall"] == [0.4, 0.6, 0.8, 0.8]


# ---- probes ------------------------------------------------------------------------------------

def test_knn_temperature_weighting():
    s = 0.6
    train = torch.tensor([[1.0, 0.0], [s, math.sqrt(1 - s * s)], [s, -math.sqrt(1 - s * s)]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    sharp = knn_scores(train, labels, query, 2, k=3, temperature=0.07)
    assert sharp[0, 0].item() == pytest.approx(math.exp(1 / 0.07), rel=1e-5)
    assert sharp[0, 1].item() == pytest.approx(2 * math.exp(s / 0.07), rel=1e-5)
    assert sharp.argmax().item() == 0  # one very close neighbour outweighs two far ones
    flat = knn_scores(train, labels, query, 2, k=3, temperature=10.0)
    assert flat.argmax().item() == 1  # at a high temperature the count wins
    only_nearest = knn_scores(train, labels, query, 2, k=1)
    assert only_nearest[0, 1].item() == 0.0


def test_knn_metrics_and_k_larger_than_train():
    train = torch.eye(2)
    m = knn_metrics(train, torch.tensor([0, 1]), torch.eye(2), torch.tensor([0, 1]), 2, k=20)
    assert m["knn_acc1"] == 1.0 and math.isnan(m["knn_acc5"]) and m["knn_mean_per_class_recall"] == 1.0


def test_linear_probe_separable():
    torch.manual_seed(0)
    centres = torch.eye(3) * 4
    labels = torch.arange(3).repeat(20)
    train = centres[labels] + 0.1 * torch.randn(60, 3)
    test = centres[labels] + 0.1 * torch.randn(60, 3)
    m = linear_probe_metrics(train, labels, test, labels, 3)
    assert m["linear_probe_acc1"] == 1.0 and m["linear_probe_mean_per_class_recall"] == 1.0


def test_linear_probe_needs_two_classes():
    with pytest.raises(ValueError, match="2 classes"):
        linear_probe_metrics(torch.eye(2), torch.tensor([0, 0]), torch.eye(2), torch.tensor([0, 0]), 1)


# ---- geometry ----------------------------------------------------------------------------------

def test_geometry_by_hand():
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert alignment(torch.stack([e0]), torch.stack([e1])) == pytest.approx(2.0)
    assert alignment(torch.stack([e0, e1]), torch.stack([e0, e1])) == 0.0
    assert uniformity(torch.stack([e0, e1])) == pytest.approx(-4.0)
    # pairs of (e0, e1, -e0): squared distances 2, 4, 2
    expected = math.log((2 * math.exp(-4) + math.exp(-8)) / 3)
    assert uniformity(torch.stack([e0, e1, -e0])) == pytest.approx(expected)
    assert uniformity(torch.stack([e0, e1, -e0]), block_size=1) == pytest.approx(expected)
    assert modality_gap(torch.stack([e0, e1]), torch.stack([e0, e0])) == pytest.approx(math.sqrt(0.5))
    g = geometry_metrics(torch.stack([e0, e1]), torch.stack([e0, e1, e0]), torch.tensor([0, 1, 1]))
    assert g["alignment"] == pytest.approx(2 / 3) and g["mean_pair_cosine"] == pytest.approx(2 / 3)


def test_geometry_agrees_with_mmcl_losses():
    losses = pytest.importorskip("mmcl.losses")
    torch.manual_seed(0)
    x, y = F.normalize(torch.randn(50, 8), dim=1), F.normalize(torch.randn(50, 8), dim=1)
    assert alignment(x, y) == pytest.approx(float(losses.alignment(x, y)), rel=1e-5)
    assert uniformity(x, block_size=7) == pytest.approx(float(losses.uniformity(x)), rel=1e-5)


def test_uniformity_needs_two_points():
    with pytest.raises(ValueError, match="at least 2"):
        uniformity(torch.ones(1, 2))
