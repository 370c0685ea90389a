"""eval's metrics equal clip_benchmark's own functions on the same embeddings, ties included.

clip_benchmark 1.6.2's `accuracy()` calls float() on a 1-element array, which numpy 2 refuses; it is
patched here (same arithmetic, `[0]` added) wherever it is used.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

zc = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
zr = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")

from mmcl.eval.retrieval import retrieval_metrics  # noqa: E402
from mmcl.eval.zeroshot import classification_metrics, zeroshot_logits  # noqa: E402


def numpy2_accuracy(output, target, topk=(1,)):
    """clip_benchmark's accuracy() with the numpy 2 fix."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    return [float(correct[:k].reshape(-1).float().sum(0, keepdim=True).cpu().numpy()[0]) / n for k in topk]


@pytest.fixture(autouse=True)
def patched_accuracy(monkeypatch):
    monkeypatch.setattr(zc, "accuracy", numpy2_accuracy)


class Features(Dataset):
    """Precomputed 'images' (feature rows) with labels or caption lists, as clip_benchmark's loaders give."""

    def __init__(self, rows, targets, classes=None):
        self.rows, self.targets, self.classes = rows, targets, classes

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i], self.targets[i]


class Identity(torch.nn.Module):
    """encode_image returns its input; encode_text looks the caption id up in a table."""

    def __init__(self, text_table=None):
        super().__init__()
        self.text_table = text_table

    def encode_image(self, x, normalize=False):
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens, normalize=False):
        x = self.text_table[tokens]
        return F.normalize(x, dim=-1) if normalize else x


def exact_vectors(n, dim=8, seed=0):
    """Unit vectors with four entries of +-0.5: every dot product is exact, so equal scores are exact ties."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(n, dim)
    for row in out:
        idx = torch.randperm(dim, generator=g)[:4]
        row[idx] = 0.5 * (torch.randint(0, 2, (4,), generator=g) * 2 - 1).float()
    return out


def clip_benchmark_classification_metrics(rows, targets, classifier, classes, batch_size, tmp_path):
    """clip_benchmark's evaluate() with a saved classifier, on 'images' that are feature rows."""
    path = tmp_path / "classifier.pt"
    torch.save(classifier, path)
    loader = DataLoader(Features(rows, targets, classes), batch_size=batch_size)
    return zc.evaluate(Identity(), loader, None, classes, None, "cpu", amp=False, load_clfs=[str(path)])


@pytest.mark.parametrize("classes, exact", [(10, False), (10, True), (3, True), (5, True)])
def test_zeroshot_matches_clip_benchmark(tmp_path, classes, exact):
    torch.manual_seed(classes)
    n = 300
    if exact:  # few distinct rows and duplicated class columns: many exactly tied logits
        rows = exact_vectors(6, seed=classes)[torch.randint(0, 6, (n,))]
        classifier = exact_vectors(3, seed=classes + 1)[torch.arange(classes) % 3].T.contiguous()
    else:
        rows = torch.randn(n, 16)
        classifier = F.normalize(torch.randn(16, classes), dim=0)
    targets = torch.randint(0, classes, (n,))
    names = [f"class {i}" for i in range(classes)]
    theirs = clip_benchmark_classification_metrics(rows, targets, classifier, names, 64, tmp_path)
    ours = classification_metrics(zeroshot_logits(F.normalize(rows, dim=-1), classifier), targets)
    assert ours.keys() == theirs.keys()
    for key in ours:
        if math.isnan(theirs[key]):
            assert math.isnan(ours[key])
        else:
            assert ours[key] == pytest.approx(theirs[key], abs=1e-12)


def clip_benchmark_retrieval(images, captions_per_image, text_table, ks, batch_size):
    """clip_benchmark's zeroshot_retrieval.evaluate on feature rows; captions are ids into `text_table`."""
    def collate(batch):
        return torch.stack([b[0] for b in batch]), [b[1] for b in batch]

    loader = DataLoader(Features(images, captions_per_image), batch_size=batch_size, collate_fn=collate)
    tokenizer = lambda texts: torch.tensor([int(t) for t in texts])  # noqa: E731
    return zr.evaluate(Identity(text_table), loader, tokenizer, "cpu", amp=False, recall_k_list=list(ks))


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("block_size", [None, 7])
def test_retrieval_matches_clip_benchmark(exact, block_size):
    torch.manual_seed(1)
    n_images = 60
    counts = torch.randint(1, 6, (n_images,))  # 1 to 5 captions per image
    n_texts = int(counts.sum())
    if exact:  # few distinct vectors: scores tie exactly, at the k-th place too
        images = exact_vectors(8, seed=2)[torch.randint(0, 8, (n_images,))]
        texts = exact_vectors(8, seed=3)[torch.randint(0, 8, (n_texts,))]
    else:
        images, texts = torch.randn(n_images, 12), torch.randn(n_texts, 12)
    owners = torch.arange(n_images).repeat_interleave(counts)
    caption_ids = [[str(t) for t in (owners == i).nonzero().flatten().tolist()] for i in range(n_images)]
    ks = (1, 2, 5, 10)
    theirs = clip_benchmark_retrieval(images, caption_ids, texts, ks, batch_size=16)
    ours = retrieval_metrics(F.normalize(images, dim=-1), F.normalize(texts, dim=-1), owners, ks, block_size)
    for key, value in theirs.items():
        # clip_benchmark averages in float32; mmcl divides counts exactly
        assert ours[key] == pytest.approx(value, abs=1e-6), key
