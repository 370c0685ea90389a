"""Image-text retrieval with several captions per image, computed exactly and block by block.

CLIP_benchmark's definitions and names:
- `image_retrieval_recall@k` (text -> image): over all captions, the fraction whose own image is among the
  k images scoring highest for that caption;
- `text_retrieval_recall@k` (image -> text): over all images, the fraction with ANY of their captions among
  the k captions scoring highest for that image.
mmcl adds the mean and median rank of the first correct answer (`*_mean_rank`, `*_median_rank`; 1 is
best; the median of an even count is the mean of the two middle ranks).

Memory: scores are made `block_size` queries at a time ([block, N] floats, never N x N).

Ties: recall@k calls torch.topk(k) on each query's scores exactly as CLIP_benchmark does, so when several
candidates tie at the k-th place, which of them count as retrieved is torch.topk's choice (deterministic
for given scores, but not "lowest index first"). Ranks order tied candidates by index (a stable sort), so
a rank and a recall@k can disagree when the k-th place is tied. Scores keep CLIP_benchmark's orientation
(rows of texts @ images.T) so that both round the same way.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import numpy as np
import torch

DEFAULT_KS = (1, 5, 10)
_BLOCK_ELEMENTS = 1 << 22  # scores per block: 16 MB of float32


def default_block_size(candidates: int) -> int:
    return max(1, min(4096, _BLOCK_ELEMENTS // max(candidates, 1)))


def _check(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor) -> None:
    images, texts = len(image_features), len(text_features)
    if images == 0 or texts == 0:
        raise ValueError(f"retrieval needs images and captions, got {images} images and {texts} captions")
    if text_to_image.shape != (texts,):
        raise ValueError(f"text_to_image should have one image index per caption ({texts}), "
                         f"got shape {tuple(text_to_image.shape)}")
    if int(text_to_image.min()) < 0 or int(text_to_image.max()) >= images:
        raise ValueError(f"text_to_image holds indices outside [0, {images})")
    captions = torch.bincount(text_to_image, minlength=images)
    if bool((captions == 0).any()):
        missing = int((captions == 0).nonzero()[0])
        raise ValueError(f"image {missing} has no caption: every image needs at least one")


def _rank_of(scores: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
    """1-based rank of column[i] in row i of `scores`, tied scores ordered by column index."""
    value = scores.gather(1, column[:, None])
    rank = 1 + (scores > value).sum(dim=1)
    tied = ((scores == value).sum(dim=1) > 1).nonzero().flatten()  # rare: only these rows need the index
    if len(tied):
        before = torch.arange(scores.shape[1])[None, :] < column[tied, None]
        rank[tied] += ((scores[tied] == value[tied]) & before).sum(dim=1)
    return rank


def captions_by_image(text_to_image: torch.Tensor, images: int) -> torch.Tensor:
    """[images, max captions] caption indices, ascending; short rows repeat their first caption."""
    order = torch.sort(text_to_image, stable=True).indices
    counts = torch.bincount(text_to_image, minlength=images)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(int(counts.max()))[None, :]
    position = starts[:, None] + torch.where(slot < counts[:, None], slot, torch.zeros_like(slot))
    return order[position]


def _best_caption(scores: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
    """Per row, the caption (of that row's image) scoring highest; the lowest index among equal bests."""
    values = scores.gather(1, captions)
    best = values.max(dim=1, keepdim=True).values
    return torch.where(values == best, captions, captions.max() + 1).min(dim=1).values


def _hits(top: torch.Tensor, correct_of: torch.Tensor, query_ids: torch.Tensor) -> int:
    """Queries with at least one correct candidate among their top indices."""
    return int((correct_of[top] == query_ids[:, None]).any(dim=1).sum())


def _text_to_image(image_features, text_features, text_to_image, ks, block_size):
    texts, images = len(text_features), len(image_features)
    ranks, hits = torch.empty(texts, dtype=torch.long), {k: 0 for k in ks}
    identity = torch.arange(images)
    for start in range(0, texts, block_size):
        scores = text_features[start:start + block_size] @ image_features.T  # [b, images]
        target = text_to_image[start:start + block_size]
        ranks[start:start + len(scores)] = _rank_of(scores, target)
        for k in ks:
            top = scores.topk(min(k, images), dim=1).indices
            hits[k] += _hits(top, identity, target)
    return ranks, hits


def _image_to_text(image_features, text_features, text_to_image, ks, block_size):
    texts, images = len(text_features), len(image_features)
    ranks, hits = torch.empty(images, dtype=torch.long), {k: 0 for k in ks}
    captions = captions_by_image(text_to_image, images)
    for start in range(0, images, block_size):
        # texts @ images.T like CLIP_benchmark (same rounding), transposed and made contiguous for topk
        scores = (text_features @ image_features[start:start + block_size].T).T.contiguous()  # [b, texts]
        ids = torch.arange(start, start + len(scores))
        ranks[start:start + len(scores)] = _rank_of(scores, _best_caption(scores, captions[ids]))
        for k in ks:
            top = scores.topk(min(k, texts), dim=1).indices
            hits[k] += _hits(top, text_to_image, ids)
    return ranks, hits


def _rank_metrics(prefix: str, ranks: torch.Tensor) -> Dict[str, float]:
    return {f"{prefix}_mean_rank": float(ranks.double().mean()),
            f"{prefix}_median_rank": float(np.median(ranks.numpy()))}


def evaluate_retrieval(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                       ks: Sequence[int] = DEFAULT_KS, block_size: int = None
                       ) -> Tuple[Dict[str, float], Dict[str, torch.Tensor]]:
    """(metrics, ranks): ranks["image_retrieval"] per caption, ranks["text_retrieval"] per image."""
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long).cpu()
    image_features, text_features = image_features.float().cpu(), text_features.float().cpu()
    _check(image_features, text_features, text_to_image)
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"recall@k needs k >= 1, got {ks}")
    block = block_size or default_block_size(max(len(image_features), len(text_features)))
    t2i_ranks, t2i_hits = _text_to_image(image_features, text_features, text_to_image, ks, block)
    i2t_ranks, i2t_hits = _image_to_text(image_features, text_features, text_to_image, ks, block)
    metrics = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = t2i_hits[k] / len(text_features)
        metrics[f"text_retrieval_recall@{k}"] = i2t_hits[k] / len(image_features)
    metrics.update(_rank_metrics("image_retrieval", t2i_ranks))
    metrics.update(_rank_metrics("text_retrieval", i2t_ranks))
    return metrics, {"image_retrieval": t2i_ranks, "text_retrieval": i2t_ranks}


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                      ks: Sequence[int] = DEFAULT_KS, block_size: int = None) -> Dict[str, float]:
    """Recall@k both ways, mean and median ranks (see the module docstring for the definitions)."""
    return evaluate_retrieval(image_features, text_features, text_to_image, ks, block_size)[0]


def recall_curve(ranks: torch.Tensor, max_k: int) -> Dict[str, list]:
    """Recall@k for k = 1..max_k from ranks (for plots)."""
    ks = list(range(1, max_k + 1))
    counts = torch.bincount(ranks.clamp(max=max_k + 1), minlength=max_k + 2)[1:max_k + 1]
    return {"k": ks, "recall": (counts.cumsum(0).double() / len(ranks)).tolist()}
