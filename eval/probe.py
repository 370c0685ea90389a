"""Probes of frozen image features: weighted kNN and a logistic-regression linear probe.

kNN follows the SSL literature (InstDisc, DINO's `knn_classifier`): cosine similarity to every train
feature, the k = 20 nearest vote for their class with weight exp(similarity / 0.07), the class scores are
the summed votes. The linear probe is scikit-learn's multinomial LogisticRegression (L2, C = 1) on the
L2-normalised features. Both report `classification_metrics` (acc1, acc5, mean_per_class_recall), prefixed
`knn_` and `linear_probe_`.
"""
from __future__ import annotations

import warnings
from typing import Dict

import numpy as np
import torch

from mmcl.eval.zeroshot import classification_metrics

_BLOCK_ELEMENTS = 1 << 22


def _check(train_features, train_labels, test_features, test_labels) -> None:
    if len(train_features) == 0 or len(test_features) == 0:
        raise ValueError(f"a probe needs train and test samples, got {len(train_features)} and {len(test_features)}")
    if len(train_features) != len(train_labels) or len(test_features) != len(test_labels):
        raise ValueError("features and labels differ in length")


def knn_scores(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
               num_classes: int, k: int = 20, temperature: float = 0.07, block_size: int = None) -> torch.Tensor:
    """Class scores [N_test, C]: summed exp(cos / temperature) of the k nearest train samples per class."""
    train, test = train_features.float(), test_features.float()
    labels = torch.as_tensor(train_labels, dtype=torch.long)
    k = min(k, len(train))
    block = block_size or max(1, _BLOCK_ELEMENTS // len(train))
    scores = torch.zeros(len(test), num_classes, dtype=torch.float64)
    for start in range(0, len(test), block):
        similarity = test[start:start + block] @ train.T
        top = similarity.topk(k, dim=1)
        weights = (top.values.double() / temperature).exp()
        scores[start:start + block].scatter_add_(1, labels[top.indices], weights)
    return scores


def knn_metrics(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                test_labels: torch.Tensor, num_classes: int, k: int = 20,
                temperature: float = 0.07) -> Dict[str, float]:
    """kNN accuracy of the test split against the train split."""
    _check(train_features, train_labels, test_features, test_labels)
    scores = knn_scores(train_features, train_labels, test_features, num_classes, k, temperature)
    metrics = classification_metrics(scores, torch.as_tensor(test_labels, dtype=torch.long))
    return {f"knn_{name}": value for name, value in metrics.items()}


def linear_probe_metrics(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                         test_labels: torch.Tensor, num_classes: int, c: float = 1.0,
                         max_iter: int = 1000) -> Dict[str, float]:
    """Logistic regression fitted on the train split, scored on the test split."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    _check(train_features, train_labels, test_features, test_labels)
    y = np.asarray(train_labels)
    if len(np.unique(y)) < 2:
        raise ValueError("the linear probe needs at least 2 classes in the train split")
    model = LogisticRegression(C=c, max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a probe at max_iter is still a fair probe
        model.fit(np.asarray(train_features, dtype=np.float64), y)
    probabilities = model.predict_proba(np.asarray(test_features, dtype=np.float64))
    scores = torch.full((len(test_features), num_classes), -1.0, dtype=torch.float64)
    scores[:, torch.as_tensor(model.classes_, dtype=torch.long)] = torch.from_numpy(probabilities)
    metrics = classification_metrics(scores, torch.as_tensor(test_labels, dtype=torch.long))
    return {f"linear_probe_{name}": value for name, value in metrics.items()}
