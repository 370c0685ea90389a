"""Zero-shot classification with CLIP_benchmark's definitions.

- classifier: per class, the mean of the L2-normalised embeddings of its prompts (templates with `{c}`
  replaced by the class name), normalised again; stacked as columns W [D, C];
- logits = (100 * image_features) @ W;
- acc1 / acc5: the target among `logits.topk(k)` (acc5 is NaN below 5 classes, as in CLIP_benchmark);
- mean_per_class_recall: balanced accuracy of `logits.argmax(1)` (sklearn's definition: the mean recall of
  the classes present in the targets).

Ties: acc@k uses torch.topk exactly as CLIP_benchmark does (one `topk(5)` call, or `topk(1)` below 5
classes), so a class tied with the k-th best is in or out as torch.topk picks it; the balanced accuracy uses
argmax, which picks the lowest class index among tied maxima. The two can disagree on a tie, as they do in
CLIP_benchmark.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Sequence, Union

import numpy as np
import torch

from mmcl.eval.features import encode_rows, inference
from mmcl.models.text import text_encoder
from mmcl.progress import progress_bar

Templates = Union[Sequence[str], Dict[str, Sequence[str]]]


def class_prompts(classname: str, templates: Templates) -> List[str]:
    """The prompts of one class: templates formatted with c=classname, or a dict's class-specific list."""
    if isinstance(templates, dict):
        return list(templates[classname])
    try:
        return [template.format(c=classname) for template in templates]
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"templates must use {{c}} and no other braces: {err}") from None


PROMPT_BATCH = 256


def zeroshot_classifier(model: torch.nn.Module, tokenizer: Callable, classnames: Sequence[str],
                        templates: Templates, device=None, progress: bool = False, amp: bool = False) -> torch.Tensor:
    """The zero-shot weights W [D, C] (float32, on `device`).

    The prompts of all classes are embedded in batches of PROMPT_BATCH (CLIP_benchmark makes one small batch
    per class: the same embeddings up to float rounding, in fewer, larger matmuls); `amp` autocasts the text
    tower as CLIP_benchmark does; the means and norms are taken in float32.
    """
    if not classnames:
        raise ValueError("no class names")
    if not templates:
        raise ValueError("no templates")
    if device is None:
        device = next(model.parameters()).device
    prompts = [class_prompts(classname, templates) for classname in classnames]
    flat = [prompt for class_list in prompts for prompt in class_list]
    embeddings, encode_text = [], text_encoder(model)  # prompts cut after their end-of-text token
    with progress_bar(len(flat), "classifier", "prompt", enabled=progress) as bar:
        for start in range(0, len(flat), PROMPT_BATCH):
            tokens = tokenizer(flat[start:start + PROMPT_BATCH]).to(device)
            with inference(torch.device(device), amp):
                embeddings.append(encode_rows(encode_text, tokens).float())
            bar.update(len(tokens))
    columns = [class_embeddings.mean(dim=0) for class_embeddings in
               torch.cat(embeddings).split([len(class_list) for class_list in prompts])]
    return torch.stack([mean / mean.norm() for mean in columns], dim=1)


def zeroshot_logits(image_features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """(100 * image_features) @ W, in CLIP_benchmark's order of operations (so floats round the same)."""
    return 100.0 * image_features.to(classifier) @ classifier


def _check(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.dim() != 2 or targets.dim() != 1 or len(logits) != len(targets):
        raise ValueError(f"logits should be [N, C] and targets [N], got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    if len(targets) == 0:
        raise ValueError("no samples to score")
    if logits.shape[1] == 0:
        raise ValueError("no classes to score")
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= logits.shape[1]:
        raise ValueError(f"class index {high if high >= logits.shape[1] else low} out of range "
                         f"for {logits.shape[1]} classes (do the class names match the labels?)")


def per_class_recall(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> np.ndarray:
    """Recall of each class (NaN for a class absent from the targets)."""
    t = targets.cpu().numpy()
    counts = np.bincount(t, minlength=num_classes)
    hits = np.bincount(t[predictions.cpu().numpy() == t], minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, hits / np.maximum(counts, 1), np.nan)


def balanced_accuracy(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> float:
    """sklearn's balanced_accuracy_score: the mean recall over the classes present in the targets."""
    recall = per_class_recall(predictions, targets, num_classes)
    return float(np.mean(recall[~np.isnan(recall)]))


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int]) -> List[float]:
    """Fraction of samples whose target is among the top k, for each k (one topk call, as CLIP_benchmark)."""
    top = logits.topk(max(ks), dim=1, largest=True, sorted=True).indices
    correct = top.eq(targets.to(top.device)[:, None])
    return [int(correct[:, :k].sum()) / len(targets) for k in ks]


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor) -> Dict[str, float]:
    """{acc1, acc5, mean_per_class_recall} of scores [N, C] against class indices [N]."""
    _check(logits, targets)
    num_classes = logits.shape[1]
    if num_classes >= 5:
        acc1, acc5 = topk_accuracy(logits, targets, (1, 5))
    else:
        (acc1,), acc5 = topk_accuracy(logits, targets, (1,)), math.nan
    recall = balanced_accuracy(logits.argmax(dim=1), targets, num_classes)
    return {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": recall}


def zeroshot_evaluate(model: torch.nn.Module, tokenizer: Callable, image_features: torch.Tensor,
                      targets: torch.Tensor, classnames: Sequence[str], templates: Templates,
                      device=None, progress: bool = False, amp: bool = False) -> Dict[str, object]:
    """Metrics and per-class recall of zero-shot classification from precomputed image features."""
    classifier = zeroshot_classifier(model, tokenizer, classnames, templates, device, progress, amp)
    logits = zeroshot_logits(image_features, classifier.cpu())
    metrics = classification_metrics(logits, targets)
    recall = per_class_recall(logits.argmax(dim=1), targets, len(classnames))
    return {"metrics": metrics, "per_class_recall": [float(r) for r in recall]}
