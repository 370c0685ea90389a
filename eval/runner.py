"""Evaluate a model on one dataset folder: the Python API used by `mmcl eval` and by the trainer.

`evaluate_dataset(model, preprocess, tokenizer, root, split="test", task=None, ...)` reads the split once,
embeds it, and scores it. Tasks (`task=None` reads the folder: dataset_type.txt says retrieval, else
classification):
- "zeroshot_classification" (alias "classification", "zeroshot"): acc1, acc5, mean_per_class_recall;
- "zeroshot_retrieval" (alias "retrieval"): recall@k both ways, mean / median ranks (+ geometry if asked);
- "geometry": alignment, uniformity, modality gap of the image and caption embeddings;
- "knn" / "linear_probe" (alias "probe"): frozen image features, `train_split` -> `split`; kNN, plus a
  logistic-regression probe for "linear_probe", and the test features' collapse metrics (feature_std,
  effective_rank, uniformity). No text tower needed (SimCLR / MoCo / BYOL ... models).
The result: {"dataset", "root", "split", "task", "metrics", "samples", "skipped", "seconds",
"images_per_s", "threads", "details"} where details holds what the plots need and threads what the model ran
with on a CPU (mmcl.eval.threads).
"""
from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import torch

from mmcl.data_pipelines import shards
from mmcl.eval.datasets import CLASSIFICATION, RETRIEVAL, SplitInfo, describe_split
from mmcl.eval.features import Features, eval_mode, model_device, split_features
from mmcl.eval.geometry import collapse_metrics, geometry_metrics
from mmcl.eval.probe import knn_metrics, linear_probe_metrics
from mmcl.eval.retrieval import DEFAULT_KS, evaluate_retrieval, recall_curve
from mmcl.eval.threads import fixed_threads
from mmcl.eval.zeroshot import zeroshot_evaluate

ZEROSHOT, RETRIEVAL_TASK, GEOMETRY = "zeroshot_classification", "zeroshot_retrieval", "geometry"
KNN, LINEAR_PROBE = "knn", "linear_probe"
TASK_ALIASES = {"classification": ZEROSHOT, "zeroshot": ZEROSHOT, ZEROSHOT: ZEROSHOT,
                "retrieval": RETRIEVAL_TASK, RETRIEVAL_TASK: RETRIEVAL_TASK, GEOMETRY: GEOMETRY,
                KNN: KNN, "probe": LINEAR_PROBE, LINEAR_PROBE: LINEAR_PROBE}
CURVE_MAX_K = 50


@dataclass
class EvalOptions:
    """Everything but the model and the data; the defaults suit a CPU."""

    batch_size: int = 128
    device: Optional[str] = None  # default: the model's device
    workers: int = 0  # DataLoader processes; 0 decodes in a background thread
    max_samples: Optional[int] = None  # cap per split (quick evaluations during training)
    classnames_file: Optional[str] = None
    templates_file: Optional[str] = None
    recall_k: Sequence[int] = DEFAULT_KS
    geometry: bool = False  # add geometry metrics to retrieval (the features are there already)
    train_split: str = "train"  # probes fit on this split
    knn_k: int = 20
    knn_temperature: float = 0.07
    probe_c: float = 1.0
    threads: Optional[int] = None  # CPU threads of the model; default: measured (mmcl.eval.threads)
    amp: bool = False
    channels_last: bool = False
    progress: bool = False


def resolve_task(task: Optional[str], root: str) -> str:
    """The canonical task name; None reads the dataset folder."""
    if task is None:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"no such dataset folder: {root}")
        return RETRIEVAL_TASK if shards.dataset_task(root) == RETRIEVAL else ZEROSHOT
    if task not in TASK_ALIASES:
        raise ValueError(f"unknown evaluation task {task!r}: use one of {sorted(set(TASK_ALIASES.values()))}")
    return TASK_ALIASES[task]


def _features(model, preprocess, tokenizer, info: SplitInfo, opts: EvalOptions, **what) -> Features:
    return split_features(model, preprocess, tokenizer, info, batch_size=opts.batch_size, device=opts.device,
                          workers=opts.workers, max_samples=opts.max_samples, amp=opts.amp,
                          channels_last=opts.channels_last, progress=opts.progress, threads=opts.threads, **what)


