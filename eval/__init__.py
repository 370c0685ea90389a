"""mmcl evaluation: zero-shot classification, retrieval, kNN / linear probes, embedding geometry, reports.

Python API (the trainer uses `evaluate_dataset`):
    evaluate_dataset(model, preprocess, tokenizer, root, split="test", task=None, **options) -> dict
    zeroshot_classifier(model, tokenizer, classnames, templates) -> W [D, C]
    classification_metrics(logits, targets) -> {acc1, acc5, mean_per_class_recall}
    retrieval_metrics(image_features, text_features, text_to_image, ks=(1, 5, 10)) -> dict
    knn_metrics(...), linear_probe_metrics(...), geometry_metrics(...)
Metric functions take tensors only; the definitions are CLIP_benchmark's (see each module).
"""
from mmcl.eval.geometry import alignment, geometry_metrics, modality_gap, uniformity
from mmcl.eval.probe import knn_metrics, knn_scores, linear_probe_metrics
from mmcl.eval.retrieval import evaluate_retrieval, recall_curve, retrieval_metrics
from mmcl.eval.runner import EvalOptions, evaluate_dataset
from mmcl.eval.zeroshot import classification_metrics, zeroshot_classifier, zeroshot_logits

__all__ = [
    "evaluate_dataset", "EvalOptions",
    "zeroshot_classifier", "zeroshot_logits", "classification_metrics",
    "retrieval_metrics", "evaluate_retrieval", "recall_curve",
    "knn_scores", "knn_metrics", "linear_probe_metrics",
    "alignment", "uniformity", "modality_gap", "geometry_metrics",
]