def _zeroshot(model, preprocess, tokenizer, root, split, opts: EvalOptions):
    info = describe_split(root, split, CLASSIFICATION, True, opts.classnames_file, opts.templates_file)
    features = _features(model, preprocess, tokenizer, info, opts, labels=True, texts=False)
    device = opts.device or model_device(model)
    scored = zeroshot_evaluate(model, tokenizer, features.image, features.labels, info.classnames,
                               info.templates, device, opts.progress, opts.amp)
    details = {"classnames": info.classnames, "per_class_recall": scored["per_class_recall"]}
    return info, features, scored["metrics"], details


def _retrieval(model, preprocess, tokenizer, root, split, opts: EvalOptions, ranked: bool = True):
    info = describe_split(root, split, RETRIEVAL)
    features = _features(model, preprocess, tokenizer, info, opts, labels=False, texts=True)
    metrics, details = {}, {"captions": len(features.text)}
    if ranked:
        metrics, ranks = evaluate_retrieval(features.image, features.text, features.text_to_image, opts.recall_k)
        details["recall_curve"] = {  # text -> image ranks images; image -> text ranks captions
            "image_retrieval": recall_curve(ranks["image_retrieval"], min(CURVE_MAX_K, features.samples)),
            "text_retrieval": recall_curve(ranks["text_retrieval"], min(CURVE_MAX_K, len(features.text)))}
    if opts.geometry or not ranked:
        metrics.update(geometry_metrics(features.image, features.text, features.text_to_image))
    return info, features, metrics, details


def _probe(model, preprocess, root, split, opts: EvalOptions, linear: bool):
    train_info = describe_split(root, opts.train_split, CLASSIFICATION, prompts=False)
    info = describe_split(root, split, CLASSIFICATION, prompts=False)
    train = _features(model, preprocess, None, train_info, opts, labels=True, texts=False)
    test = _features(model, preprocess, None, info, opts, labels=True, texts=False)
    classes = len(info.classnames) if info.classnames else int(max(train.labels.max(), test.labels.max())) + 1
    metrics = knn_metrics(train.image, train.labels, test.image, test.labels, classes, opts.knn_k,
                          opts.knn_temperature)
    if linear:
        metrics.update(linear_probe_metrics(train.image, train.labels, test.image, test.labels, classes,
                                            opts.probe_c))
    metrics.update(collapse_metrics(test.image))  # a collapsed tower shows here before its accuracy does
    test.skipped = dict(Counter(train.skipped) + Counter(test.skipped))  # bad samples of both splits
    return info, test, metrics, {"train_split": opts.train_split, "train_samples": train.samples}


def _run_task(task, model, preprocess, tokenizer, root, split, opts):
    if task == ZEROSHOT:
        return _zeroshot(model, preprocess, tokenizer, root, split, opts)
    if task == RETRIEVAL_TASK:
        return _retrieval(model, preprocess, tokenizer, root, split, opts)
    if task == GEOMETRY:
        return _retrieval(model, preprocess, tokenizer, root, split, opts, ranked=False)
    return _probe(model, preprocess, root, split, opts, linear=task == LINEAR_PROBE)


def evaluate_dataset(model: torch.nn.Module, preprocess: Callable, tokenizer: Optional[Callable], root: str,
                     split: str = "test", task: Optional[str] = None, **options) -> Dict[str, object]:
    """Evaluate `model` on `root/split` (see the module docstring); options are EvalOptions fields."""
    opts = EvalOptions(**options)
    root = os.fspath(root)
    task = resolve_task(task, root)
    if tokenizer is None and task in (ZEROSHOT, RETRIEVAL_TASK, GEOMETRY):
        raise ValueError(f"{task} needs a tokenizer (a model with a text tower)")
    start = time.perf_counter()
    with eval_mode(model), fixed_threads(opts.threads):
        info, features, metrics, details = _run_task(task, model, preprocess, tokenizer, root, split, opts)
    seconds = time.perf_counter() - start
    return {"dataset": f"wds/{info.name}", "root": root, "split": split, "task": task, "metrics": metrics,
            "samples": features.samples, "skipped": features.skipped, "seconds": seconds,
            "images_per_s": features.samples / seconds if seconds > 0 else float("inf"),
            "threads": features.threads, "details": details}
